r"""Theorem 1 of the paper for every listed member of the φ-ψ family, and the energy helpers.

Theorem 1: for L_{φ,ψ}(θ) = Σ_i φ(ξ_i), ξ_i = Σ_{j∈J_i} ψ(d2_i − d2_ij) and
α_ij = φ'(ξ_i) ψ'(d2_i − d2_ij), the parameter gradient is ∂L/∂θ = −∂E_α/∂θ with α held at
sg(α(θ)). Checked here in float64 to 1e-10 (relative) for a small two-layer tanh MLP θ.
"""
import math

import pytest
import torch

from fastalpha import theory as T

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, d_in=5, hidden=7, d_out=4):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)).to(DT)
    with torch.no_grad():
        net[2].weight.mul_(3.0)  # spread the outputs so that margins v_ij are O(1)
    g = torch.Generator().manual_seed(seed + 1000)
    x1 = torch.randn(5, d_in, dtype=DT, generator=g)
    x2 = x1 + 0.3 * torch.randn(5, d_in, dtype=DT, generator=g)
    return net, x1, x2


def _theorem1_gap(preset, seed, normalize=False):
    """max |∂L/∂θ + ∂E_α/∂θ| / max |∂L/∂θ| over all parameters, and α (for side checks)."""
    net, x1, x2 = _mlp(seed)
    params = list(net.parameters())
    z1, z2 = net(x1), net(x2)
    grad_loss = torch.autograd.grad(T.phi_psi_loss(z1, z2, preset, normalize=normalize), params)
    z1, z2 = net(x1), net(x2)
    alpha = T.alpha_phi_psi(z1, z2, preset, normalize=normalize)
    assert not alpha.requires_grad
    grad_energy = torch.autograd.grad(T.energy(z1, z2, alpha, normalize=normalize), params)
    num = max(float((a + b).abs().max()) for a, b in zip(grad_loss, grad_energy))
    den = max(float(a.abs().max()) for a in grad_loss)
    return num / den, den, alpha, (z1.detach(), z2.detach())


SMOOTH = ["infonce", "mine", "soft_triplet", "n_plus_one_tuplet", "lifted_structured", "modified_triplet", "quadratic"]


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_gradient_equals_minus_energy_gradient(name, seed):
    gap, scale, alpha, _ = _theorem1_gap(T.PHI_PSI_PRESETS[name](), seed)
    assert scale > 1e-6, "degenerate sample: the loss gradient vanishes"
    assert float(alpha.min()) >= 0.0, "monotone φ, ψ must give α ≥ 0"
    assert gap < 1e-10, f"{name}: relative gap {gap:.2e}"


@pytest.mark.parametrize("name", ["infonce", "lifted_structured", "triplet"])
def test_theorem1_through_l2_normalised_outputs(name):
    preset = T.PHI_PSI_PRESETS[name]()
    gap, _, _, (z1, z2) = _theorem1_gap(preset, seed=3, normalize=True)
    if name == "triplet":
        _assert_away_from_hinge(z1, z2, margin=0.5, normalize=True)
    assert gap < 1e-10, f"{name}: relative gap {gap:.2e}"


def _assert_away_from_hinge(z1, z2, margin, normalize=False):
    v, mask = T.pair_margins(T.stack_views(z1, z2, normalize))
    dist = (v[mask] + margin).abs()
    # The check is only meaningful if the sample sits away from ψ's kink and on both sides of it.
    assert float(dist.min()) > 1e-6
    assert bool((v[mask] > -margin).any()) and bool((v[mask] < -margin).any())


def _outputs(seed, normalize=False):
    net, x1, x2 = _mlp(seed)
    with torch.no_grad():
        return T.stack_views(net(x1), net(x2), normalize)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem1_triplet_away_from_the_hinge(seed):
    # Margin at the median violation so that the hinge is active for about half the triplets.
    v, mask = T.pair_margins(_outputs(seed))
    margin = float((-v[mask]).median()) + 1e-3
    gap, _, alpha, (z1, z2) = _theorem1_gap(T.triplet(margin=margin), seed)
    _assert_away_from_hinge(z1, z2, margin=margin)
    # α is the indicator of the violated triplets: φ' = 1, ψ' = 1[v > −ε].
    assert torch.equal(alpha, (mask & (v > -margin)).to(DT))
    assert gap < 1e-10


@pytest.mark.parametrize("seed", [4, 5])
def test_theorem1_lifted_structured_across_its_kink(seed):
    # ε chosen so that some anchors have ξ_i < 1 (φ' = 0, α = 0) and others ξ_i > 1.
    xi0 = T.phi_psi_xi(*_outputs(seed).chunk(2), torch.exp)
    preset = T.lifted_structured(eps=-float(torch.log(xi0.median())) + 1e-3)
    gap, _, alpha, (z1, z2) = _theorem1_gap(preset, seed)
    xi = T.phi_psi_xi(z1, z2, preset.psi)
    assert bool((xi < 1).any()) and bool((xi > 1).any()), xi
    assert torch.all(alpha[xi < 1] == 0) and torch.all(alpha[xi > 1].sum(-1) > 0)
    assert gap < 1e-10


def test_infonce_alpha_matches_design_formula():
    g = torch.Generator().manual_seed(11)
    z1, z2 = torch.randn(6, 3, dtype=DT, generator=g), torch.randn(6, 3, dtype=DT, generator=g)
    tau, eps = 0.7, 0.3
    alpha = T.alpha_phi_psi(z1, z2, T.infonce(tau, eps))
    v, mask = T.pair_margins(T.stack_views(z1, z2))
    e = torch.where(mask, torch.exp(v / tau), torch.zeros_like(v))
    expected = e / (eps + e.sum(1, keepdim=True))
    torch.testing.assert_close(alpha, expected, rtol=1e-13, atol=0)
    # A_i = ξ_i / (ε + ξ_i) < 1 (the feasible set after Theorem 2): the positive pair is under-weighted.
    a = alpha.sum(1)
    assert float(a.max()) < 1


def test_infonce_preset_is_tau_times_nt_xent():
    g = torch.Generator().manual_seed(5)
    z1, z2 = torch.randn(7, 4, dtype=DT, generator=g), torch.randn(7, 4, dtype=DT, generator=g)
    tau = 0.4
    loss = T.phi_psi_loss(z1, z2, T.infonce(tau, 1.0), normalize=True)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / tau
    logits.fill_diagonal_(-math.inf)
    target = T.partner_index(14)
    nt_xent = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    torch.testing.assert_close(loss, tau * nt_xent, rtol=1e-13, atol=0)


def test_quadratic_preset_has_constant_alpha_and_matches_energy():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(5, 3, dtype=DT, generator=g), torch.randn(5, 3, dtype=DT, generator=g)
    m = 10
    preset = T.quadratic(1.0 / (m - 2))
    alpha = T.alpha_phi_psi(z1, z2, preset)
    torch.testing.assert_close(alpha, T.negative_mask(m).to(DT) / (m - 2), rtol=1e-14, atol=0)
    # φ, ψ linear: L is exactly −E_α (not only in gradient).
    torch.testing.assert_close(T.phi_psi_loss(z1, z2, preset), -T.energy(z1, z2, alpha), rtol=1e-12, atol=1e-14)


def test_callables_and_preset_agree_and_reductions():
    g = torch.Generator().manual_seed(7)
    z1, z2 = torch.randn(4, 3, dtype=DT, generator=g), torch.randn(4, 3, dtype=DT, generator=g)
    pre = T.n_plus_one_tuplet()
    total = T.phi_psi_loss(z1, z2, pre)
    torch.testing.assert_close(T.phi_psi_loss(z1, z2, torch.log1p, torch.exp), total, rtol=0, atol=0)
    per = T.phi_psi_loss(z1, z2, pre, reduction="none")
    assert per.shape == (8,)
    torch.testing.assert_close(per.sum(), total, rtol=1e-14, atol=0)
    torch.testing.assert_close(T.phi_psi_loss(z1, z2, pre, reduction="mean"), total / 8, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="reduction"):
        T.phi_psi_loss(z1, z2, pre, reduction="avg")
    with pytest.raises(TypeError):
        T.phi_psi_loss(z1, z2, pre, torch.exp)
    with pytest.raises(ValueError, match="N >= 2"):
        T.phi_psi_loss(z1[:1], z2[:1], pre)


def test_energy_is_half_trace_of_contrastive_covariance_and_brute_force():
    g = torch.Generator().manual_seed(8)
    n, d = 5, 3
    z1, z2 = torch.randn(n, d, dtype=DT, generator=g), torch.randn(n, d, dtype=DT, generator=g)
    alpha = torch.rand(2 * n, 2 * n, dtype=DT, generator=g)  # entries off J_i must be ignored
    c = T.contrastive_covariance(z1, z2, alpha)
    torch.testing.assert_close(T.energy(z1, z2, alpha), 0.5 * torch.trace(c), rtol=1e-13, atol=0)
    z = torch.cat([z1, z2])
    m, p = 2 * n, T.partner_index(2 * n)
    brute = torch.zeros(d, d, dtype=DT)
    for i in range(m):
        for j in range(m):
            if j not in (i, int(p[i])):
                brute += alpha[i, j] * torch.outer(z[i] - z[j], z[i] - z[j])
                brute -= alpha[i, j] * torch.outer(z[i] - z[p[i]], z[i] - z[p[i]])
    torch.testing.assert_close(c, brute, rtol=1e-12, atol=1e-12)


def test_energy_helpers_agree_with_the_library_reference():
    reference = pytest.importorskip("fastalpha.reference")
    g = torch.Generator().manual_seed(9)
    z1, z2 = torch.randn(6, 4, dtype=DT, generator=g), torch.randn(6, 4, dtype=DT, generator=g)
    alpha = torch.rand(12, 12, dtype=DT, generator=g)
    torch.testing.assert_close(T.energy(z1, z2, alpha), reference.energy(z1, z2, alpha), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        T.contrastive_covariance(z1, z2, alpha), reference.contrastive_covariance(z1, z2, alpha), rtol=1e-12, atol=1e-12
    )


def test_theorem1_check_detects_a_wrong_alpha():
    # Negative control: dropping φ'(ξ_i) from Eqn. 4 (α = ψ' only) must break the identity.
    net, x1, x2 = _mlp(12)
    params = list(net.parameters())
    preset = T.infonce(tau=0.5, eps=1.0)
    grad_loss = torch.autograd.grad(T.phi_psi_loss(net(x1), net(x2), preset), params)
    z1, z2 = net(x1), net(x2)
    v, mask = T.pair_margins(T.stack_views(z1.detach(), z2.detach()))
    wrong = torch.where(mask, T.elementwise_derivative(preset.psi, v), torch.zeros_like(v))
    grad_energy = torch.autograd.grad(T.energy(z1, z2, wrong), params)
    gap = max(float((a + b).abs().max()) for a, b in zip(grad_loss, grad_energy))
    assert gap > 1e-2 * max(float(a.abs().max()) for a in grad_loss)

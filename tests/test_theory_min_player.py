r"""The min player α = argmin_{α∈A} E_α − R(α) (Corollary 1), in float64 on fresh random inputs.

* Theorem 2: for ψ(x) = c·e^{x/τ} the pair importance of Eqn. 4 is the argmin with the entropy
  regulariser R_H over A = {α ≥ 0, Σ_j α_ij = τ^{-1} ξ_i φ'(ξ_i)}: InfoNCE, MINE, (N+1)-tuplet
  and soft triplet. Checked by the row sums, the KKT stationarity (d2_ij + τ log α_ij constant
  along each row) and by random feasible competitors, which all score worse.
* α-CL-r_γ (Sec. 6): the exact argmin α_ij = (τ/(d2_ij − λ_i))^{1/γ}, λ_i solved to 1e-12,
  satisfies its KKT conditions and beats the authors' form (d2 + τ)^{−1/γ}; at batch 128 it is
  uniform to ~1e-5 while the authors' form (fastalpha's `inverse`) spreads by > 10 %.
"""
import pytest
import torch

import fastalpha
from fastalpha import theory as T

DT = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _views(gen, n, d, noise=0.3, normalize=True):
    x = torch.randn(n, d, dtype=DT, generator=gen)
    z1 = x + noise * torch.randn(n, d, dtype=DT, generator=gen)
    z2 = x + noise * torch.randn(n, d, dtype=DT, generator=gen)
    if normalize:
        z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    return z1, z2


def _feasible_competitors(alpha, gen, count=64, scale=0.3):
    """Random α' ≥ 0 with the same row sums as α (multiplicative noise, renormalised)."""
    noise = torch.exp(scale * torch.randn(count, *alpha.shape, dtype=DT, generator=gen))
    other = alpha * noise
    return other * (alpha.sum(1) / other.sum(2))[:, :, None]


THEOREM2_MEMBERS = {
    # name: (preset, τ of its ψ(x) = c·e^{x/τ})
    "infonce": (lambda: T.infonce(tau=0.5, eps=1.0), 0.5),
    "mine": (T.mine, 1.0),
    "n_plus_one_tuplet": (T.n_plus_one_tuplet, 1.0),
    "soft_triplet": (lambda: T.soft_triplet(tau=0.5, eps=0.5), 0.5),
}


@pytest.mark.parametrize("name", sorted(THEOREM2_MEMBERS))
def test_theorem2_eqn4_alpha_is_the_entropy_regularised_argmin(name, gen):
    make, tau = THEOREM2_MEMBERS[name]
    preset = make()
    z1, z2 = _views(gen, 12, 5, normalize=False)
    z = torch.cat([z1, z2])
    m = z.shape[0]
    mask = T.negative_mask(m)
    alpha = T.alpha_phi_psi(z1, z2, preset)[mask].view(m, m - 2)
    d2, d2_pos = T.negative_distances(z)

    # The constraint set A: Σ_j α_ij = τ^{-1} ξ_i φ'(ξ_i), from the preset's own φ and ψ.
    v = (d2_pos[:, None] - d2)
    xi = preset.psi(v).sum(1)
    total = xi * T.elementwise_derivative(preset.phi, xi) / tau
    torch.testing.assert_close(alpha.sum(1), total, rtol=1e-12, atol=0)
    # KKT of min Σ α d2 + τ Σ α log α on the simplex scaled to `total`: d2_ij + τ log α_ij = const_i.
    stationarity = d2 + tau * torch.log(alpha)
    spread = (stationarity.max(1).values - stationarity.min(1).values).max()
    assert float(spread) < 1e-10 * float(d2.abs().max() + tau), float(spread)
    # The closed form of the argmin agrees, and no feasible competitor does better.
    torch.testing.assert_close(alpha, T.entropy_argmin(d2, tau, total), rtol=1e-11, atol=0)
    best = T.min_player_objective(alpha, d2, d2_pos, "entropy", tau)
    for other in _feasible_competitors(alpha, gen):
        assert torch.all(T.min_player_objective(other, d2, d2_pos, "entropy", tau) > best)


def test_theorem2_check_fails_for_a_non_exponential_psi(gen):
    """Control: the modified triplet's ψ = sigmoid is not exponential, and its α is not the argmin."""
    preset = T.modified_triplet(c=2.0)
    z1, z2 = _views(gen, 12, 5, normalize=False)
    z = torch.cat([z1, z2])
    m = z.shape[0]
    alpha = T.alpha_phi_psi(z1, z2, preset)[T.negative_mask(m)].view(m, m - 2)
    d2, _ = T.negative_distances(z)
    stationarity = d2 + 1.0 * torch.log(alpha)
    assert float((stationarity.max(1).values - stationarity.min(1).values).max()) > 1e-2


def _kkt_r_gamma(alpha, lam, d2, tau, gamma):
    """Largest violation of α_ij = (τ/(d2_ij − λ_i))^{1/γ} (relative) and of Σ_j α_ij = 1."""
    assert torch.all(lam[:, None] < d2)
    implied = (tau / (d2 - lam[:, None])) ** (1 / gamma)
    return float(((alpha - implied) / implied).abs().max()), float((alpha.sum(1) - 1).abs().max())


def test_r_gamma_exact_argmin_solves_its_kkt_system_where_it_is_far_from_uniform(gen):
    """Few negatives and small τ: the exact argmin is far from uniform, so a solver that returned a
    uniform α (or the authors' form) would fail here."""
    tau, gamma = 0.002, 2.0
    d2 = torch.rand(16, 6, dtype=DT, generator=gen) * 2
    alpha, lam = T.r_gamma_argmin(d2, tau, gamma)
    rel, total = _kkt_r_gamma(alpha, lam, d2, tau, gamma)
    assert rel < 1e-13 and total <= 1e-12
    assert float((alpha.max(1).values / alpha.min(1).values).median()) > 1.5
    # The argmin beats every feasible competitor, the authors' form included.
    zeros = torch.zeros(d2.shape[0], dtype=DT)
    best = T.min_player_objective(alpha, d2, zeros, "r_gamma", tau, gamma)
    code = T.r_gamma_code_form(d2, tau, gamma)
    assert torch.all(T.min_player_objective(code, d2, zeros, "r_gamma", tau, gamma) > best)
    for other in _feasible_competitors(alpha, gen):
        assert torch.all(T.min_player_objective(other, d2, zeros, "r_gamma", tau, gamma) > best)


def test_r_gamma_exact_argmin_is_near_uniform_at_batch_128(gen):
    """The paper's setting (batch 128 → 254 negatives per anchor, τ 0.5, γ 2) on unit embeddings."""
    tau, gamma = 0.5, 2.0
    z1, z2 = _views(gen, 128, 32)
    z = torch.cat([z1, z2])
    d2, _ = T.negative_distances(z)
    n = d2.shape[1]
    assert n == 254
    alpha, lam = T.r_gamma_argmin(d2, tau, gamma)
    rel, total = _kkt_r_gamma(alpha, lam, d2, tau, gamma)
    assert rel < 1e-12 and total <= 1e-12
    # λ_i ≈ −τ n^γ: the multiplier dwarfs every distance (d2 ≤ 2 on unit rows) ...
    torch.testing.assert_close(lam, torch.full_like(lam, -tau * n ** gamma), rtol=1e-3, atol=0)
    # ... so the exact α is uniform to ~1e-5, i.e. α-CL-r_γ taken literally is L_quadratic.
    exact_spread = float((alpha.max(1).values / alpha.min(1).values).max()) - 1
    assert exact_spread < 1e-4, exact_spread
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / n), rtol=1e-4, atol=0)
    # The authors' form, which fastalpha's `inverse` computes, is not near uniform.
    code = T.r_gamma_code_form(d2, tau, gamma)
    code_spread = float((code.max(1).values / code.min(1).values).median()) - 1
    assert code_spread > 0.1, code_spread
    library = fastalpha.pair_weights(z1, z2, rule="inverse", temperature=tau, gamma=gamma, normalize=False)
    torch.testing.assert_close(library[T.negative_mask(256)].view(256, 254), code, rtol=1e-10, atol=0)


def test_r_gamma_argmin_rejects_gamma_at_most_one(gen):
    with pytest.raises(ValueError, match="γ > 1"):
        T.r_gamma_argmin(torch.rand(2, 3, dtype=DT, generator=gen), 0.5, 1.0)

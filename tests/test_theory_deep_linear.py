r"""Section 4 of the paper: the max player on deep linear networks z = W_L ⋯ W_1 x, fixed α.

Checked statements (float64):
* Lemma 1: ∂E_α/∂W_l = W_{>l}ᵀ W_{>l} W_l W_{<l} X_α W_{<l}ᵀ with X_α = C_α[x] (vs autograd
  of the energy of the network's outputs).
* Theorem 3: under ||W_l||_F = 1 for every l, max E_α = ½ λ_max(X_α), attained by rank-1
  layers W_l = u_l u_{l−1}ᵀ with u_0 the top eigenvector of X_α; the normalised flow (Eqn. 11)
  from random starts reaches it, with every W_l's singular values → (1, 0, …, 0).
* Corollary 3: with per-filter normalisation ||w_lk|| = 1/√n_l (l = 1..L−1) the flow still
  reaches Theorem 3's rank-1 global optimum, and now [v_l]_k = ±1/√n_l.
* Balancedness: without normalisation d/dt (W_l W_lᵀ − W_{l+1}ᵀ W_{l+1}) = 0 along the flow.
* Lemma 2: with ℓ2-normalised outputs the loss is invariant to W_l → c W_l (c > 0), so its
  gradient is orthogonal to W_l and gradient flow conserves every ||W_l||_F.
"""
import pytest
import torch

from fastalpha import theory as T

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed, n=24, d=6, aug=0.2):
    """Two views of anisotropic Gaussian data and X_α with α = InfoNCE's (Eqn. 4) at the input."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(2.0, 0.4, d, dtype=DT)
    x = torch.randn(n, d, dtype=DT, generator=g) * scale
    x1 = x + aug * torch.randn(n, d, dtype=DT, generator=g)
    x2 = x + aug * torch.randn(n, d, dtype=DT, generator=g)
    alpha = T.alpha_phi_psi(x1, x2, T.infonce(tau=2.0, eps=1.0))
    return x1, x2, alpha, T.contrastive_covariance(x1, x2, alpha)


def _weights(seed, dims, normalize=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    ws = [scale * torch.randn(dims[l + 1], dims[l], dtype=DT, generator=g) for l in range(len(dims) - 1)]
    return T.frobenius_normalize(ws) if normalize else ws


def test_lemma1_closed_form_gradients_match_autograd_of_the_energy():
    x1, x2, alpha, xa = _data(0)
    ws = [w.requires_grad_(True) for w in _weights(1, [6, 5, 4, 4, 3], normalize=False)]
    w = T.chain(ws, 0, len(ws))
    e = T.energy(x1 @ w.T, x2 @ w.T, alpha)
    torch.testing.assert_close(e, T.deep_linear_objective(ws, xa), rtol=1e-12, atol=0)
    auto = torch.autograd.grad(e, ws)
    for g_auto, g_closed in zip(auto, T.deep_linear_gradients([w.detach() for w in ws], xa)):
        torch.testing.assert_close(g_closed, g_auto, rtol=1e-11, atol=1e-13)


def test_theorem3_upper_bound_and_rank_one_optimum():
    _, _, _, xa = _data(2)
    lam = float(torch.linalg.eigvalsh(xa)[-1])
    assert lam > 0
    dims = [6, 5, 5, 4]
    g = torch.Generator().manual_seed(3)
    best = T.rank_one_optimum(xa, dims, generator=g)
    assert all(abs(float(torch.linalg.matrix_norm(w)) - 1) < 1e-14 for w in best)
    torch.testing.assert_close(T.deep_linear_objective(best, xa), torch.tensor(lam / 2, dtype=DT), rtol=1e-13, atol=0)
    # No feasible point beats ½ λ_max: random and rank-1-but-misaligned ones stay below.
    for seed in range(200):
        val = float(T.deep_linear_objective(_weights(100 + seed, dims), xa))
        assert val <= lam / 2 * (1 + 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_theorem3_normalised_flow_converges_to_rank_one_global_optimum(seed):
    _, _, _, xa = _data(10 + seed)
    evals, evecs = torch.linalg.eigh(xa)
    lam = float(evals[-1])
    dims = [6, 5, 5, 5, 5, 4]  # L = 5 as in Fig. 2
    run = T.deep_linear_flow(_weights(seed, dims), xa, steps=3000, lr=1.0 / lam, record_every=1000)
    assert abs(run.objective[-1] - lam / 2) < 1e-9 * lam
    assert all(b >= a - 1e-9 * lam for a, b in zip(run.objective, run.objective[1:])), "ascent must not decrease E"
    for w in run.ws:
        s = torch.linalg.svdvals(w)
        assert abs(float(s[0]) - 1) < 1e-9 and float(s[1]) < 1e-6, s
    # The rank-1 chain is aligned: W's row space is the top eigenvector of X_α, and consecutive
    # layers share their singular vectors (right of W_{l+1} = left of W_l).
    w = T.chain(run.ws, 0, len(run.ws))
    _, _, vh = torch.linalg.svd(w)
    assert abs(float(vh[0] @ evecs[:, -1])) > 1 - 1e-9
    for a, b in zip(run.ws, run.ws[1:]):
        ua = torch.linalg.svd(a).U[:, 0]
        vb = torch.linalg.svd(b).Vh[0]
        assert abs(float(ua @ vb)) > 1 - 1e-9


def test_normalised_flow_keeps_layer_norms_and_is_not_rank_one_at_start():
    _, _, _, xa = _data(20)
    ws = _weights(20, [6, 5, 5, 4])
    assert all(float(torch.linalg.svdvals(w)[1]) > 0.1 for w in ws)  # the test has something to show
    run = T.deep_linear_flow(ws, xa, steps=50, lr=0.1 / float(torch.linalg.eigvalsh(xa)[-1]))
    for w in run.ws:
        assert abs(float(torch.linalg.matrix_norm(w)) - 1) < 1e-13


def test_balancedness_rate_is_zero_analytically():
    _, _, _, xa = _data(30)
    ws = _weights(31, [6, 5, 4, 4, 3], normalize=False)
    grads = T.deep_linear_gradients(ws, xa)
    scale = max(float(g.abs().max()) * float(w.abs().max()) for g, w in zip(grads, ws))
    for rate in T.balancedness_rate(ws, grads):
        assert float(rate.abs().max()) < 1e-12 * scale
    # With the projected (normalised) velocities the same quantity is far from 0.
    proj = T.project_tangent(ws, grads)
    assert max(float(r.abs().max()) for r in T.balancedness_rate(ws, proj)) > 1e-3 * scale


def _relative_drift(ws0, ws1):
    """max_l ||Δ_l(T) − Δ_l(0)|| / max_l ||W_l W_lᵀ(T) − W_l W_lᵀ(0)||."""
    d0, d1 = T.balancedness(ws0), T.balancedness(ws1)
    moved = max(float(torch.linalg.matrix_norm(b @ b.T - a @ a.T)) for a, b in zip(ws0, ws1))
    drift = max(float(torch.linalg.matrix_norm(b - a)) for a, b in zip(d0, d1))
    return drift / moved, moved


def test_balancedness_is_conserved_along_the_unnormalised_flow():
    _, _, _, xa = _data(40)
    lam = float(torch.linalg.eigvalsh(xa)[-1])
    # Small start: the unnormalised ascent of a depth-3 product blows up in finite time.
    ws = _weights(41, [6, 5, 4, 4], normalize=False, scale=0.15)
    run = T.deep_linear_flow(ws, xa, steps=400, lr=0.02 / lam, normalize=False, method="rk4", record_every=400)
    ratio, moved = _relative_drift(ws, run.ws)
    assert moved > 0.05, "the weights must actually move for the check to mean anything"
    assert ratio < 1e-9, ratio
    # Control: the normalised flow moves the same layers but does not conserve Δ_l.
    run_n = T.deep_linear_flow(ws, xa, steps=400, lr=0.02 / lam, normalize=True, method="rk4", record_every=400)
    assert _relative_drift(ws, run_n.ws)[0] > 1e-2


def _normalised_loss(ws, x1, x2, normalize_output=True):
    w = T.chain(ws, 0, len(ws))
    return T.phi_psi_loss(x1 @ w.T, x2 @ w.T, T.infonce(tau=0.5, eps=1.0), normalize=normalize_output)


def _loss_grads(ws, x1, x2, normalize_output=True):
    ws = [w.detach().requires_grad_(True) for w in ws]
    return list(torch.autograd.grad(_normalised_loss(ws, x1, x2, normalize_output), ws))


def test_lemma2_gradient_is_orthogonal_to_each_layer_under_l2_normalised_output():
    x1, x2, _, _ = _data(50, n=10)
    ws = _weights(51, [6, 5, 4, 3], normalize=False)
    for g, w in zip(_loss_grads(ws, x1, x2), ws):
        cos = float((g * w).sum() / (g.norm() * w.norm()))
        assert abs(cos) < 1e-12, cos
    # Control: without the output normalisation the loss is not scale-invariant.
    cos_raw = [float((g * w).sum() / (g.norm() * w.norm())) for g, w in zip(_loss_grads(ws, x1, x2, False), ws)]
    assert max(abs(c) for c in cos_raw) > 1e-2


def _rk4_descent(ws, x1, x2, h, steps):
    """RK4 integration of the gradient flow Ẇ_l = −∂L/∂W_l."""

    def vel(cur):
        return [-g for g in _loss_grads(cur, x1, x2)]

    ws = [w.clone() for w in ws]
    for _ in range(steps):
        k1 = vel(ws)
        k2 = vel([w + 0.5 * h * k for w, k in zip(ws, k1)])
        k3 = vel([w + 0.5 * h * k for w, k in zip(ws, k2)])
        k4 = vel([w + h * k for w, k in zip(ws, k3)])
        ws = [w + h / 6 * (a + 2 * b + 2 * c + d) for w, a, b, c, d in zip(ws, k1, k2, k3, k4)]
    return ws


def test_lemma2_gradient_flow_conserves_layer_norms():
    x1, x2, _, _ = _data(60, n=8)
    ws0 = _weights(61, [6, 5, 4, 3], normalize=False)
    # The same time horizon T = 1.5 at two step sizes: the norm drift is pure discretisation
    # error (it shrinks like h⁴), so the continuous flow conserves ||W_l||_F.
    coarse = _rk4_descent(ws0, x1, x2, h=0.02, steps=75)
    fine = _rk4_descent(ws0, x1, x2, h=0.01, steps=150)
    for a, b, c in zip(ws0, coarse, fine):
        moved = float(torch.linalg.matrix_norm(c - a) / torch.linalg.matrix_norm(a))
        drift_coarse = abs(float(torch.linalg.matrix_norm(b) / torch.linalg.matrix_norm(a)) - 1)
        drift_fine = abs(float(torch.linalg.matrix_norm(c) / torch.linalg.matrix_norm(a)) - 1)
        assert moved > 0.05, moved
        assert drift_fine < 1e-5 * moved, (drift_fine, moved)
        assert drift_fine < drift_coarse / 8, (drift_coarse, drift_fine)
    assert float(_normalised_loss(fine, x1, x2)) < float(_normalised_loss(ws0, x1, x2))


def _fresh_data(gen, n=24, d=6, aug=0.2):
    scale = torch.linspace(2.0, 0.4, d, dtype=DT)
    x = torch.randn(n, d, dtype=DT, generator=gen) * scale
    x1 = x + aug * torch.randn(n, d, dtype=DT, generator=gen)
    x2 = x + aug * torch.randn(n, d, dtype=DT, generator=gen)
    return T.contrastive_covariance(x1, x2, T.alpha_phi_psi(x1, x2, T.infonce(tau=2.0, eps=1.0)))


def test_corollary3_per_filter_normalisation_gives_plus_minus_one_over_sqrt_n(gen):
    import math

    xa = _fresh_data(gen)
    evals, evecs = torch.linalg.eigh(xa)
    lam = float(evals[-1])
    assert lam > 0
    dims = [6, 5, 4, 4, 3]
    for _ in range(2):
        ws = [torch.randn(dims[l + 1], dims[l], dtype=DT, generator=gen) for l in range(len(dims) - 1)]
        # The rate is set by X_α's eigengap, which a random draw can make small (a draw left the
        # objective 2e-3 short after 1500 steps): the flow runs in blocks of 1500 steps until it
        # reaches the optimum along v_0, within a budget that only a non-convergent flow exhausts.
        for _ in range(20):
            run = T.deep_linear_flow(ws, xa, steps=1500, lr=1.0 / lam, record_every=1500, per_filter=True)
            ws = run.ws
            aligned = abs(float(torch.linalg.svd(T.chain(ws, 0, len(ws)))[2][0] @ evecs[:, -1])) > 1 - 1e-9
            rank_one = all(float(s[1] / s[0]) < 1e-8 for s in map(torch.linalg.svdvals, ws))
            if aligned and rank_one and abs(run.objective[-1] - lam / 2) < 1e-9 * lam:
                break
        assert abs(run.objective[-1] - lam / 2) < 1e-9 * lam  # Theorem 3's global optimum
        for l, w in enumerate(run.ws):
            svd = torch.linalg.svd(w)
            assert float(svd.S[1] / svd.S[0]) < 1e-8  # W_l = v_l v_{l−1}ᵀ
            if l < len(run.ws) - 1:  # [v_l]_k = ±1/√n_l for the per-filter-normalised layers
                torch.testing.assert_close(svd.U[:, 0].abs(), torch.full((w.shape[0],), 1 / math.sqrt(w.shape[0]), dtype=DT),
                                           rtol=1e-9, atol=0)
        _, _, vh = torch.linalg.svd(T.chain(run.ws, 0, len(run.ws)))
        assert abs(float(vh[0] @ evecs[:, -1])) > 1 - 1e-9  # v_0: the top eigenvector of X_α
    # Control: with the Frobenius constraint alone (Theorem 3) the hidden v_l are not ±1/√n_l.
    ws = [torch.randn(dims[l + 1], dims[l], dtype=DT, generator=gen) for l in range(len(dims) - 1)]
    free = T.deep_linear_flow(T.frobenius_normalize(ws), xa, steps=1500, lr=1.0 / lam, record_every=1500)
    spread = [float(torch.linalg.svd(w).U[:, 0].abs().std()) for w in free.ws[:-1]]
    assert max(spread) > 1e-3, spread

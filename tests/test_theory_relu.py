r"""Section 5 of the paper: the max player on a two-layer ReLU net z = W_2 σ(W_1 x), fixed α,
inputs from the orthogonal mixture x = a e_m (a > 0). The statements are written out in the
docstring of fastalpha/theory/relu.py; each test names the one it checks: the paper's Lemma 3,
Theorems 4–6, or this project's own Propositions A and B (not the paper's). Float64 throughout.
"""
import pytest
import torch

from fastalpha import theory as T

DT = torch.float64
D = 8  # components / input dimension


pytestmark = pytest.mark.usefixtures("one_thread")


def _mixture(seed=0, n=96, aug=0.1):
    g = torch.Generator().manual_seed(seed)
    return T.orthogonal_mixture(n, torch.linspace(2.0, 1.0, D).tolist(), aug_std=aug, generator=g)


def _random_alpha(m, seed):
    return torch.rand(m, m, dtype=DT, generator=torch.Generator().manual_seed(seed)) * T.negative_mask(m)


def _uniform_x_alpha(seed=0):
    x1, x2, _ = _mixture(seed)
    m = 2 * x1.shape[0]
    x_alpha = T.contrastive_covariance(x1, x2, T.negative_mask(m).to(DT) / (m - 2))
    assert float(torch.diagonal(x_alpha).min()) > 0  # every component is worth representing
    return x_alpha


def _x_alpha_and_top_eigenvalue(seed):
    """X_α of the mixture and its largest eigenvalue (the scale of the flows' step size)."""
    x_alpha = _uniform_x_alpha(seed)
    return x_alpha, float(torch.linalg.eigvalsh(x_alpha)[-1])


#: K, the hidden nodes of the propositions' two-layer nets.
NODES = 6


def _frobenius_flow(w1, w2, x_alpha, steps, lr, **options):
    """The flow from W_1 / ||W_1||_F and W_2 / ||W_2||_F, recording only its end point."""
    return T.relu2_flow(w1 / w1.norm(), w2 / w2.norm(), x_alpha, steps=steps, lr=lr, record_every=steps, **options)


def test_orthogonal_mixture_has_nonpositive_off_diagonal_contrastive_covariance():
    x1, x2, labels = _mixture(1)
    assert torch.all(x1 >= 0) and torch.all((x1 > 0).sum(1) == 1) and torch.equal(x1 > 0, x2 > 0)
    for seed in range(3):
        x_alpha = T.contrastive_covariance(x1, x2, _random_alpha(2 * x1.shape[0], seed))
        off = x_alpha[~torch.eye(D, dtype=torch.bool)]
        assert float(off.max()) <= 0.0
        assert float(off.min()) < 0.0
    # Control: without orthogonality (every sample also lights coordinate 0) positive
    # off-diagonals appear.
    x1c, x2c = x1.clone(), x2.clone()
    x1c[:, 0] += x1.sum(1)
    x2c[:, 0] += x2.sum(1)
    x_alpha = T.contrastive_covariance(x1c, x2c, _random_alpha(2 * x1.shape[0], 0))
    assert float(x_alpha[~torch.eye(D, dtype=torch.bool)].max()) > 0


def test_closed_form_energy_and_gradients_match_autograd_of_the_network():
    x1, x2, _ = _mixture(2, n=20)
    alpha = _random_alpha(40, 3)
    g = torch.Generator().manual_seed(4)
    w1 = torch.randn(5, D, dtype=DT, generator=g).requires_grad_(True)
    w2 = torch.randn(3, 5, dtype=DT, generator=g).requires_grad_(True)
    e = T.energy(T.relu2_forward(w1, w2, x1), T.relu2_forward(w1, w2, x2), alpha)
    x_alpha = T.contrastive_covariance(x1, x2, alpha)
    torch.testing.assert_close(T.relu2_objective(w1, w2, x_alpha), e, rtol=1e-12, atol=0)
    auto1, auto2 = torch.autograd.grad(e, (w1, w2))
    g1, g2 = T.relu2_gradients(w1.detach(), w2.detach(), x_alpha)
    torch.testing.assert_close(g1, auto1, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(g2, auto2, rtol=1e-11, atol=1e-12)


def test_theorem4_gradient_vanishes_on_nonpositive_first_layer_weights():
    x1, x2, _ = _mixture(5, n=24)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        w1 = torch.randn(6, D, dtype=DT, generator=g).requires_grad_(True)
        w2 = torch.randn(4, 6, dtype=DT, generator=g)
        alpha = _random_alpha(48, 10 + seed)
        e = T.energy(T.relu2_forward(w1, w2, x1), T.relu2_forward(w1, w2, x2), alpha)
        (grad,) = torch.autograd.grad(e, w1)
        dead = w1.detach() <= 0
        assert dead.any() and (~dead).any()
        assert torch.all(grad[dead] == 0)  # exactly: the gate is closed on the whole component
        assert float(grad[~dead].abs().max()) > 1e-3  # …while live weights do move


def test_theorem4_nonpositive_weights_stay_nonpositive_along_the_flow():
    x_alpha, lam = _x_alpha_and_top_eigenvalue(6)
    g = torch.Generator().manual_seed(7)
    w1 = torch.randn(6, D, dtype=DT, generator=g)
    w2 = torch.randn(5, 6, dtype=DT, generator=g)
    run = T.relu2_flow(w1, w2, x_alpha, steps=400, lr=0.05 / lam)
    hist = run.w1_history
    newly_dead = 0
    for before, after in zip(hist, hist[1:]):
        dead = before <= 0
        assert torch.all(after[dead] <= 0), "a non-positive weight became positive"
        # The only change of a dead weight is the (common, positive) layer renormalisation.
        ratio = after[dead] / before[dead]
        assert float(ratio.min()) > 0 and float(ratio.max() - ratio.min()) < 1e-12
        newly_dead += int(((after <= 0) & ~dead).sum())
    assert newly_dead > 0, "the run should also show live weights dying (winner-take-all)"


@pytest.mark.parametrize("seed", range(6))
def test_theorem5_single_hidden_node_converges_to_one_component(seed):
    x_alpha, lam = _x_alpha_and_top_eigenvalue(8)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(1, D, dtype=DT, generator=g)
    w1 = w1 / w1.norm()
    w2 = torch.randn(4, 1, dtype=DT, generator=g)
    w2 = w2 / w2.norm()
    run = T.relu2_flow(w1, w2, x_alpha, steps=3000, lr=0.2 / lam, record_every=3000)
    w = run.w1[0]
    m_star = int(w.argmax())
    assert w1[0, m_star] > 0, "the winner must have been live at the start (Theorem 4)"
    assert float(T.row_concentration(run.w1)[0]) > 1 - 1e-12
    assert float(w[m_star]) > 1 - 1e-9 and float(w.abs().sort().values[-2]) < 1e-5  # W_1 → e_{m*}
    e_final = run.objective[-1]
    assert abs(e_final - 0.5 * float(x_alpha[m_star, m_star])) < 1e-9 * lam
    assert e_final <= 0.5 * T.max_nonneg_quadratic(x_alpha) * (1 + 1e-12)


def test_theorem5_winner_depends_on_initialisation_and_global_value_is_max_diagonal():
    x_alpha, lam = _x_alpha_and_top_eigenvalue(8)
    winners = set()
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        w1 = torch.rand(1, D, dtype=DT, generator=g)
        run = T.relu2_flow(w1 / w1.norm(), torch.ones(1, 1, dtype=DT), x_alpha, steps=1500, lr=0.2 / lam, record_every=1500)
        winners.add(int(run.w1.argmax()))
    assert len(winners) >= 2, winners  # local maxima: not always the best component
    # The bound max_{u ≥ 0, |u| = 1} uᵀXu = max_m X_mm, checked on random feasible points.
    u = torch.rand(2000, D, dtype=DT, generator=torch.Generator().manual_seed(9))
    u = u / u.norm(dim=1, keepdim=True)
    assert float(((u @ x_alpha) * u).sum(1).max()) <= T.max_nonneg_quadratic(x_alpha)


@pytest.mark.parametrize("seed", range(3))
def test_proposition_a_cooperating_nodes_collapse_to_rank_one(seed):
    x_alpha, lam = _x_alpha_and_top_eigenvalue(10)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.rand(NODES, D, dtype=DT, generator=g)
    w2 = 1 + 0.5 * torch.rand(5, NODES, dtype=DT, generator=g)  # B = W_2ᵀW_2 entrywise > 0
    run = _frobenius_flow(w1, w2, x_alpha, steps=4000, lr=0.05 / lam, train_w2=False)
    u = torch.relu(run.w1)
    m = int(u.sum(0).argmax())
    assert torch.all(T.row_concentration(run.w1) > 1 - 1e-9)
    assert torch.all(u.argmax(1) == m)  # every node on the same component
    s = torch.linalg.svdvals(u)
    assert float(s[1] / s[0]) < 1e-8  # W_1 = v e_mᵀ
    # v is the Perron vector of B, and E = ½ X_mm vᵀBv = ½ X_mm λ_max(B).
    b = run.w2.T @ run.w2
    v = u[:, m] / u[:, m].norm()
    evals, evecs = torch.linalg.eigh(b)
    assert abs(float(v @ evecs[:, -1])) > 1 - 1e-9
    assert abs(run.objective[-1] - 0.5 * float(x_alpha[m, m] * evals[-1])) < 1e-9 * lam


def test_proposition_a_global_bound_for_nonnegative_b():
    x_alpha = _uniform_x_alpha(11)
    g = torch.Generator().manual_seed(12)
    w2 = torch.rand(5, 6, dtype=DT, generator=g)
    lam_b = float(torch.linalg.eigvalsh(w2.T @ w2)[-1])
    bound = 0.5 * T.max_nonneg_quadratic(x_alpha) * lam_b
    for _ in range(300):
        w1 = torch.randn(6, D, dtype=DT, generator=g)
        assert float(T.relu2_objective(w1 / w1.norm(), w2, x_alpha)) <= bound * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_proposition_b_decoupled_nodes_each_pick_their_own_component(seed):
    x_alpha, lam = _x_alpha_and_top_eigenvalue(13)
    g = torch.Generator().manual_seed(seed)
    k = NODES
    w1 = torch.randn(k, D, dtype=DT, generator=g).abs()
    w1 = w1 / w1.norm(dim=1, keepdim=True)
    w2, _ = torch.linalg.qr(torch.randn(10, k, dtype=DT, generator=g))  # B = I
    steps, lr = 3000, 0.2 / lam
    run = T.relu2_flow(w1, w2, x_alpha, steps=steps, lr=lr, train_w2=False, w1_norm="row", record_every=steps)
    assert torch.all(T.row_concentration(run.w1) > 1 - 1e-12)
    picks = run.w1.argmax(1)
    # Exact decoupling: each row ends where Theorem 5's single-node flow from that row ends.
    for row in range(k):
        alone = T.relu2_flow(w1[row : row + 1], torch.ones(1, 1, dtype=DT), x_alpha, steps=steps, lr=lr, record_every=steps)
        torch.testing.assert_close(run.w1[row], alone.w1[0], rtol=0, atol=1e-12)
    distinct = len(set(picks.tolist()))
    s = torch.linalg.svdvals(torch.relu(run.w1))
    assert distinct >= 2 and int((s > 1e-6 * s[0]).sum()) == distinct  # rank(W_1) = #components picked > 1
    expected = 0.5 * sum(float(x_alpha[m, m]) for m in picks.tolist())
    assert abs(run.objective[-1] - expected) < 1e-9 * lam * k


@pytest.mark.parametrize("seed", range(2))
def test_joint_training_collapses_to_rank_one_with_rank_one_w2tw2(seed):
    """Measured outcome (not a theorem): W_2 trained too, both layers Frobenius-normalised."""
    x_alpha, lam = _x_alpha_and_top_eigenvalue(14)
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(NODES, D, dtype=DT, generator=g)
    w2 = torch.randn(5, NODES, dtype=DT, generator=g)
    run = _frobenius_flow(w1, w2, x_alpha, steps=6000, lr=0.05 / lam)
    u = torch.relu(run.w1)
    s = torch.linalg.svdvals(u)
    assert float(s[1] / s[0]) < 1e-6
    live = u.sum(1) > 1e-6 * float(u.max())
    assert int(u[live].argmax(1).unique().numel()) == 1
    sb = torch.linalg.svdvals(run.w2)
    assert float(sb[1] / sb[0]) < 1e-6  # W_2ᵀW_2 = v vᵀ (up to scale)


def test_theorem6_every_rank_one_local_optimum_in_theta_is_v_em_unlike_the_linear_net(gen):
    """Theorem 6 as the paper states it: a local optimum (W_2, W_1) ∈ Θ with E > 0 has W_1 = v e_mᵀ
    (v ≥ 0) or rank(W_1) > 1. Joint projected ascent in Θ from fresh random starts; each end
    point is checked to be a local optimum (stationary in Θ, and no nearby point of Θ is better).
    The linear net z = W_2 W_1 x from the same starts ends at W_1 = v v_0ᵀ, v_0 the top
    eigenvector of X_α, which is not an e_m: the ReLU is what makes the rank-1 optima axis-aligned."""
    x1, x2, _ = T.orthogonal_mixture(96, torch.linspace(2.0, 1.0, D).tolist(), aug_std=0.1, generator=gen)
    m = 2 * x1.shape[0]
    x_alpha = T.contrastive_covariance(x1, x2, T.negative_mask(m).to(DT) / (m - 2))
    evals, evecs = torch.linalg.eigh(x_alpha)
    lam, v0 = float(evals[-1]), evecs[:, -1]
    assert float(v0.abs().max()) < 0.99  # the linear optimum's direction is not an axis
    k, out, starts, steps = 6, 5, 8, 1000
    rank_one = 0
    for _ in range(starts):
        w1 = torch.randn(k, D, dtype=DT, generator=gen)
        w2 = torch.randn(out, k, dtype=DT, generator=gen)
        w1, w2 = w1 / w1.norm(), w2 / w2.norm()
        run = T.relu2_flow(w1, w2, x_alpha, steps=steps, lr=0.3 / lam, record_every=steps)
        e = run.objective[-1]
        assert e > 0
        assert T.relu2_stationarity(run.w1, run.w2, x_alpha) < 1e-9
        for _ in range(50):  # no point of Θ nearby does better: a local optimum, not a saddle
            a = run.w1 + 1e-3 * torch.randn(k, D, dtype=DT, generator=gen)
            b = run.w2 + 1e-3 * torch.randn(out, k, dtype=DT, generator=gen)
            assert float(T.relu2_objective(a / a.norm(), b / b.norm(), x_alpha)) <= e + 1e-9 * lam
        rank, component = T.rank_one_component(run.w1)
        if rank == 1:
            rank_one += 1
            assert component is not None, "a rank-1 local optimum must be v e_mᵀ"
            assert float(run.w1.min()) > -1e-9  # v ≥ 0: the negative entries have decayed away
            torch.testing.assert_close(torch.tensor(e, dtype=DT), 0.5 * x_alpha[component, component]
                                       * torch.linalg.eigvalsh(run.w2.T @ run.w2)[-1], rtol=1e-9, atol=0)
            assert e < 0.5 * lam * (1 - 1e-6)  # below the linear optimum
        else:
            assert rank > 1
        # The linear flow reaches v_0 at a rate set by X_α's eigengap, which a random draw can
        # make small (draws left 1 − cos = 8e-8 after 1000 steps and 2.7e-9 after 3000): it runs
        # in blocks of 1000 steps until aligned, within a budget that only a non-convergent flow exhausts.
        ws = [w1, w2]
        for _ in range(30):
            linear = T.deep_linear_flow(ws, x_alpha, steps=steps, lr=0.3 / lam, record_every=steps)
            ws = linear.ws
            s = torch.linalg.svd(ws[0])
            if float(s.S[1] / s.S[0]) < 1e-8 and abs(float(s.Vh[0] @ v0)) > 1 - 1e-9:
                break
        assert float(s.S[1] / s.S[0]) < 1e-8  # linear: rank 1 too (Theorem 3) ...
        assert abs(float(s.Vh[0] @ v0)) > 1 - 1e-9  # ... but along v_0, not along an e_m
        assert abs(linear.objective[-1] - lam / 2) < 1e-9 * lam
    assert rank_one >= 1, "no rank-1 optimum was found: the statement was not exercised"

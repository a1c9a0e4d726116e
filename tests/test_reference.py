"""The dense reference against the maths of docs/design.md: closed forms, an independent naive
implementation, the paper's theorems, and the gradient formula the fused kernels implement."""
import math

import numpy as np
import pytest
import torch

import fastalpha
from fastalpha import reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, loss_scale

import naive
from test_backends import DEFAULT_RULE_CASES

F64 = torch.float64
# (rule, extra parameters) cases that exercise every parameter of every rule.
RULE_CASES = DEFAULT_RULE_CASES + [
    ("entropy", {"temperature": 0.2}),
    ("entropy", {"temperature": 0.3, "eps": 0.7}),
    ("direct", {"p": 3.0, "eps": 0.3, "temperature": 0.7}),
    ("inverse", {"gamma": 0.5, "temperature": 1.3}),
    ("square", {"temperature": 0.3}),
    ("infonce", {"eps": 0.0, "temperature": 0.1}),
]
SHAPES = [(2, 3), (5, 7), (9, 24)]


def views(gen, n, d, dtype=F64, scale=1.0):
    return (scale * torch.randn(n, d, generator=gen, dtype=dtype), scale * torch.randn(n, d, generator=gen, dtype=dtype))


def _naive_kwargs(rule, extra):
    spec = make_spec(rule, **extra)
    return dict(rule=rule, tau=spec.temperature, p=spec.p, gamma=spec.gamma, eps=spec.eps)


@pytest.mark.parametrize("rule,extra", RULE_CASES)
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_value_and_alpha_match_naive_oracle(gen, rule, extra, n, d, normalize):
    z1, z2 = views(gen, n, d, scale=0.6)
    rows = fastalpha.alpha_cl_loss(z1, z2, rule=rule, normalize=normalize, reduction="none", backend="eager", **extra)
    expected = naive.loss_rows(z1.numpy(), z2.numpy(), normalize=normalize, **_naive_kwargs(rule, extra))
    assert_close(rows, torch.from_numpy(expected), "float64", f"{rule} loss rows")
    alpha = fastalpha.pair_weights(z1, z2, rule=rule, normalize=normalize, **extra)
    expected_alpha = naive.alpha_matrix(z1.numpy(), z2.numpy(), normalize=normalize, **_naive_kwargs(rule, extra))
    # The naive square threshold comes from bisection: exact to ~1e-15 after 200 halvings.
    assert_close(alpha, torch.from_numpy(expected_alpha), "float64", f"{rule} alpha")


def test_reductions(gen):
    z1, z2 = views(gen, 6, 5)
    rows = fastalpha.alpha_cl_loss(z1, z2, reduction="none", backend="eager")
    assert rows.shape == (12,)
    assert_close(fastalpha.alpha_cl_loss(z1, z2, reduction="mean", backend="eager"), rows.mean(), "float64")
    assert_close(fastalpha.alpha_cl_loss(z1, z2, reduction="sum", backend="eager"), rows.sum(), "float64")


@pytest.mark.parametrize("rule", RULES)
def test_all_equal_embeddings(rule):
    """Every d2 is 0: α is uniform 1/(M−2) (ε = 0), the energy loss is 0, infonce is log(ε + M − 2)."""
    n, d = 4, 3
    z = torch.tensor([[0.3, -1.2, 0.5]], dtype=F64).expand(n, d)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend="eager")
    m = 2 * n
    params = make_spec(rule)
    expected = math.log(params.eps + m - 2) if rule == "infonce" else 0.0
    assert abs(loss.item() - expected) < 1e-12
    alpha = fastalpha.pair_weights(z1, z2, rule=rule)
    uniform = (1 - torch.eye(m, dtype=F64)) * (1 - torch.roll(torch.eye(m, dtype=F64), n, 1))
    uniform = uniform / (m - 2) * ((m - 2) / (params.eps + m - 2) if rule == "infonce" else 1.0)
    assert_close(alpha, uniform, "float64", "alpha")
    loss.backward()
    # All rows coincide: every pair difference z_k − z_j is 0, so the gradient is 0.
    assert z1.grad.abs().max() < 1e-12 and z2.grad.abs().max() < 1e-12


def _two_cluster_expected(rule, tau, eps):
    """Row of z1 = [e1, e1, e2, e2] = z2: 2 negatives at d2 = 0, 4 at d2 = 1, positive at 0."""
    if rule == "infonce":
        return math.log(eps + 2 + 4 * math.exp(-1 / tau))
    if rule == "quadratic":
        near, far = 1 / 6, 1 / 6
    elif rule in ("entropy", "direct"):  # d2 ∈ {0, 1}: d2^{p/2} = d2, so both are a softmax of −d2/τ
        near, far = 1 / (2 + 4 * math.exp(-1 / tau)), math.exp(-1 / tau) / (2 + 4 * math.exp(-1 / tau))
    elif rule == "inverse":
        wn, wf = tau ** -0.5, (1 + tau) ** -0.5
        near, far = wn / (2 * wn + 4 * wf), wf / (2 * wn + 4 * wf)
    elif rule == "square" and tau == 5.0:
        near, far = 0.3, 0.1  # μ = (5 + 4)/6 = 1.5 with the whole row in the support
    elif rule == "square" and tau == 0.5:
        near, far = 0.5, 0.0  # μ = 0.25: only the two d2 = 0 negatives are in the support
    return 2 * near * 0 + 4 * far * (0 - 1)


@pytest.mark.parametrize("rule,tau", [(r, None) for r in RULES] + [("square", 0.5)])
def test_two_orthogonal_clusters(rule, tau):
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    z1 = torch.tensor([e1, e1, e2, e2], dtype=F64)
    params = make_spec(rule, temperature=tau)
    rows = fastalpha.alpha_cl_loss(z1, z1.clone(), rule=rule, temperature=tau, reduction="none", backend="eager")
    expected = _two_cluster_expected(rule, params.temperature, params.eps)
    assert torch.allclose(rows, torch.full_like(rows, expected), rtol=0, atol=1e-14), (rows, expected)


@pytest.mark.parametrize("rule", RULES)
def test_m_equals_4(gen, rule):
    """N = 2: each anchor has exactly two negatives; α in closed form from the two distances."""
    z1, z2 = views(gen, 2, 5)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    params = make_spec(rule)
    tau = params.temperature
    alpha = fastalpha.pair_weights(z1, z2, rule=rule)
    for i in range(4):
        j, k = [c for c in range(4) if c not in (i, (i + 2) % 4)]
        dj, dk = [0.5 * (z[i] - z[c]).pow(2).sum().item() for c in (j, k)]
        dp = 0.5 * (z[i] - z[(i + 2) % 4]).pow(2).sum().item()
        if rule == "quadratic":
            aj = ak = 0.5
        elif rule == "entropy":
            aj, ak = 1 / (1 + math.exp((dj - dk) / tau)), 1 / (1 + math.exp((dk - dj) / tau))
        elif rule == "direct":
            wj, wk = math.exp(-dj**2 / tau), math.exp(-dk**2 / tau)
            aj, ak = wj / (wj + wk), wk / (wj + wk)
        elif rule == "inverse":
            wj, wk = (dj + tau) ** -0.5, (dk + tau) ** -0.5
            aj, ak = wj / (wj + wk), wk / (wj + wk)
        elif rule == "square":  # two-point sparsemax of −d2/τ
            aj = min(1.0, max(0.0, 0.5 + (dk - dj) / (2 * tau)))
            ak = 1 - aj
        else:
            ej, ek = math.exp((dp - dj) / tau), math.exp((dp - dk) / tau)
            aj, ak = ej / (params.eps + ej + ek), ek / (params.eps + ej + ek)
        assert abs(alpha[i, j].item() - aj) < 1e-13 and abs(alpha[i, k].item() - ak) < 1e-13
        assert alpha[i, i] == 0 and alpha[i, (i + 2) % 4] == 0


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("tau", [0.5, 0.07])
def test_infonce_eps1_is_simclr_nt_xent(gen, n, d, tau):
    z1, z2 = views(gen, n, d)
    loss = fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=tau, eps=1.0, backend="eager")
    # SimCLR NT-Xent: cosine logits, self masked out, the partner is the target class.
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / tau
    logits.fill_diagonal_(-math.inf)
    target = (torch.arange(2 * n) + n) % (2 * n)
    # A loss near 0 (τ = 0.07, few negatives) is a difference of logits of size 1/τ: the
    # tolerance follows those terms, not the result.
    scale = loss_scale(z, make_spec("infonce", temperature=tau))
    assert_close(loss, torch.nn.functional.cross_entropy(logits, target), "float64", "NT-Xent", scale=scale)
    decoupled = fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=tau, eps=0.0, backend="eager")
    pos = logits.gather(1, target[:, None])[:, 0]
    logits.scatter_(1, target[:, None], -math.inf)
    assert_close(decoupled, (torch.logsumexp(logits, 1) - pos).mean(), "float64", "decoupled", scale=scale)


@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("n,d", SHAPES)
def test_theorem1_infonce_gradient_is_energy_gradient(gen, eps, n, d):
    """∇ L_nce = −∇E_{sg(α)} / (Mτ) with α from Eqn. 4, unnormalised inputs, to 1e-12."""
    tau = 0.4
    z1, z2 = views(gen, n, d)
    z1.requires_grad_(), z2.requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=tau, eps=eps, normalize=False, backend="eager")
    g_loss = torch.autograd.grad(loss, (z1, z2))
    alpha = fastalpha.pair_weights(z1, z2, rule="infonce", temperature=tau, eps=eps, normalize=False)
    g_energy = torch.autograd.grad(fastalpha.energy(z1, z2, alpha), (z1, z2))
    m = 2 * n
    for a, b in zip(g_loss, g_energy):
        assert (a + b / (m * tau)).abs().max().item() < 1e-12


@pytest.mark.parametrize("rule", [r for r in RULES if r != "infonce"])
def test_energy_loss_is_negative_energy(gen, rule):
    """For the α-CL rules, mean loss = −E_α / M and (α stop-gradient) ∇loss = −∇E_{sg α} / M."""
    z1, z2 = views(gen, 5, 4)
    z1.requires_grad_(), z2.requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, normalize=False, backend="eager")
    alpha = fastalpha.pair_weights(z1, z2, rule=rule, normalize=False)
    e = fastalpha.energy(z1, z2, alpha)
    assert abs(loss.item() + e.item() / 10) < 1e-13
    for a, b in zip(torch.autograd.grad(loss, (z1, z2)), torch.autograd.grad(e, (z1, z2))):
        assert (a + b / 10).abs().max().item() < 1e-13


def _row_distances(z1, z2):
    z = torch.cat([z1, z2])
    m = z.shape[0]
    d2 = 0.5 * torch.cdist(z, z).pow(2)
    return z, m, d2


def test_theorem2_entropy_alpha_minimises_regularised_energy(gen):
    """α_i = argmin over the simplex of Σ_j α_ij d2_ij − τ H(α_i): KKT and a scipy solve."""
    from scipy.optimize import minimize

    tau = 0.5
    z1, z2 = views(gen, 4, 3)
    z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    alpha = fastalpha.pair_weights(z1, z2, rule="entropy", temperature=tau, normalize=False)
    z, m, d2 = _row_distances(z1, z2)
    for i in range(m):
        neg = naive.negatives(i, m)
        a, d = alpha[i, neg].numpy(), d2[i, neg].numpy()
        # Stationarity on the simplex interior: ∂/∂α_j (α·d + τ Σ α log α) = d_j + τ(log α_j + 1) is constant.
        stationarity = d + tau * (np.log(a) + 1)
        assert np.ptp(stationarity) < 1e-12
        objective = lambda x: float(x @ d + tau * np.sum(x * np.log(np.clip(x, 1e-300, None))))
        res = minimize(objective, np.full(len(d), 1 / len(d)), method="SLSQP", bounds=[(1e-12, 1)] * len(d),
                       constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}], options={"ftol": 1e-14, "maxiter": 500})
        assert np.abs(res.x - a).max() < 1e-5
        assert objective(a) <= res.fun + 1e-12


@pytest.mark.parametrize("eps", [0.3, 1.0])
def test_theorem2_infonce_alpha_minimises_regularised_energy(gen, eps):
    """InfoNCE's α with ε > 0 is the entropy solution on the simplex extended by a slack
    α_0 = 1 − A_i of cost −τ log ε: −v_j + τ log α_j and −τ log ε + τ log α_0 are all equal."""
    tau = 0.5
    z1, z2 = views(gen, 4, 3)
    z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
    alpha = fastalpha.pair_weights(z1, z2, rule="infonce", temperature=tau, eps=eps, normalize=False)
    z, m, d2 = _row_distances(z1, z2)
    for i in range(m):
        neg = naive.negatives(i, m)
        a = alpha[i, neg].numpy()
        v = (d2[i, (i + m // 2) % m] - d2[i, neg]).numpy()
        slack = 1 - a.sum()
        conditions = np.concatenate([-v + tau * np.log(a), [-tau * math.log(eps) + tau * math.log(slack)]])
        assert np.ptp(conditions) < 1e-12


@pytest.mark.parametrize("tau", [0.05, 0.5, 5.0])
def test_square_alpha_is_sparsemax(gen, tau):
    """On the simplex; support: d2_ij + τ α_ij = μ_i; off support: d2_ij ≥ μ_i (the KKT conditions)."""
    z1, z2 = views(gen, 7, 4)
    alpha = fastalpha.pair_weights(z1, z2, rule="square", temperature=tau)
    z, m, d2 = _row_distances(torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1))
    assert (alpha >= 0).all()
    assert_close(alpha.sum(1), torch.ones(m, dtype=F64), "float64", "row sums")
    for i in range(m):
        neg = torch.tensor(naive.negatives(i, m))
        a, d = alpha[i, neg], d2[i, neg]
        support = a > 0
        mu = (d[support] + tau * a[support])
        assert mu.max() - mu.min() < 1e-12
        assert (d[~support] >= mu.mean() - 1e-12).all()
    if tau == 0.05:
        assert (alpha == 0).sum() > 2 * m, "a small τ must give sparse rows"


def test_inverse_alpha_is_normalised_power(gen):
    gamma, tau = 1.7, 0.3
    z1, z2 = views(gen, 5, 6)
    alpha = fastalpha.pair_weights(z1, z2, rule="inverse", temperature=tau, gamma=gamma)
    z, m, d2 = _row_distances(torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1))
    mask = reference.negative_mask(m)
    w = torch.where(mask, (d2 + tau) ** (-1 / gamma), torch.zeros_like(d2))
    assert_close(alpha, w / w.sum(1, keepdim=True), "float64", "inverse alpha")


@pytest.mark.parametrize("rule,extra", RULE_CASES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("unit_rows", [False, True])
@pytest.mark.parametrize("rows", [None, (3, 11)])
def test_closed_form_gradient_equals_autograd(gen, rule, extra, detach_alpha, unit_rows, rows):
    """The closed-form gradient (A, C, ωZ, ωᵀZ, β) equals autograd, with row weights and row
    ranges; for unit rows (d2 = 1 − z_i·z_j) the terms in z_i itself drop out."""
    n, d = 7, 5
    z = torch.randn(2 * n, d, generator=gen, dtype=F64)
    if unit_rows:
        z = torch.nn.functional.normalize(z, dim=1)
    spec = make_spec(rule, **extra, normalize=unit_rows, detach_alpha=detach_alpha)
    lo, hi = rows or (0, 2 * n)
    weight = torch.rand(hi - lo, generator=gen, dtype=F64) + 0.5
    leaf = z.clone().requires_grad_()
    value = reference.loss_rows(leaf, spec, lo, hi)
    (expected,) = torch.autograd.grad((value * weight).sum(), leaf)
    got_rows, got = reference.closed_form_gradient(z, spec, weight, lo, hi)
    assert_close(got_rows, value, "float64", "loss rows")
    assert_close(got, expected, "float64", f"{rule} gradient (detach_alpha={detach_alpha}, unit_rows={unit_rows})")


@pytest.mark.parametrize("tau", [0.3, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.4, 2.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_entropy_is_direct_with_p2_and_eps(gen, tau, eps, normalize):
    """`entropy` is `direct` with p = 2, ε included: equal to each other and to the naive
    loops of both (the naive entropy branch is written without p, as a softmax plus ε)."""
    z1, z2 = views(gen, 5, 4, scale=0.8)
    kwargs = dict(temperature=tau, eps=eps, normalize=normalize, reduction="none", backend="eager")
    entropy = fastalpha.alpha_cl_loss(z1, z2, rule="entropy", **kwargs)
    direct = fastalpha.alpha_cl_loss(z1, z2, rule="direct", p=2.0, **kwargs)
    assert_close(entropy, direct, "float64", "entropy vs direct p=2")
    for rule in ("entropy", "direct"):
        expected = naive.loss_rows(z1.numpy(), z2.numpy(), rule, tau, p=2.0, eps=eps, normalize=normalize)
        assert_close(entropy, torch.from_numpy(expected), "float64", f"entropy vs naive {rule}")
    if eps > 0:  # ε must change the value (a rule that ignored ε would agree with ε = 0)
        without = naive.loss_rows(z1.numpy(), z2.numpy(), "entropy", tau, eps=0.0, normalize=normalize)
        assert np.abs(entropy.numpy() - without).max() > 1e-3 * np.abs(without).max()


def test_entropy_eps_fixed_input():
    """Hand-checkable: one anchor row's α with ε is e^{−d/τ} / (Σ e^{−d/τ} + ε (M − 2))."""
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    z1 = torch.tensor([e1, e2], dtype=F64)
    z2 = torch.tensor([e1, e1], dtype=F64)
    # M = 4. Row 0 (e1): partner e1 (d2_i = 0), negatives z1[1] = e2 (d2 = 1), z2[1] = e1 (d2 = 0).
    tau, eps = 0.5, 2.0
    rows = fastalpha.alpha_cl_loss(z1, z2, rule="entropy", temperature=tau, eps=eps, reduction="none", backend="eager")
    w_far, w_near = math.exp(-1 / tau), 1.0
    expected_row0 = (w_far * (0 - 1) + w_near * 0) / (w_far + w_near + eps * 2)
    assert abs(rows[0].item() - expected_row0) < 1e-14


@pytest.mark.parametrize("rule", RULES)
def test_detach_changes_gradient_not_value(gen, rule):
    z1, z2 = views(gen, 6, 4)
    grads, values = [], []
    for detach in (True, False):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        loss = fastalpha.alpha_cl_loss(a, b, rule=rule, detach_alpha=detach, backend="eager")
        loss.backward()
        values.append(loss.item())
        grads.append(torch.cat([a.grad, b.grad]))
    assert values[0] == values[1]
    difference = (grads[0] - grads[1]).abs().max().item()
    if rule in ("quadratic", "infonce"):
        assert difference < 1e-14  # α constant / Theorem 1: the two gradients coincide
    else:
        assert difference > 1e-6


@pytest.mark.parametrize("rule", RULES)
def test_float32_reference_tracks_float64(gen, rule):
    z1, z2 = (v.float() for v in views(gen, 9, 24))
    got = fastalpha.alpha_cl_loss(z1, z2, rule=rule, reduction="none", backend="eager")
    assert got.dtype == torch.float32
    expected = fastalpha.alpha_cl_loss(z1.double(), z2.double(), rule=rule, reduction="none", backend="eager")
    # Per-anchor losses of independent views are differences of O(1) distances: the error
    # follows the size of those terms (fastalpha.testing.loss_scale), not the result.
    assert_close(got, expected, "float32", rule, scale=loss_scale(torch.cat([z1, z2]), make_spec(rule)))


def test_energy_and_covariance(gen):
    """E_α = ½ tr C_α[z, z]; C_α[a, b] against its defining double sum; E against its definition."""
    n = 4
    z1, z2 = views(gen, n, 3)
    b1, b2 = views(gen, n, 2)
    alpha = torch.rand(2 * n, 2 * n, generator=gen, dtype=F64)
    cov = fastalpha.contrastive_covariance(z1, z2, alpha)
    e = fastalpha.energy(z1, z2, alpha)
    assert abs(0.5 * torch.trace(cov).item() - e.item()) < 1e-12
    a, b = torch.cat([z1, z2]), torch.cat([b1, b2])
    m = 2 * n
    expected_cov = torch.zeros(3, 2, dtype=F64)
    expected_e = 0.0
    for i in range(m):
        p = (i + n) % m
        a_i = sum(alpha[i, j] for j in naive.negatives(i, m))
        for j in naive.negatives(i, m):
            expected_cov += alpha[i, j] * torch.outer(a[i] - a[j], b[i] - b[j])
            expected_e += alpha[i, j].item() * 0.5 * (a[i] - a[j]).pow(2).sum().item()
        expected_cov -= a_i * torch.outer(a[i] - a[p], b[i] - b[p])
        expected_e -= a_i.item() * 0.5 * (a[i] - a[p]).pow(2).sum().item()
    assert_close(fastalpha.contrastive_covariance(z1, z2, alpha, b1, b2), expected_cov, "float64", "C_alpha[a,b]")
    assert abs(e.item() - expected_e) < 1e-12


def test_pair_weights_structure(gen):
    z1, z2 = views(gen, 5, 3)
    for rule in RULES:
        alpha = fastalpha.pair_weights(z1, z2, rule=rule)
        assert alpha.shape == (10, 10) and not alpha.requires_grad
        assert (alpha.diagonal() == 0).all() and (torch.roll(alpha, -5, 1).diagonal() == 0).all()
    direct_eps = fastalpha.pair_weights(z1, z2, rule="direct", eps=0.5)
    assert (direct_eps.sum(1) < 1).all()

"""Group-defined positives (labels, more than two views) against the float64 references.

The definition (docs/design.md, "Positive sets"): P_i = the other rows of i's group, J_i = the
rows of the other groups, the rules see the mean positive distance d̄2_i, infonce keeps its
positives in the denominator (ε-weighted). Checked here, each against something it does not
share code with:

* the dense reference (`reference.grouped_loss_rows`) against the loops of tests/naive.py,
  and its autograd gradient against central differences of the loops;
* the closed-form gradient (the eager backend) against autograd of the reference;
* every backend through the public API (labels of length N and M, V = 3 views, every rule
  and option, singletons, odd N) against autograd of the float64 reference;
* `fastalpha.SupConLoss` against pytorch-metric-learning's `SupConLoss`;
* the edge cases (one label, all labels distinct) and the errors for bad input.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastalpha
from fastalpha import dispatch, reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

import naive
from test_backends import DEFAULT_RULE_CASES, _backend as available_backend, _case_id

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]

#: (rule, parameters): every rule, and the ε of the rules that have one.
CASES = DEFAULT_RULE_CASES + [
    ("entropy", {"eps": 0.5, "temperature": 0.2}),
    ("direct", {"p": 3.0, "eps": 0.3}),
    ("infonce", {"eps": 0.0, "temperature": 0.1}),
    ("infonce", {"eps": 2.0, "temperature": 0.3}),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(name, device) of an available backend (skipped, with the reason, otherwise)."""
    return available_backend(request.param)


def labels_with_singletons(gen, m, classes):
    """Labels of m rows from `classes` classes, with one label that occurs exactly once."""
    labels = torch.randint(0, classes, (m,), generator=gen)
    labels[torch.randint(0, m, (1,), generator=gen)] = classes + 7
    return labels


def stacked_groups(labels, n, views):
    return labels.repeat(views) if labels is not None and labels.shape[0] == n and views > 1 else (
        labels if labels is not None else torch.arange(n).repeat(views))


def expected(views, labels, spec, reduction="mean", weight=None):
    """Float64 reference value and per-view gradients of Σ weight · loss, by autograd."""
    leaves = [v.detach().cpu().to(F64).requires_grad_() for v in views]
    groups = stacked_groups(None if labels is None else labels.cpu(), views[0].shape[0], len(views))
    value = reference.grouped_alpha_cl_loss(leaves, groups, spec, reduction)
    objective = value.sum() if weight is None else (value * weight.cpu().to(F64)).sum()
    return value.detach(), torch.autograd.grad(objective, leaves)


def check_backend(name, device, views, labels, rule, extra, normalize=True, detach_alpha=True, reduction="mean",
                  gen=None, as_tensor=False):
    spec = make_spec(rule, **extra, normalize=normalize, detach_alpha=detach_alpha)
    leaves = [v.clone().requires_grad_() for v in views]
    inputs = torch.stack(leaves) if as_tensor else (leaves if len(leaves) != 1 else leaves[0])
    value = fastalpha.alpha_cl_loss(inputs, rule=rule, normalize=normalize, detach_alpha=detach_alpha,
                                    reduction=reduction, backend=name, labels=labels, **extra)
    assert value.dtype == views[0].dtype
    weight = None
    if reduction == "none":
        weight = torch.randn(value.shape, generator=gen, dtype=F64).to(device=device, dtype=value.dtype)
    grads = torch.autograd.grad(value if weight is None else (value * weight).sum(), leaves)
    exp_value, exp_grads = expected(views, labels, spec, reduction, weight)
    precision = precision_of(views[0].dtype)
    stacked = torch.cat(views).cpu()
    m = stacked.shape[0]
    what = f"{name} {rule} V={len(views)} labels={'none' if labels is None else labels.shape[0]}"
    rows = m if reduction == "sum" else 1
    assert_close(value, exp_value, precision, f"{what} loss", scale=loss_scale(stacked, spec, rows))
    anchor_weight = {"mean": 1.0, "sum": 1.0}.get(reduction, None if weight is None else weight.abs().max().item())
    g_scale = grad_scale(stacked, spec, anchor_weight)
    for k, (got, want) in enumerate(zip(grads, exp_grads)):
        assert_close(got, want, precision, f"{what} grad of view {k}", scale=g_scale)


def random_views(gen, views, n, d, dtype=F64, device="cpu"):
    base = torch.randn(n, d, generator=gen, dtype=F64)
    out = [base + torch.randn(n, d, generator=gen, dtype=F64) for _ in range(views)]
    return [v.to(device=device, dtype=dtype) for v in out]


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("eps", [None, 0.4])
def test_reference_matches_naive_loops(gen, rule, normalize, eps):
    """The dense reference against the loops of tests/naive.py: labels with a singleton, odd M."""
    m, d = 13, 4
    z = torch.randn(m, d, generator=gen, dtype=F64)
    labels = labels_with_singletons(gen, m, 4)
    spec = make_spec(rule, eps=eps, normalize=normalize)
    zz = torch.nn.functional.normalize(z, dim=1) if normalize else z
    got = reference.grouped_loss_rows(zz, spec, labels)
    want = naive.grouped_loss_rows(z.numpy(), labels.numpy(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                   normalize)
    assert_close(got, torch.from_numpy(want), "float64", f"{rule} rows")
    singleton = (labels[:, None] == labels[None, :]).sum(1) == 1
    assert singleton.any() and (got[singleton] == 0).all()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradient_matches_central_differences_of_the_loops(gen, rule, normalize):
    """autograd of the reference (α stop-gradient) = d/dz of the loops' loss with α held fixed.

    With α detached the gradient is that of the energy at fixed α; for infonce it is the true
    gradient (Theorem 1), so there the loops' loss is differentiated directly. Both cases are
    computed by central differences of naive loops, not by fastalpha.
    """
    m, d = 9, 3
    z = torch.randn(m, d, generator=gen, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1])
    spec = make_spec(rule, normalize=normalize, detach_alpha=rule != "square")
    leaf = z.clone().requires_grad_()
    zz = torch.nn.functional.normalize(leaf, dim=1) if normalize else leaf
    got, = torch.autograd.grad(reference.grouped_loss_rows(zz, spec, labels).sum(), leaf)

    def loss(x):
        return naive.grouped_loss_rows(x, labels.numpy(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                       normalize).sum()
    if spec.detach_alpha and rule != "infonce":
        # α at the base point, held fixed: the energy form Σ_j α_ij (d̄2_i − d2_ij).
        alpha = reference.alpha_from_distances(*_distances(z, labels, normalize), spec)

        def loss(x):  # noqa: F811 (the fixed-α objective replaces the plain loss)
            d2, d2_pos, mask = _distances(torch.from_numpy(x), labels, normalize)
            has_positive = (labels[:, None] == labels[None, :]).sum(1) > 1
            return float(((alpha * (d2_pos[:, None] - d2)).sum(1) * has_positive).sum())
    want = naive.numerical_gradient(loss, z.numpy())
    assert np.allclose(got.numpy(), want, rtol=1e-6, atol=1e-7), np.abs(got.numpy() - want).max()


def _distances(z, labels, normalize):
    """(d2, d̄2, J mask) of every row, for the fixed-α objective above."""
    d2 = torch.from_numpy(naive.distances(z.numpy(), normalize))
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool)
    d2_pos = (d2 * positive).sum(1) / positive.sum(1).clamp_min(1)
    return d2, d2_pos, ~same


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_closed_form_matches_autograd(gen, case, detach_alpha, normalize):
    """The eager backend's closed form, row ranges and weights included, against autograd."""
    rule, extra = case
    spec = make_spec(rule, **extra, normalize=normalize, detach_alpha=detach_alpha)
    m = 15
    z = torch.randn(m, 5, generator=gen, dtype=F64)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1)
    labels = labels_with_singletons(gen, m, 4)
    lo, hi = 3, 12
    w = torch.rand(hi - lo, generator=gen, dtype=F64)
    leaf = z.clone().requires_grad_()
    rows = reference.grouped_loss_rows(leaf, spec, labels, lo, hi)
    want, = torch.autograd.grad((rows * w).sum(), leaf)
    got_rows, got = reference.grouped_closed_form_gradient(z, spec, labels, w, lo, hi)
    assert_close(got_rows, rows.detach(), "float64", "rows")
    assert_close(got, want, "float64", "gradient")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
def test_two_views_as_groups_equal_the_partner_path(gen, rule, normalize):
    """Groups k mod N of two views are the SimCLR sets: same rows and gradient as the partner path."""
    spec = make_spec(rule, normalize=normalize)
    z = torch.randn(14, 4, generator=gen, dtype=F64)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1)
    groups = torch.arange(7).repeat(2)
    assert_close(reference.grouped_loss_rows(z, spec, groups), reference.loss_rows(z, spec), "float64", "rows")
    assert_close(reference.grouped_closed_form_gradient(z, spec, groups)[1], reference.closed_form_gradient(z, spec)[1],
                 "float64", "gradient")


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_labels_every_rule_matches_reference(backend, gen, case, detach_alpha, normalize):
    """Two views with per-sample labels (a singleton among them), float64, odd N."""
    name, device = backend
    rule, extra = case
    n = 9 if name == "triton" else 11
    views = random_views(gen, 2, n, 5, device=device)
    labels = labels_with_singletons(gen, n, 3).to(device)
    check_backend(name, device, views, labels, rule, extra, normalize, detach_alpha)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_three_views_every_rule_matches_reference(backend, gen, case, detach_alpha):
    """V = 3 views without labels (the positives of a row: the other two views of its sample)."""
    name, device = backend
    rule, extra = case
    views = random_views(gen, 3, 7, 4, device=device)
    check_backend(name, device, views, None, rule, extra, True, detach_alpha, as_tensor=True)


@pytest.mark.parametrize("rule", ["direct", "infonce", "square"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_three_views_with_per_row_labels_and_reductions(backend, gen, rule, reduction):
    """V = 3 views with one label per row (length M), every reduction."""
    name, device = backend
    n = 6
    views = random_views(gen, 3, n, 3, device=device)
    labels = labels_with_singletons(gen, 3 * n, 5).to(device)
    check_backend(name, device, views, labels, rule, {}, reduction=reduction, gen=gen)


@pytest.mark.parametrize("rule", ["entropy", "infonce"])
def test_float32_random_shapes(backend, gen, rule):
    """float32, a random odd shape, one labelled view of M rows."""
    name, device = backend
    m = int(torch.randint(9, 20, (1,), generator=gen)) | 1
    d = int(torch.randint(2, 9, (1,), generator=gen))
    z = random_views(gen, 1, m, d, dtype=torch.float32, device=device)
    labels = labels_with_singletons(gen, m, 3).to(device)
    check_backend(name, device, z, labels, rule, {})


@pytest.mark.parametrize("rule", RULES)
def test_one_label_and_all_distinct_give_zero(backend, gen, rule):
    """One label: no anchor has a negative; all labels distinct: none has a positive. Both 0, zero gradient."""
    name, device = backend
    views = random_views(gen, 2, 5, 3, device=device)
    for labels in (torch.zeros(5, dtype=torch.long), torch.arange(10)):
        leaves = [v.clone().requires_grad_() for v in views]
        value = fastalpha.alpha_cl_loss(*leaves, rule=rule, backend=name, labels=labels.to(device))
        grads = torch.autograd.grad(value, leaves)
        assert value.item() == 0.0
        assert all((g == 0).all() for g in grads)


def test_rows_without_positive_have_zero_loss_and_stay_negatives(gen):
    """A singleton's own loss is 0, yet moving it changes the others' losses (it is their negative)."""
    z = torch.randn(7, 3, generator=gen, dtype=F64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 9])
    rows = fastalpha.alpha_cl_loss(z, rule="infonce", labels=labels, reduction="none", backend="chunked")
    assert rows[6].item() == 0.0 and (rows[:6] > 0).all()
    grad, = torch.autograd.grad(rows.sum(), z)
    assert grad[6].abs().sum() > 0
    mean = fastalpha.alpha_cl_loss(z, rule="infonce", labels=labels, backend="chunked")
    assert_close(mean, rows[:6].mean(), "float64", "mean over the anchors with a positive")


def test_learnable_temperature_and_second_derivatives_with_labels(gen):
    """The Euler identity gives ∂/∂τ with groups too; create_graph gives exact second derivatives."""
    z = torch.randn(10, 4, generator=gen, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0, 5])
    results = {}
    for name in ("eager", "chunked"):
        x = z.clone().requires_grad_()
        tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
        value = fastalpha.alpha_cl_loss(x, rule="infonce", temperature=tau, labels=labels, backend=name)
        gx, gt = torch.autograd.grad(value, (x, tau), create_graph=True)
        hvp, = torch.autograd.grad((gx * z).sum(), x)
        results[name] = (value, gx, gt, hvp)
    for k, what in enumerate(("value", "grad", "temperature grad", "Hessian-vector product")):
        assert_close(results["chunked"][k], results["eager"][k], "float64", what)


# ----------------------------------------------------------------------------- pytorch-metric-learning


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
def test_supcon_equals_pytorch_metric_learning(gen, dtype, temperature):
    """SupConLoss(τ)(embeddings, labels): value and gradient equal pml's, singletons included."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    m = 29
    e = torch.randn(m, 16, generator=gen, dtype=F64).to(dtype)
    labels = labels_with_singletons(gen, m, 5)
    ours_in, theirs_in = e.clone().requires_grad_(), e.clone().requires_grad_()
    ours = fastalpha.SupConLoss(temperature)(ours_in, labels)
    theirs = pml.SupConLoss(temperature=temperature)(theirs_in, labels)
    g_ours, = torch.autograd.grad(ours, ours_in)
    g_theirs, = torch.autograd.grad(theirs, theirs_in)
    spec = make_spec("infonce", temperature, eps=1.0)
    precision = precision_of(dtype)
    assert_close(ours, theirs.detach().double(), precision, "SupCon value", scale=loss_scale(e, spec))
    assert_close(g_ours, g_theirs.double(), precision, "SupCon gradient", scale=grad_scale(e, spec, 1.0 / m))


def test_supcon_of_views_equals_pml_on_the_stacked_batch(gen):
    """V views with per-sample labels = pml on the stacked views with the labels repeated."""
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    views = torch.randn(3, 8, 6, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (8,), generator=gen)
    ours = fastalpha.SupConLoss(0.1)(views, labels)
    theirs = pml.SupConLoss(temperature=0.1)(views.reshape(24, 6), labels.repeat(3))
    assert_close(ours, theirs, "float64", "SupCon of three views")


# ----------------------------------------------------------------------------- bad input


def _never_compute(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran for input that should have been rejected")
    monkeypatch.setattr(dispatch, "implementation", lambda name: refuse)
    monkeypatch.setattr(reference, "grouped_alpha_cl_loss", refuse)


z1 = torch.randn(6, 4)
z2 = torch.randn(6, 4)
BAD_INPUT = [
    ("labels wrong length", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.zeros(5, dtype=torch.long)),
     ValueError, "length N = 6"),
    ("labels float", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.zeros(6)), TypeError, "integer dtype"),
    ("labels bool", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.zeros(6, dtype=torch.bool)), TypeError,
     "integer dtype"),
    ("labels 2-D", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.zeros(6, 1, dtype=torch.long)), ValueError,
     "1-D"),
    ("labels a list", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=[0] * 6), TypeError, "labels must be a torch.Tensor"),
    ("labels on another device", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.zeros(6, dtype=torch.long,
                                                                                              device="meta")),
     ValueError, "device"),
    ("one view, no labels", lambda: fastalpha.alpha_cl_loss(z1), ValueError, "second view"),
    ("V = 1 tensor", lambda: fastalpha.alpha_cl_loss(z1[None]), ValueError, "V >= 2"),
    ("V = 1 list", lambda: fastalpha.alpha_cl_loss([z1]), ValueError, "V >= 2"),
    ("empty list", lambda: fastalpha.alpha_cl_loss([]), ValueError, "V >= 2"),
    ("ragged views", lambda: fastalpha.alpha_cl_loss([z1, z2, z1[:5]]), ValueError, "same shape"),
    ("mixed dtypes", lambda: fastalpha.alpha_cl_loss([z1, z2, z1.double()]), TypeError, "same dtype"),
    ("a view not a tensor", lambda: fastalpha.alpha_cl_loss([z1, z2.tolist()]), TypeError, "views[1] must be a torch.Tensor"),
    ("labels with a queue", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.arange(6), queue=torch.randn(3, 4)),
     ValueError, "queue"),
    ("views with cross", lambda: fastalpha.alpha_cl_loss([z1, z2, z1], negatives="cross"), ValueError,
     "negatives='cross'"),
    ("labels with none", lambda: fastalpha.alpha_cl_loss(z1, z2, labels=torch.arange(6), negatives="none",
                                                         queue=torch.randn(3, 4)), ValueError, "negatives='none'"),
    ("SupCon without labels", lambda: fastalpha.SupConLoss()(z1, None), ValueError, "labels"),
    ("SupCon temperature 0", lambda: fastalpha.SupConLoss(temperature=0.0), ValueError, "temperature"),
]


@pytest.mark.parametrize("what, call, exc, text", BAD_INPUT, ids=[case[0] for case in BAD_INPUT])
def test_bad_input_raises_before_computing(monkeypatch, what, call, exc, text):
    _never_compute(monkeypatch)
    with pytest.raises(exc, match=text.replace("(", r"\(").replace("[", r"\[")):
        call()


def test_unsupported_backend_names_the_set_up(monkeypatch):
    """An explicit backend without group support says so; 'auto' skips it."""
    monkeypatch.setattr(fastalpha.backends.chunked, "supports_groups", False)
    with pytest.raises(ValueError, match="labels or more than two views"):
        fastalpha.alpha_cl_loss(z1, z2, labels=torch.arange(6), backend="chunked")

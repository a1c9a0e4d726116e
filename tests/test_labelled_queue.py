"""A labelled queue (SupCon with a cross-batch memory) and V views with a queue, against float64.

The definition (docs/design.md, "Positive sets with a queue"): the columns are [Z; Q]; a queue
row is a positive of every anchor with its label and a negative of every other anchor (without
labels, a negative of every anchor); d̄2_i is the mean over the positives of batch and queue;
|J_i| counts the queue's negatives; queue rows get no gradient; an anchor without a positive
(in batch or queue) or without a negative is 0 and leaves "mean". Checked, each against
something it does not share code with:

* the dense reference against the loops of tests/naive.py (ignored memory slots and self
  columns included), and its gradient against central differences of the loops;
* the closed form (the eager backend), queue rows' column side included, against autograd;
* every backend through the public API against autograd of the float64 reference: every
  rule, K < M and K > M, odd shapes, labels of length N and M, V = 3 views with an unlabelled
  queue, every reduction, a learnable temperature;
* bad input: a clear error before any kernel runs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastalpha
from fastalpha import dispatch, positives, reference
from fastalpha.positives import Groups
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

import naive
from test_backends import _backend as available_backend
from test_positives import CASES, _case_id, labels_with_singletons, random_views

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def queue_backend(request):
    """(name, device) of an available backend that takes a labelled queue (skipped, with the
    reason, otherwise)."""
    name, device = available_backend(request.param)
    ok, reason = dispatch.supports(name, "all", True, True)
    if not ok:
        pytest.skip(reason)
    return name, device


def normalised(x, normalize):
    return torch.nn.functional.normalize(x, dim=1) if normalize else x


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("eps", [None, 0.4])
@pytest.mark.parametrize("k", [4, 17])
def test_reference_matches_naive_loops(gen, rule, normalize, eps, k):
    """Reference rows over [Z; Q] = the loops: queue labels shared with the batch, labels only
    the queue has, a batch label only the queue completes, K < M and K > M."""
    m, d = 11, 4
    z = torch.randn(m, d, generator=gen, dtype=F64)
    queue = torch.randn(k, d, generator=gen, dtype=F64)
    labels = labels_with_singletons(gen, m, 4)
    queue_labels = torch.randint(0, 6, (k,), generator=gen)
    queue_labels[0] = labels[0]
    spec = make_spec(rule, eps=eps, normalize=normalize)
    groups = Groups.of(labels, k, queue_labels)
    got = reference.grouped_loss_rows(normalised(z, normalize), spec, groups, queue=normalised(queue, normalize))
    want = naive.grouped_loss_rows(z.numpy(), labels.tolist(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                   normalize, queue.numpy(), queue_labels.tolist())
    assert_close(got, torch.from_numpy(want), "float64", f"{rule} rows")
    assert (got != 0).any()


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_views_with_an_unlabelled_queue_matches_naive_loops(gen, rule, normalize):
    """V = 3 views of N samples (groups k mod N) and a queue without labels: every queue row is
    a negative of every anchor, whatever the ids the batch's groups got."""
    n, views, k, d = 4, 3, 6, 3
    z = torch.randn(n * views, d, generator=gen, dtype=F64)
    queue = torch.randn(k, d, generator=gen, dtype=F64)
    ids = torch.arange(n).repeat(views)
    spec = make_spec(rule, normalize=normalize)
    got = reference.grouped_loss_rows(normalised(z, normalize), spec, Groups.of(ids, k),
                                      queue=normalised(queue, normalize))
    want = naive.grouped_loss_rows(z.numpy(), ids.tolist(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                   normalize, queue.numpy())
    assert_close(got, torch.from_numpy(want), "float64", f"{rule} rows")


@pytest.mark.parametrize("rule", RULES)
def test_reference_with_ignored_columns_and_self_columns_matches_the_loops(gen, rule):
    """The memory set-up of CrossBatchMemory: the batch rows are anchors only, the memory has
    empty slots (ignored) and holds each anchor's own copy (its self column)."""
    m, k, d = 6, 13, 3
    z = torch.randn(m, d, generator=gen, dtype=F64)
    memory = torch.randn(k, d, generator=gen, dtype=F64)
    slots = torch.tensor([5, 6, 7, 8, 9, 10])
    memory[slots] = z
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    memory_labels = torch.randint(0, 4, (k,), generator=gen)
    memory_labels[slots] = labels
    filled = torch.ones(k, dtype=torch.bool)
    filled[[0, 12]] = False
    spec = make_spec(rule)
    groups = Groups.of(labels, k, memory_labels, queue_valid=filled, batch_columns=False, self_col=m + slots)
    got = reference.grouped_loss_rows(normalised(z, True), spec, groups, queue=normalised(memory, True))
    queue_groups = [int(v) if f else None for v, f in zip(memory_labels, filled)]
    want = naive.grouped_loss_rows(z.numpy(), labels.tolist(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                   True, memory.numpy(), queue_groups, batch_columns=False,
                                   self_columns=(m + slots).tolist())
    assert_close(got, torch.from_numpy(want), "float64", f"{rule} rows")


@pytest.mark.parametrize("rule", ["infonce", "direct", "quadratic"])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradient_matches_central_differences_of_the_loops(gen, rule, normalize):
    """The batch's gradient through a labelled queue (the queue held fixed), by central
    differences of the loops; α-CL rules at fixed α are the energy form, so infonce (whose α
    is its true gradient, Theorem 1) and quadratic (constant α) are differentiated directly,
    and direct with detach_alpha=False (the full derivative)."""
    m, k, d = 8, 5, 3
    z = torch.randn(m, d, generator=gen, dtype=F64)
    queue = torch.randn(k, d, generator=gen, dtype=F64)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 1])
    queue_labels = torch.tensor([3, 0, 4, 2, 3])
    spec = make_spec(rule, normalize=normalize, detach_alpha=False)
    leaf = z.clone().requires_grad_()
    groups = Groups.of(labels, k, queue_labels)
    rows = reference.grouped_loss_rows(normalised(leaf, normalize), spec, groups, queue=normalised(queue, normalize))
    got, = torch.autograd.grad(rows.sum(), leaf)

    def loss(x):
        return naive.grouped_loss_rows(x, labels.tolist(), rule, spec.temperature, spec.p, spec.gamma, spec.eps,
                                       normalize, queue.numpy(), queue_labels.tolist()).sum()
    want = naive.numerical_gradient(loss, z.numpy())
    assert np.allclose(got.numpy(), want, rtol=1e-6, atol=1e-7), np.abs(got.numpy() - want).max()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_closed_form_matches_autograd_queue_rows_included(gen, case, detach_alpha, normalize):
    """The eager backend's closed form over [Z; Q] against autograd in Z and in Q (the queue's
    column side, which the temperature's gradient uses), with a row range and weights."""
    rule, extra = case
    spec = make_spec(rule, **extra, normalize=normalize, detach_alpha=detach_alpha)
    m, k = 13, 9
    z = normalised(torch.randn(m, 5, generator=gen, dtype=F64), normalize)
    queue = normalised(torch.randn(k, 5, generator=gen, dtype=F64), normalize)
    labels = labels_with_singletons(gen, m, 4)
    groups = Groups.of(labels, k, torch.randint(0, 5, (k,), generator=gen))
    lo, hi = 2, 11
    w = torch.rand(hi - lo, generator=gen, dtype=F64)
    leaf, queue_leaf = z.clone().requires_grad_(), queue.clone().requires_grad_()
    rows = grouped_rows_differentiable_in_queue(leaf, queue_leaf, spec, groups, lo, hi)
    want_z, want_q = torch.autograd.grad((rows * w).sum(), (leaf, queue_leaf))
    got_rows, got = reference.grouped_closed_form_gradient(z, spec, groups, w, lo, hi, queue)
    assert_close(got_rows, rows.detach(), "float64", "rows")
    assert_close(got[:m], want_z, "float64", "batch gradient")
    assert_close(got[m:], want_q, "float64", "queue gradient")


def grouped_rows_differentiable_in_queue(z, queue, spec, groups, lo, hi):
    """reference.grouped_loss_rows with the queue as a differentiable part of the columns: the
    queue rows appended to Z as anchors outside the row range, whose groups are the queue's."""
    m, k = z.shape[0], queue.shape[0]
    stacked = torch.cat([z, queue])
    wide = Groups.from_ids(torch.cat([groups.row_ids, groups.col_ids[m:].clamp_min(0)]), groups.col_ids,
                           torch.cat([groups.self_col, torch.arange(m, m + k)]))
    return reference.grouped_loss_rows(stacked, spec, wide, lo, hi)


# ----------------------------------------------------------------------------- backends


def expected(views, labels, queue, queue_labels, spec, reduction, weight=None):
    """Float64 reference value and per-view gradients of Σ weight · loss, by autograd."""
    leaves = [v.detach().cpu().to(F64).requires_grad_() for v in views]
    n, count = views[0].shape[0], len(views)
    ids = (labels.cpu().repeat(count) if labels is not None and labels.shape[0] == n and count > 1
           else labels.cpu() if labels is not None else torch.arange(n).repeat(count))
    groups = Groups.of(ids, queue.shape[0], None if queue_labels is None else queue_labels.cpu())
    prepared = reference.prepare_queue(queue.detach().cpu().to(F64), spec.unit_rows)
    value = reference.grouped_alpha_cl_loss(leaves, groups, spec, reduction, prepared)
    objective = value.sum() if weight is None else (value * weight.cpu().to(F64)).sum()
    return value.detach(), torch.autograd.grad(objective, leaves)


def check_queue_call(name, device, views, labels, queue, queue_labels, rule, extra, normalize=True, detach_alpha=True,
                     reduction="mean", gen=None):
    spec = make_spec(rule, **extra, normalize=normalize, detach_alpha=detach_alpha)
    leaves = [v.clone().requires_grad_() for v in views]
    inputs = leaves if len(leaves) != 1 else leaves[0]
    before = queue.clone()
    value = fastalpha.alpha_cl_loss(inputs, rule=rule, normalize=normalize, detach_alpha=detach_alpha,
                                    reduction=reduction, backend=name, labels=labels, queue=queue,
                                    queue_labels=queue_labels, **extra)
    assert value.dtype == views[0].dtype
    weight = None
    if reduction == "none":
        weight = torch.randn(value.shape, generator=gen, dtype=F64).to(device=device, dtype=value.dtype)
    grads = torch.autograd.grad(value if weight is None else (value * weight).sum(), leaves)
    assert torch.equal(queue, before)
    exp_value, exp_grads = expected(views, labels, queue, queue_labels, spec, reduction, weight)
    precision = precision_of(views[0].dtype)
    stacked = torch.cat(list(views) + [queue]).cpu()
    what = f"{name} {rule} V={len(views)} K={queue.shape[0]}"
    rows = torch.cat(views).shape[0] if reduction == "sum" else 1
    assert_close(value, exp_value, precision, f"{what} loss", scale=loss_scale(stacked, spec, rows))
    anchor_weight = {"mean": 1.0, "sum": 1.0}.get(reduction, None if weight is None else weight.abs().max().item())
    g_scale = grad_scale(stacked, spec, anchor_weight)
    for k, (got, want) in enumerate(zip(grads, exp_grads)):
        assert_close(got, want, precision, f"{what} grad of view {k}", scale=g_scale)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("k", [5, 40])
def test_every_backend_matches_the_reference_with_a_labelled_queue(gen, queue_backend, case, k):
    """One labelled (M, D) view and a labelled queue, K < M and K > M, odd sizes."""
    name, device = queue_backend
    rule, extra = case
    m, d = 23, 6
    (z,) = random_views(gen, 1, m, d, device=device)
    queue = torch.randn(k, d, generator=gen, dtype=F64).to(device)
    labels = labels_with_singletons(gen, m, 5).to(device)
    queue_labels = torch.randint(0, 7, (k,), generator=gen).to(device)
    check_queue_call(name, device, [z], labels, queue, queue_labels, rule, extra)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_every_backend_two_views_per_sample_labels_and_options(gen, queue_backend, rule, detach_alpha, normalize):
    """Two views with labels of length N, every rule × detach × normalize, float64."""
    name, device = queue_backend
    if rule in ("quadratic",) and not detach_alpha:
        detach_alpha = True
    views = random_views(gen, 2, 9, 5, device=device)
    queue = (3 * torch.randn(12, 5, generator=gen, dtype=F64)).to(device)
    labels = torch.randint(0, 4, (9,), generator=gen).to(device)
    queue_labels = torch.randint(0, 6, (12,), generator=gen).to(device)
    check_queue_call(name, device, views, labels, queue, queue_labels, rule, {}, normalize, detach_alpha)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rule", ["infonce", "direct", "square"])
def test_every_backend_three_views_with_an_unlabelled_queue(gen, queue_backend, reduction, rule):
    """V = 3 views and a queue without labels: queue rows are negatives of every anchor."""
    name, device = queue_backend
    views = random_views(gen, 3, 7, 4, device=device)
    queue = torch.randn(10, 4, generator=gen, dtype=F64).to(device)
    check_queue_call(name, device, views, None, queue, None, rule, {}, reduction=reduction, gen=gen)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_backend_float32_labelled_queue(gen, queue_backend, reduction):
    """float32 inputs, per-row labels of three views, a queue larger than the batch."""
    name, device = queue_backend
    views = random_views(gen, 3, 10, 8, dtype=torch.float32, device=device)
    queue = torch.randn(50, 8, generator=gen).to(device)
    labels = torch.randint(0, 6, (30,), generator=gen).to(device)
    queue_labels = torch.randint(0, 9, (50,), generator=gen).to(device)
    check_queue_call(name, device, views, labels, queue, queue_labels, "infonce", {"temperature": 0.1},
                     reduction=reduction, gen=gen)


def test_positives_only_in_the_queue_count_and_mean_divides_by_them(gen, queue_backend):
    """Every batch label occurs once: the positives are all in the queue; an anchor whose label
    the queue lacks too is left out of "mean" (checked by the count, from the loops)."""
    name, device = queue_backend
    z = torch.randn(6, 4, generator=gen, dtype=F64)
    queue = torch.randn(8, 4, generator=gen, dtype=F64)
    labels = torch.arange(6)
    queue_labels = torch.tensor([0, 0, 1, 2, 2, 2, 9, 9])
    rows = naive.grouped_loss_rows(z.numpy(), labels.tolist(), "infonce", 0.5, eps=1.0, queue=queue.numpy(),
                                   queue_groups=queue_labels.tolist())
    value = fastalpha.alpha_cl_loss(z.to(device), rule="infonce", backend=name, labels=labels.to(device),
                                    queue=queue.to(device), queue_labels=queue_labels.to(device))
    assert_close(value, torch.tensor(rows.sum() / 3), "float64", "mean over the 3 anchors with a positive")


def test_one_label_everywhere_is_zero_with_zero_gradient(queue_backend):
    name, device = queue_backend
    z = torch.randn(5, 3, dtype=F64, device=device, requires_grad=True)
    value = fastalpha.alpha_cl_loss(z, backend=name, labels=torch.zeros(5, dtype=torch.long, device=device),
                                    queue=torch.randn(4, 3, dtype=F64, device=device),
                                    queue_labels=torch.zeros(4, dtype=torch.long, device=device))
    grad, = torch.autograd.grad(value, z)
    assert value.item() == 0 and torch.count_nonzero(grad) == 0


def test_learnable_temperature_with_a_labelled_queue(gen, queue_backend):
    """∂/∂τ through the fused path (Euler's identity over [Z; Q]) = autograd of the reference."""
    name, device = queue_backend
    z = torch.randn(12, 4, generator=gen, dtype=F64)
    queue = torch.randn(7, 4, generator=gen, dtype=F64)
    labels = torch.randint(0, 3, (12,), generator=gen)
    queue_labels = torch.randint(0, 4, (7,), generator=gen)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    leaf = z.clone().to(device).requires_grad_()
    value = fastalpha.alpha_cl_loss(leaf, rule="infonce", temperature=tau.to(device),
                                    backend=name, labels=labels.to(device), queue=queue.to(device),
                                    queue_labels=queue_labels.to(device))
    got_z, got_tau = torch.autograd.grad(value, (leaf, tau))
    ref_tau = tau.detach().clone().requires_grad_()
    ref_leaf = z.clone().requires_grad_()
    spec = make_spec("infonce", temperature=0.3).with_(temperature=ref_tau)
    ref = reference.grouped_alpha_cl_loss([ref_leaf], Groups.of(labels, 7, queue_labels), spec, "mean",
                                          reference.prepare_queue(queue, True))
    want_z, want_tau = torch.autograd.grad(ref, (ref_leaf, ref_tau))
    assert_close(got_z, want_z, "float64", "batch gradient")
    assert_close(got_tau, want_tau, "float64", "temperature gradient")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def kernels_refused(monkeypatch):
    """Every backend's kernel raises: a check that fires must fire before any kernel runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was checked")
    for name in dispatch.BACKENDS:
        try:
            module = dispatch._module(name)
        except ImportError:
            continue
        monkeypatch.setattr(module, "alpha_cl_fused", refuse)
    monkeypatch.setattr(reference, "grouped_alpha_cl_loss", refuse)


@pytest.mark.parametrize("bad,error,match", [
    ({"queue_labels": torch.zeros(3, dtype=torch.long)}, ValueError, "queue_labels must be 1-D of length K = 4"),
    ({"queue_labels": torch.zeros(4)}, TypeError, "queue_labels must have an integer dtype"),
    ({"queue_labels": torch.zeros(4, 1, dtype=torch.long)}, ValueError, "queue_labels must be 1-D"),
    ({"queue_labels": [0, 1, 2, 3]}, TypeError, "queue_labels must be a torch.Tensor"),
    ({"queue_labels": None}, ValueError, "labels with a queue need queue_labels="),
    ({"labels": None}, ValueError, "queue_labels= needs labels="),
    ({"queue": None}, ValueError, "queue_labels= needs a queue="),
    ({"negatives": "none"}, ValueError, "negatives='none'"),
])
def test_bad_queue_labels_raise_before_any_kernel(kernels_refused, bad, error, match):
    z = [torch.randn(3, 3), torch.randn(3, 3)]
    args = {"labels": torch.tensor([0, 1, 0, 1, 2, 2]), "queue": torch.randn(4, 3),
            "queue_labels": torch.tensor([0, 1, 5, 2])}
    args.update(bad)
    before = None if args.get("queue") is None else args["queue"].clone()
    with pytest.raises(error, match=match):
        fastalpha.alpha_cl_loss(z, **args)
    if before is not None:
        assert torch.equal(args["queue"], before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a second device")
def test_queue_labels_on_another_device_raise():
    with pytest.raises(ValueError, match="queue_labels must be on the device"):
        fastalpha.alpha_cl_loss(torch.randn(6, 3), labels=torch.tensor([0, 1, 0, 1, 2, 2]), queue=torch.randn(4, 3),
                                queue_labels=torch.zeros(4, dtype=torch.long, device="cuda"))


def test_supcon_and_alpha_cl_modules_take_a_labelled_queue(gen):
    """SupConLoss(τ)(z, y, queue, queue_labels) = alpha_cl_loss(infonce, ε = 1) of the same call,
    and AlphaCLLoss's forward passes queue_labels on."""
    z = torch.randn(10, 4, generator=gen, dtype=F64)
    labels, queue = torch.randint(0, 3, (10,), generator=gen), torch.randn(6, 4, generator=gen, dtype=F64)
    queue_labels = torch.randint(0, 4, (6,), generator=gen)
    spec = make_spec("infonce", temperature=0.1, eps=1.0)
    want = reference.grouped_alpha_cl_loss([z], Groups.of(labels, 6, queue_labels), spec, "mean",
                                           reference.prepare_queue(queue, True))
    got = fastalpha.SupConLoss(temperature=0.1)(z, labels, queue, queue_labels)
    assert_close(got, want, "float64", "SupConLoss with a queue")
    module = fastalpha.AlphaCLLoss(rule="infonce", temperature=0.1, eps=1.0)
    assert_close(module(z, labels=labels, queue=queue, queue_labels=queue_labels), want, "float64", "AlphaCLLoss")


@pytest.mark.parametrize("unit_rows", [True, False])
@pytest.mark.parametrize("block", [1, 3, 64])
def test_positive_side_in_row_blocks_matches_dense_pairs(gen, monkeypatch, unit_rows, block):
    """positives.mean_positive_distance and add_positive_pull_ gather group sums ROW_BLOCK rows
    at a time: with blocks that split the anchor range [lo, hi) unevenly (and an anchor range
    that starts inside the batch), d̄2_i equals the mean of the dense pair distances over P_i and
    the pull's gradient equals autograd of Σ_i a_i d̄2_i over the dense pairs."""
    monkeypatch.setattr(positives, "ROW_BLOCK", block)
    m, k, d, lo, hi = 17, 9, 5, 3, 14
    cols = torch.randn(m + k, d, generator=gen, dtype=F64)
    if unit_rows:
        cols = torch.nn.functional.normalize(cols, dim=1)
    labels = torch.randint(0, 4, (m,), generator=gen)
    labels[lo] = 9                                                     # an anchor without a positive
    groups = Groups.of(labels, k, torch.randint(0, 6, (k,), generator=gen))
    pull = torch.randn(hi - lo, generator=gen, dtype=F64)

    leaves = cols.clone().requires_grad_()
    # Unit rows: d2 = 1 − z_i·c_p, whose gradient the backends take (the rows' norms are fixed).
    d2 = (1 - leaves[lo:hi] @ leaves.T if unit_rows
          else ((leaves[lo:hi, None, :] - leaves[None, :, :]) ** 2).sum(-1) / 2)
    positive, _ = groups.masks(lo, hi)
    count = positive.sum(1)
    dense_mean = torch.where(count > 0, (d2 * positive).sum(1) / count.clamp_min(1), torch.zeros(()))
    (want_grad,) = torch.autograd.grad((pull * dense_mean).sum(), leaves)

    got = positives.mean_positive_distance(cols, groups, lo, hi, unit_rows, F64)
    torch.testing.assert_close(got, dense_mean.detach(), rtol=1e-12, atol=1e-12)
    grad = torch.zeros_like(cols)
    positives.add_positive_pull_(grad, cols, groups, pull, lo, unit_rows)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)

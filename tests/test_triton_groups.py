"""Triton backend: group-defined positives (labels, more than two views; fastalpha.positives).

The oracle is `reference.grouped_closed_form_gradient` in float64 (dense, explicit P_i / J_i
masks, itself checked against autograd). Through the custom op (`ops.call_fused(...,
groups=)`): every rule × detach_alpha × normalize (unit rows) × ε (the default, and 0.3 for
the rules with an ε-term) on an odd M with random group ids that include singletons (anchors
without a positive) and groups of several sizes, relabelled from arbitrary integers; row
ranges with row weights; tiles smaller than M on the single-chunk and the chunked-feature
path; float32 and bfloat16 against the float64 reference. Then the edge cases: one group
(no negatives: zeros), all ids distinct (no positives: zeros), two views as groups (the
backend's own SimCLR path), bad group ids given to the raw op, and `supports_groups`. With
queue columns (Groups over [Z; Q]): a labelled queue, CrossBatchMemory's set-up (ignored batch
columns, self columns in the memory, empty slots) and an unlabelled queue, for every rule,
K > M and K < M, tiles smaller than the rows, float32; the gradient's queue rows included.

Kernels run in Triton's CPU interpreter without a GPU (conftest sets TRITON_INTERPRET=1):
sizes are tiny.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastalpha import dispatch, ops, reference
from fastalpha.positives import Groups
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, beta_jumps_under_rounding, grad_scale, loss_scale

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)
from fastalpha.backends.triton import launch  # noqa: E402
from fastalpha.backends.triton.blocks import BlockConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: (rule, ε): the default ε of every rule, and ε = 0.3 where the rule has an ε-term
#: (|J_i| per anchor for entropy/direct, the positives in infonce's denominator).
RULE_EPS = [(rule, None) for rule in RULES] + [("entropy", 0.3), ("direct", 0.3), ("infonce", 0.3)]

# float32 products in IEEE: the interpreter ignores TF32 (GPU tests opt in explicitly).
pytestmark = pytest.mark.usefixtures("ieee_float32")


def group_ids(gen, m, groups=4, singletons=2):
    """M arbitrary integer ids: `groups` labels drawn at random (so sizes vary) plus `singletons`
    rows with a label of their own; the values are scattered (negative, gaps) so that the
    backend has to relabel them."""
    ids = torch.randint(0, groups, (m,), generator=gen)
    lonely = torch.randperm(m, generator=gen)[:singletons]
    ids[lonely] = groups + torch.arange(singletons)
    return ids * 7 - 11


def embeddings(gen, m, d, unit, dtype=torch.float64):
    """Z as the fused op receives it: unit rows when `unit`, else rows of norm ≈ 1 (d2 = O(1))."""
    z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    z = F.normalize(z, dim=1) if unit else z / math.sqrt(d)
    return z.to(dtype)


def spec_of(rule, eps=None, unit=True, detach_alpha=True):
    extra = {} if eps is None else {"eps": eps}
    if rule == "square":
        extra["temperature"] = 1.0          # a wide support: many pairs with α > 0
    return make_spec(rule, normalize=unit, detach_alpha=detach_alpha, **extra)


def check(z, spec, groups, lo=0, hi=None, weight=None, precision="float64", config=None, what="", queue=None):
    """Loss rows and gradient of the triton backend against reference.grouped_closed_form_gradient
    in float64, and the values alone (need_grad=False). `groups`: M group ids, or with a queue
    of K rows a Groups over [Z; Q], whose gradient has M + K rows (the queue's column side too)."""
    hi = z.shape[0] if hi is None else hi
    w = None if weight is None else weight.to(DEVICE)
    if isinstance(groups, Groups):
        dev_groups = Groups(*(t.to(DEVICE) for t in groups.tensors()))
    else:
        dev_groups = groups.to(DEVICE)
    dev_queue = None if queue is None else queue.to(DEVICE)

    def run(need_grad):
        if config is None:
            return ops.call_fused(z.to(DEVICE), spec, "triton", lo, hi, w, need_grad, queue=dev_queue, groups=dev_groups)
        return launch.fused_loss_and_grad(z.to(DEVICE), spec, lo, hi, w, need_grad, config, queue=dev_queue,
                                          groups=dev_groups)
    rows, grad = run(True)
    ref_rows, ref_grad = reference.grouped_closed_form_gradient(
        z.double(), spec, groups, None if weight is None else weight.double(), lo, hi,
        None if queue is None else queue.double())
    stacked = z if queue is None else torch.cat([z, queue])
    assert grad.shape == stacked.shape and grad.dtype == z.dtype, what
    w_max = 1.0 if weight is None else weight.abs().max().item()
    assert_close(rows, ref_rows, precision, f"{what} loss rows", scale=loss_scale(stacked, spec))
    assert_close(grad, ref_grad, precision, f"{what} grad", scale=grad_scale(stacked, spec, w_max))
    rows_only, empty = run(False)
    assert empty.shape == (0, z.shape[1]), what
    assert_close(rows_only, ref_rows, precision, f"{what} loss rows without the gradient", scale=loss_scale(stacked, spec))


@pytest.mark.parametrize("rule,eps", RULE_EPS)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("unit", [True, False])
def test_every_rule_matches_the_float64_reference(gen, rule, eps, detach_alpha, unit):
    """M = 13 (odd), D = 3, every anchor in range, no row weights: the singletons' zero weight
    is the only one."""
    z = embeddings(gen, 13, 3, unit)
    spec = spec_of(rule, eps, unit, detach_alpha)
    check(z, spec, group_ids(gen, 13), what=f"{rule} eps={eps} detach={detach_alpha} unit={unit}")


@pytest.mark.parametrize("rule,eps", RULE_EPS)
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_row_range_and_row_weights(gen, rule, eps, detach_alpha):
    """The anchors [3, 12) of M = 15 with random weights (the distributed layer's call): the
    gradient still covers every row; unit rows for half the cases."""
    unit = detach_alpha
    z = embeddings(gen, 15, 5, unit)
    weight = torch.rand(9, generator=gen, dtype=torch.float64) + 0.5
    spec = spec_of(rule, eps, unit, detach_alpha)
    check(z, spec, group_ids(gen, 15, groups=3), lo=3, hi=12, weight=weight,
          what=f"{rule} eps={eps} detach={detach_alpha} rows [3, 12)")


#: Tiles of 16 over M = 37 (three row and column tiles, the last one partial); D = 20 on the
#: chunked path runs two Gram chunks and two output-feature programs.
SMALL_TILES = [BlockConfig(16, 16, 16, 16, True, 4, 1), BlockConfig(16, 16, 16, 16, False, 4, 1)]


@pytest.mark.parametrize("config", SMALL_TILES, ids=["single-chunk", "chunked"])
@pytest.mark.parametrize("rule,eps,detach_alpha", [("direct", 0.3, False), ("square", None, False),
                                                   ("infonce", 0.3, True), ("inverse", None, True)])
def test_tiles_smaller_than_the_rows(gen, config, rule, eps, detach_alpha):
    d = 11 if config.single_chunk else 20
    unit = rule != "inverse"
    z = embeddings(gen, 37, d, unit)
    weight = torch.rand(30, generator=gen, dtype=torch.float64) + 0.5
    spec = spec_of(rule, eps, unit, detach_alpha)
    check(z, spec, group_ids(gen, 37, groups=5, singletons=3), lo=5, hi=35, weight=weight, config=config,
          what=f"{rule} {config}")


@pytest.mark.parametrize("rule,eps", [("direct", 0.3), ("infonce", 0.3)])
def test_float32(gen, rule, eps):
    z = embeddings(gen, 13, 7, unit=True, dtype=torch.float32)
    check(z, spec_of(rule, eps), group_ids(gen, 13), precision="float32", what=f"float32 {rule}")


def test_bfloat16(gen):
    """bf16 rows (tensor-core products, float32 statistics) against the float64 reference of the
    same rounded rows, at the bf16 tolerance."""
    z = embeddings(gen, 13, 7, unit=True, dtype=torch.bfloat16)
    spec = spec_of("direct", 0.3)
    assert not beta_jumps_under_rounding(spec, torch.bfloat16)
    check(z, spec, group_ids(gen, 13), precision="bfloat16", what="bfloat16 direct")


@pytest.mark.parametrize("rule", ["quadratic", "direct", "square", "infonce"])
def test_one_group_has_no_negatives(gen, rule):
    """All labels equal: no anchor has a negative, the loss is 0 with a zero gradient."""
    z = embeddings(gen, 9, 3, unit=True)
    rows, grad = ops.call_fused(z.to(DEVICE), spec_of(rule, 0.3 if rule == "infonce" else None), "triton", 0, 9,
                                None, True, groups=torch.full((9,), 4, device=DEVICE))
    assert torch.equal(rows.cpu(), torch.zeros(9, dtype=torch.float64))
    assert torch.equal(grad.cpu(), torch.zeros_like(z))


@pytest.mark.parametrize("rule", ["quadratic", "entropy", "square", "infonce"])
def test_distinct_labels_have_no_positives(gen, rule):
    """All labels distinct: no anchor has a positive, so every loss row is 0 and, although the
    pair loop runs, every anchor's weight is 0: a zero gradient."""
    z = embeddings(gen, 9, 3, unit=False)
    weight = torch.rand(9, generator=gen, dtype=torch.float64) + 0.5
    rows, grad = ops.call_fused(z.to(DEVICE), spec_of(rule, 0.3 if rule != "square" else None, unit=False),
                                "triton", 0, 9, weight.to(DEVICE), True, groups=torch.arange(9, device=DEVICE))
    assert torch.equal(rows.cpu(), torch.zeros(9, dtype=torch.float64))
    assert torch.equal(grad.cpu(), torch.zeros_like(z))


@pytest.mark.parametrize("rule,eps", RULE_EPS)
def test_two_views_as_groups_equal_the_partner_path(gen, rule, eps):
    """groups = arange(N).repeat(2) (P_i = {p(i)}) against the backend's SimCLR call on the same Z."""
    n, unit = 6, rule != "inverse"
    z = embeddings(gen, 2 * n, 5, unit).to(DEVICE)
    spec = spec_of(rule, eps, unit, detach_alpha=rule != "entropy")
    weight = (torch.rand(8, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    rows, grad = ops.call_fused(z, spec, "triton", 2, 10, weight, True, groups=torch.arange(n, device=DEVICE).repeat(2))
    pair_rows, pair_grad = ops.call_fused(z, spec, "triton", 2, 10, weight, True)
    assert_close(rows, pair_rows, "float64", f"{rule} loss rows", scale=loss_scale(z, spec))
    assert_close(grad, pair_grad, "float64", f"{rule} grad", scale=grad_scale(z, spec, 1.5))


# ----------------------------------------------------------------------------- a labelled queue


def memory_groups(gen, m, k, set_up):
    """Groups over [Z; Q] for K queue columns: "queue" (a labelled queue: queue labels shared
    with the batch, and labels only the queue has), "memory" (CrossBatchMemory's set-up: the
    batch columns ignored, each anchor's own copy in the memory as its self column, empty
    slots ignored) or "views" (an unlabelled queue: every queue row a negative of every
    anchor). Returns (groups, the queue rows to use: the memory holds copies of Z)."""
    labels = group_ids(gen, m, groups=4, singletons=2)
    if set_up == "views":
        return Groups.of(labels, k), None
    queue_labels = torch.randint(0, 6, (k,), generator=gen) * 7 - 11
    queue_labels[0] = labels[0]
    if set_up == "queue":
        return Groups.of(labels, k, queue_labels), None
    slots = torch.randperm(k, generator=gen)[:m]
    queue_labels[slots] = labels
    filled = torch.rand(k, generator=gen) > 0.2
    filled[slots] = True
    return Groups.of(labels, k, queue_labels, queue_valid=filled, batch_columns=False, self_col=m + slots), slots


def queue_rows(gen, z, k, slots, unit):
    """K queue rows; the memory set-up holds copies of the batch in `slots`."""
    queue = embeddings(gen, k, z.shape[1], unit, z.dtype)
    if slots is not None:
        queue[slots] = z
    return queue


@pytest.mark.parametrize("set_up", ["queue", "memory", "views"])
@pytest.mark.parametrize("rule,eps", RULE_EPS)
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_every_rule_with_queue_columns_matches_the_float64_reference(gen, set_up, rule, eps, detach_alpha):
    """M = 11 anchors and K = 17 queue columns (K > M), odd sizes; the three set-ups of
    memory_groups; unit rows for detach_alpha=True, rows of norm ≈ 1 otherwise."""
    m, k, unit = 11, 17, detach_alpha
    z = embeddings(gen, m, 4, unit)
    groups, slots = memory_groups(gen, m, k, set_up)
    spec = spec_of(rule, eps, unit, detach_alpha)
    check(z, spec, groups, queue=queue_rows(gen, z, k, slots, unit),
          what=f"{set_up} {rule} eps={eps} detach={detach_alpha}")


@pytest.mark.parametrize("config", SMALL_TILES, ids=["single-chunk", "chunked"])
@pytest.mark.parametrize("set_up", ["queue", "memory"])
@pytest.mark.parametrize("rule,eps,detach_alpha", [("direct", 0.3, False), ("square", None, True),
                                                   ("infonce", 0.3, True), ("entropy", None, True)])
def test_queue_columns_in_tiles_smaller_than_the_rows(gen, config, set_up, rule, eps, detach_alpha):
    """K = 7 < M = 21 over tiles of 16 (the queue starts inside a column tile), a row range with
    weights, D = 20 on the chunked-feature path."""
    m, k = 21, 7
    d = 11 if config.single_chunk else 20
    unit = rule != "direct"
    z = embeddings(gen, m, d, unit)
    groups, slots = memory_groups(gen, m, k if set_up == "queue" else 2 * m, set_up)
    k = groups.columns - m
    weight = torch.rand(16, generator=gen, dtype=torch.float64) + 0.5
    check(z, spec_of(rule, eps, unit, detach_alpha), groups, lo=3, hi=19, weight=weight, config=config,
          what=f"{set_up} {rule} {config}", queue=queue_rows(gen, z, k, slots, unit))


@pytest.mark.parametrize("rule,eps", [("direct", 0.3), ("infonce", 0.3), ("square", None)])
def test_float32_with_a_labelled_queue(gen, rule, eps):
    m, k = 13, 9
    z = embeddings(gen, m, 7, unit=True, dtype=torch.float32)
    groups, _ = memory_groups(gen, m, k, "queue")
    check(z, spec_of(rule, eps), groups, precision="float32", what=f"float32 {rule}",
          queue=embeddings(gen, k, 7, True, torch.float32))


def test_queue_of_ignored_columns_only_adds_nothing(gen):
    """A memory whose slots are all empty: the same loss and batch gradient as no queue, and a
    zero gradient on the empty slots."""
    m, k = 10, 6
    z = embeddings(gen, m, 4, unit=True)
    labels = group_ids(gen, m)
    groups = Groups.of(labels, k, torch.zeros(k, dtype=torch.long), queue_valid=torch.zeros(k, dtype=torch.bool))
    spec = spec_of("infonce", 0.3)
    rows, grad = ops.call_fused(z.to(DEVICE), spec, "triton", 0, m, None, True,
                                queue=embeddings(gen, k, 4, True).to(DEVICE), groups=Groups(*(t.to(DEVICE) for t in groups.tensors())))
    plain_rows, plain_grad = ops.call_fused(z.to(DEVICE), spec, "triton", 0, m, None, True, groups=labels.to(DEVICE))
    assert_close(rows, plain_rows, "float64", "loss rows")
    assert_close(grad[:m], plain_grad, "float64", "batch gradient")
    assert torch.count_nonzero(grad[m:]) == 0


def test_bad_group_ids_are_refused_by_the_raw_op(gen):
    z = embeddings(gen, 8, 3, unit=True).to(DEVICE)
    spec = spec_of("direct")
    ids = torch.arange(4, device=DEVICE).repeat(2)
    with pytest.raises(ValueError, match="1-D tensor of M = 8 group ids"):
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, groups=ids[:7])
    with pytest.raises(ValueError, match="1-D tensor of M = 8 group ids"):
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, groups=ids[None])
    with pytest.raises(TypeError, match="integer ids"):
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, groups=ids.double())
    with pytest.raises(TypeError, match="integer ids"):
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, groups=ids > 1)
    with pytest.raises(ValueError, match="negatives='all'"):
        kernels.alpha_cl_fused(z, make_spec("direct", negatives="cross"), 0, 8, None, True, groups=ids)
    # Over [Z; Q]: K = 2 queue columns need M + K = 10 column ids.
    with pytest.raises(ValueError, match="col_ids must be a 1-D tensor of M \\+ K = 10 group ids"):
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, queue=z[:2], groups=Groups.of(ids, 3))
    with pytest.raises(ValueError, match="self_col must be a 1-D tensor of M = 8"):
        full = Groups.of(ids, 2)
        kernels.alpha_cl_fused(z, spec, 0, 8, None, True, queue=z[:2],
                               groups=Groups(full.row_ids, full.col_ids, full.self_col[:7], full.positive_count,
                                             full.negative_count))


def test_supports_groups():
    assert kernels.supports_groups is True
    assert kernels.supports_grouped_queue is True
    assert dispatch.supports("triton", "all", True, has_groups=True) == (True, "")
    assert dispatch.supports("triton", "all", False, has_groups=True) == (True, "")
    assert dispatch.resolve_backend("triton", DEVICE, make_spec("direct"), has_groups=True) == "triton"

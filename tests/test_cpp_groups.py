"""Group-defined positives (labels, more than two views, labelled queues) in the compiled kernels.

The kernel contract with `groups=` (fastalpha.dispatch) of the cpp backend, both CPU
algorithms (the one pass and the symmetric tiles, forced with small tiles), and of the cuda
backend on a GPU (marker `gpu`), against the float64 closed form
reference.grouped_closed_form_gradient (itself checked against autograd in
tests/test_reference.py), on fresh random inputs: every rule, detach on/off, unit and raw
rows, float64/float32 (and bfloat16), a random row range with random row weights, several
chunks per call, and group layouts with V = 3 views, labels with singletons (anchors without
a positive) and pairs; layouts that straddle the tiles (M not a multiple of the tile, groups
spread over every tile, one huge group with singletons, tiles of one row). The general
contract of the raw op (ids of the columns of [Z; Q], ignored columns, self columns, a
labelled queue of K < M and K > M rows) against a dense float64 reference written here from
the definitions of J_i and P_i, by autograd. Also: groups of two are the SimCLR kernel, a batch
of one group has no loss, infonce's positives beyond float32's exponential range, and the raw
op's input checks.
"""
import math

import pytest
import torch

import fastalpha
from fastalpha import cpp_build, dispatch, ops, positives, reference
from fastalpha.backends import cpp, cuda
from fastalpha.rules import EPS_RULES, RULES, make_spec
from fastalpha.testing import (SQUARE_BETA_IN_FLOAT64, assert_close, beta_jumps_under_rounding, grad_scale, loss_scale,
                               precision_of)

if cpp_build.flag_set("FASTALPHA_NO_CPP"):
    pytest.skip("the cpp backend is disabled by FASTALPHA_NO_CPP=1", allow_module_level=True)

BACKENDS = {"cpu": "cpp", "cuda": "cuda"}
LAYOUTS = ("views", "labels", "pairs")
# The contract matrix: every rule with its default ε, and ε = 0.3 for the rules that have one.
RULE_EPS = [(rule, None) for rule in RULES] + [(rule, 0.3) for rule in EPS_RULES]


@pytest.fixture(scope="module", autouse=True)
def built_library():
    ok, reason = cpp.status()
    assert ok, f"the cpp backend did not build: {reason}"


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 13 rows, so that every call has several (and a partial last one)."""
    monkeypatch.setenv("FASTALPHA_CHUNK_ROWS", "13")


ALGORITHMS = ("onepass", "symmetric")


@pytest.fixture(params=ALGORITHMS)
def algorithm(request, monkeypatch):
    """Each CPU algorithm, forced; the symmetric one with tiles of at most 16 rows (blocks of
    M = 46…61 rows, with edges at the row range: several tiles and partial ones)."""
    monkeypatch.setenv("FASTALPHA_CPP_ALGORITHM", request.param)
    monkeypatch.setenv("FASTALPHA_TILE", "16")
    return request.param


def grouped_rows(gen, layout: str, d: int, dtype, unit: bool = True):
    """(z, ids): the stacked rows and their group ids for one layout.

    views   V = 3 views of N = 19 samples (g_k = k mod N), M = 57
    labels  M = 61 rows with 9 labels drawn at random (groups of varied sizes), and 3
            singleton labels (anchors without a positive)
    pairs   two views of N = 23 samples, M = 46 (the SimCLR sets)
    """
    if layout == "views":
        ids = positives.view_groups(19, 3)
    elif layout == "labels":
        ids = torch.cat([torch.randint(0, 9, (58,), generator=gen), torch.tensor([100, 101, 102])])
        ids = ids[torch.randperm(61, generator=gen)]
    else:
        ids = positives.view_groups(23, 2)
    m = ids.numel()
    z = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    if not unit:
        z = z * (0.5 + torch.rand(m, 1, generator=gen, dtype=torch.float64))  # norms in [0.5, 1.5)
    return z.to(dtype), ids


def random_row_range(gen, m):
    lo = int(torch.randint(0, m // 2, (1,), generator=gen))
    hi = int(torch.randint(lo + 1, m + 1, (1,), generator=gen))
    return lo, hi


def check_grouped(z, ids, spec, row_lo, row_hi, weight, precision, device="cpu"):
    """The backend of `device`, through the custom op, against the float64 closed form: loss
    rows and every gradient row."""
    rows, grad = ops.call_fused(z.to(device), spec, BACKENDS[device], row_lo, row_hi,
                                None if weight is None else weight.to(device), True, groups=ids.to(device))
    w64 = None if weight is None else weight.double()
    ref_rows, ref_grad = reference.grouped_closed_form_gradient(z.double(), spec, ids, w64, row_lo, row_hi)
    assert rows.dtype == torch.promote_types(z.dtype, torch.float32)
    assert grad.dtype == z.dtype and grad.shape == z.shape
    anchor_weight = 1.0 if weight is None else weight.abs().max().item()
    assert_close(rows, ref_rows, precision, "loss rows", scale=loss_scale(z, spec))
    assert_close(grad, ref_grad, precision, "gradient", scale=grad_scale(z, spec, anchor_weight))
    return rows, grad


GROUPED_CONTRACT = [
    pytest.mark.parametrize("layout", LAYOUTS),
    pytest.mark.parametrize("dtype", [torch.float64, torch.float32]),
    pytest.mark.parametrize("unit", [True, False]),
    pytest.mark.parametrize("detach", [True, False]),
    pytest.mark.parametrize("rule,eps", RULE_EPS),
]


def over_the_grouped_contract(test):
    """`test` over every layout, dtype, unit or raw rows, α detached or not, and rule (the
    arguments of contract_case), as if the marks of GROUPED_CONTRACT were stacked on it."""
    for mark in reversed(GROUPED_CONTRACT):
        test = mark(test)
    return test


def contract_case(gen, rule, eps, detach, unit, dtype, layout, device="cpu"):
    spec = make_spec(rule, eps=eps, normalize=unit, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z, ids = grouped_rows(gen, layout, {"views": 3, "labels": 11, "pairs": 8}[layout], dtype, unit)
    lo, hi = random_row_range(gen, z.shape[0])
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_grouped(z, ids, spec, lo, hi, weight, precision_of(dtype), device)


@over_the_grouped_contract
def test_kernel_matches_grouped_closed_form(gen, algorithm, rule, eps, detach, unit, dtype, layout):
    """Row sub-range, random row weights, unit or raw rows: the whole grouped contract."""
    contract_case(gen, rule, eps, detach, unit, dtype, layout)


GROUPED_RULE_PARAMETERS = [
    ("direct", dict(p=3.0)),
    ("direct", dict(eps=0.3)),                    # ε|J_i| with a per-anchor |J_i|
    ("entropy", dict(eps=2.0, temperature=0.1)),
    ("entropy", dict(temperature=0.02)),          # large logits: per-row shifts
    ("inverse", dict(gamma=3.0, temperature=0.1)),
    ("square", dict(temperature=0.05)),           # sparse support: several Michelot iterations
    ("square", dict(temperature=50.0)),           # support = every negative
    ("infonce", dict(eps=0.0)),                   # positives out of the denominator
    ("infonce", dict(eps=0.5, temperature=0.2)),  # positives in it, with log ε < 0
    ("infonce", dict(eps=1.0, temperature=0.1)),  # SupCon's L_out
    ("infonce", dict(eps=3.0, temperature=0.05)),  # log ε > 0: a positive's offset −τ log ε < 0
    # log ε = 100, beyond float32's exponential range: the tiles' fixed shift must start at the
    # positives' offset (relative to t(0) their weights e^{100} would overflow).
    ("infonce", dict(eps=math.exp(100.0), temperature=0.5)),
]


@pytest.mark.parametrize("rule,options", GROUPED_RULE_PARAMETERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_rule_parameters(gen, algorithm, rule, options, dtype):
    spec = make_spec(rule, normalize=False, **options)
    z, ids = grouped_rows(gen, "labels", 24, dtype, unit=False)
    check_grouped(z, ids, spec, 0, z.shape[0], None, precision_of(dtype))


def straddling_groups(gen, layout: str):
    """Group ids whose groups cross the tile boundaries of FASTALPHA_TILE = 7 in every way."""
    if layout == "spread":        # 4 groups, each with rows in every tile (M = 50, not a multiple of 7)
        return torch.arange(50) % 4
    if layout == "huge":          # one group of 40 rows and 13 singletons, shuffled
        ids = torch.cat([torch.zeros(40, dtype=torch.long), torch.arange(1, 14)])
        return ids[torch.randperm(53, generator=gen)]
    if layout == "contiguous":    # runs of 9 rows: groups that end inside a tile
        return torch.arange(47) // 9
    if layout == "distinct-pairs":  # pairs far apart (rows k and k + 33): positives in other tiles
        return torch.arange(66) % 33
    raise ValueError(layout)


@pytest.mark.parametrize("layout", ["spread", "huge", "contiguous", "distinct-pairs"])
@pytest.mark.parametrize("tile", [1, 7, 64])
@pytest.mark.parametrize("rule,eps", [("direct", None), ("entropy", 0.3), ("infonce", 1.0), ("infonce", 0.0),
                                      ("inverse", None), ("quadratic", None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_symmetric_tiles_with_groups_across_tiles(gen, monkeypatch, layout, tile, rule, eps, dtype):
    """Forced symmetric tiles of 1, 7 and 64 rows (one tile holding everything) with groups
    spread over the tiles, one huge group with singletons, runs that end inside a tile and
    pairs in distant tiles; raw rows, β, a random row range and weights."""
    monkeypatch.setenv("FASTALPHA_CPP_ALGORITHM", "symmetric")
    monkeypatch.setenv("FASTALPHA_TILE", str(tile))
    ids = straddling_groups(gen, layout)
    m = ids.numel()
    z = torch.nn.functional.normalize(torch.randn(m, 10, generator=gen, dtype=torch.float64), dim=1)
    z = (z * (0.5 + torch.rand(m, 1, generator=gen, dtype=torch.float64))).to(dtype)
    spec = make_spec(rule, eps=eps, normalize=False, detach_alpha=False)
    lo, hi = random_row_range(gen, m)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_grouped(z, ids, spec, lo, hi, weight, precision_of(dtype))


def test_infonce_positives_beyond_float32_exponential_range(gen, algorithm):
    """Positives much closer than every negative, τ = 0.01: (d2_ij − d2_ip)/τ ≈ 99 > log(float32 max).

    The positives are in infonce's denominator (ε = 1), so the row's shift must be taken over
    them as well: relative to the closest negative alone their weights would overflow.
    """
    centres = torch.eye(32, dtype=torch.float64)[:8]  # orthogonal: d2 = 1 between groups
    ids = torch.arange(8).repeat(4)
    z = torch.nn.functional.normalize(centres[ids] + 0.01 * torch.randn(32, 32, generator=gen, dtype=torch.float64), dim=1)
    spec = make_spec("infonce", temperature=0.01, eps=1.0)
    d2 = (1 - z @ z.T).clamp_min(0)
    same = ids[:, None] == ids[None, :]
    assert (d2[~same].min() - d2[same].max()) / 0.01 > 89, "the construction should spread the logits"
    for dtype in (torch.float64, torch.float32):
        check_grouped(z.to(dtype), ids, spec, 0, 32, None, precision_of(dtype))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_groups_of_two_are_the_paired_kernel(gen, rule, dtype):
    """g_k = k mod N on two views: the grouped op with the pull from group sums equals the SimCLR op."""
    spec = make_spec(rule, normalize=False, detach_alpha=False)
    if beta_jumps_under_rounding(spec, dtype):
        spec = make_spec(rule, normalize=False, detach_alpha=True)
    z, ids = grouped_rows(gen, "pairs", 16, dtype, unit=False)
    lo, hi = random_row_range(gen, z.shape[0])
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    rows, grad = cpp.alpha_cl_fused(z, spec, lo, hi, weight, True, groups=ids)
    paired_rows, paired_grad = cpp.alpha_cl_fused(z, spec, lo, hi, weight, True)
    precision = precision_of(dtype)
    assert_close(rows, paired_rows.double(), precision, "loss rows", scale=loss_scale(z, spec))
    assert_close(grad, paired_grad.double(), precision, "gradient", scale=grad_scale(z, spec))


def test_anchors_without_a_positive_or_a_negative(gen, algorithm):
    """A singleton label has no loss term (0, and no pull) but stays a negative of the others;
    all labels distinct leave no positive, one group for the whole batch no negative: zero
    losses and a zero gradient (also for one row)."""
    z, _ = grouped_rows(gen, "pairs", 8, torch.float64)
    m = z.shape[0]
    spec = make_spec("entropy", eps=0.5)
    ids = torch.arange(m) % 5
    ids[:3] = torch.tensor([50, 51, 52])
    rows, _ = check_grouped(z, ids, spec, 0, m, None, "float64")
    assert (rows[:3] == 0).all() and (rows[3:] != 0).all()
    for rule in ("direct", "infonce"):
        for ids in (torch.zeros(m, dtype=torch.long), torch.randperm(m, generator=gen)):
            rows, grad = cpp.alpha_cl_fused(z, make_spec(rule, eps=1.0), 0, m, None, True, groups=ids)
            assert (rows == 0).all() and (grad == 0).all()
    rows, grad = cpp.alpha_cl_fused(z[:1], spec, 0, 1, None, True, groups=torch.zeros(1, dtype=torch.long))
    assert rows.shape == (1,) and (rows == 0).all() and (grad == 0).all()


def test_forward_only_and_an_empty_row_range(gen):
    z, ids = grouped_rows(gen, "labels", 9, torch.float32)
    spec = make_spec("inverse")
    rows, grad = cpp.alpha_cl_fused(z, spec, 5, 40, None, False, groups=ids)
    full_rows, _ = cpp.alpha_cl_fused(z, spec, 5, 40, None, True, groups=ids)
    assert grad.shape == (0, z.shape[1]) and torch.equal(rows, full_rows)
    rows, grad = cpp.alpha_cl_fused(z, spec, 7, 7, None, True, groups=ids)
    assert rows.shape == (0,) and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(gen, dtype):
    z, ids = grouped_rows(gen, "views", 16, torch.float64)
    spec = make_spec("direct")
    rows, grad = cpp.alpha_cl_fused(z.to(dtype), spec, 0, z.shape[0], None, True, groups=ids)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    ref_rows, ref_grad = reference.grouped_closed_form_gradient(z.to(dtype).double(), spec, ids, None, 0, z.shape[0])
    assert_close(rows, ref_rows, "float32", "loss rows", scale=loss_scale(z, spec))
    assert_close(grad, ref_grad, precision_of(dtype), "gradient", scale=grad_scale(z, spec))


def test_custom_op_gradient_matches_autograd(gen):
    """Through torch.ops.fastalpha.alpha_cl_fused (backend="cpp"): the gradient of Σ_i w_i loss_i
    against autograd of the dense float64 reference (the oracle)."""
    z, ids = grouped_rows(gen, "labels", 13, torch.float32, unit=False)
    spec = make_spec("entropy", normalize=False, detach_alpha=False, eps=0.2)
    lo, hi = 4, 50
    weight = torch.rand(hi - lo, generator=gen)
    rows, grad = ops.call_fused(z, spec, "cpp", lo, hi, weight, True, groups=ids)
    z64 = z.double().requires_grad_()
    ref_rows = reference.grouped_loss_rows(z64, spec, ids, lo, hi)
    (ref_rows * weight.double()).sum().backward()
    assert_close(rows, ref_rows, "float32", "loss rows", scale=loss_scale(z, spec))
    assert_close(grad, z64.grad, "float32", "gradient", scale=grad_scale(z, spec))


def test_auto_backend_takes_cpp_for_groups():
    assert cpp.supports_groups and cpp.supports_grouped_queue
    assert dispatch.supports("cpp", "all", True, True) == (True, "")
    assert dispatch.resolve_backend("auto", torch.device("cpu"), make_spec("direct"), False, True) == "cpp"


def _raw_grouped(z, row_ids, col_ids, self_col, d2_mean, negative_count, row_lo=0, row_hi=None, queue=None):
    row_hi = z.shape[0] if row_hi is None else row_hi
    return cpp_build.ops("cpu").alpha_cl_fused_grouped(
        z, queue, row_lo, row_hi, None, row_ids, col_ids, self_col, d2_mean, negative_count, "direct", 0.5, 4.0, 2.0,
        0.0, True, True, True)


def _raw_args():
    return dict(row_ids=torch.arange(6) % 3, col_ids=torch.arange(6) % 3, self_col=torch.arange(6),
                d2_mean=torch.zeros(6, dtype=torch.float64), negative_count=torch.full((6,), 4, dtype=torch.long))


@pytest.mark.parametrize("bad,error,message", [
    (dict(row_ids=torch.zeros(6, dtype=torch.int32)), TypeError, "row_ids must have dtype Long"),
    (dict(row_ids=torch.zeros(5, dtype=torch.long)), ValueError, r"row_ids must have shape \(6,\)"),
    (dict(row_ids=torch.zeros(6, 1, dtype=torch.long)), ValueError, r"row_ids must have shape \(6,\)"),
    (dict(col_ids=torch.zeros(6)), TypeError, "col_ids must have dtype Long"),
    (dict(col_ids=torch.zeros(7, dtype=torch.long)), ValueError, r"col_ids must have shape \(6,\)"),
    (dict(self_col=torch.zeros(6, dtype=torch.int32)), TypeError, "self_col must have dtype Long"),
    (dict(self_col=torch.zeros(4, dtype=torch.long)), ValueError, r"self_col must have shape \(6,\)"),
    (dict(d2_mean=torch.zeros(6)), TypeError, "d2_mean must have dtype Double"),
    (dict(d2_mean=torch.zeros(4, dtype=torch.float64)), ValueError, r"d2_mean must have shape"),
    (dict(negative_count=torch.zeros(6)), TypeError, "negative_count must have dtype Long"),
    (dict(negative_count=torch.zeros(7, dtype=torch.long)), ValueError, r"negative_count must have shape \(6,\)"),
    # With a queue of K = 3 rows the columns are M + K = 9.
    (dict(queue=torch.zeros(3, 4, dtype=torch.float64)), ValueError, r"col_ids must have shape \(9,\)"),
    (dict(queue=torch.zeros(3, 5, dtype=torch.float64)), RuntimeError, r"queue must have shape \(K, 4\)"),
    (dict(queue=torch.zeros(3, 4)), RuntimeError, "queue must have dtype Double"),
])
def test_raw_grouped_op_rejects_bad_input(bad, error, message):
    args = _raw_args()
    args.update(bad)
    with pytest.raises(error, match=message):
        _raw_grouped(torch.randn(6, 4, dtype=torch.float64), **args)


def test_raw_grouped_op_checks_z_and_the_rows():
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _raw_grouped(torch.zeros(6, 4, dtype=torch.int32), **_raw_args())
    with pytest.raises(RuntimeError, match="row_hi <= M"):
        _raw_grouped(torch.randn(6, 4, dtype=torch.float64), **_raw_args(), row_hi=7)


# ---------------------------------------------------------------------------------------------
# The raw op's general contract: the columns are [Z; Q], column c has an id col_ids[c] (−1:
# ignored), anchor i an id row_ids[i] and a self column self_col[i] (−1: none), and
#   J_i = {c : col_ids[c] ≥ 0, col_ids[c] ≠ row_ids[i]},   P_i = {c : col_ids[c] = row_ids[i], c ≠ self_col[i]}.
# The reference below is written from these definitions (dense, float64, autograd); the
# kernel's pull output gets its gradient here densely, as fastalpha.positives does from group
# sums.

QUEUE_LAYOUTS = ("queue-short", "queue-long", "self-in-queue", "memory", "ignored-rows")


def contract_case_inputs(gen, layout: str, d: int, unit: bool):
    """(cols, m, row_ids, col_ids, self_col) in float64 for one layout of the general contract.

    queue-short    M = 40, K = 23: Z's rows are columns with their own ids, the queue's labels
                   drawn from the same pool, a fifth of its slots empty (−1); two singleton labels
    queue-long     the same with M = 24, K = 70
    self-in-queue  M = 30, K = 45: the queue holds noisy copies of 12 anchors, their self
                   columns (so their own row of Z is a positive of theirs), 5 anchors have no
                   self column (their own row is a positive at distance 0)
    memory         pml's CrossBatchMemory drop-in, M = 30, K = 60: the batch rows are not
                   columns (−1), the memory holds copies of 20 anchors (their self columns)
    ignored-rows   K = 0, M = 45, 9 rows of Z (anchors among them) ignored as columns
    """
    m, k = {"queue-short": (40, 23), "queue-long": (24, 70), "self-in-queue": (30, 45), "memory": (30, 60),
            "ignored-rows": (45, 0)}[layout]
    labels = 6
    row_ids = torch.randint(0, labels, (m,), generator=gen)
    row_ids[:2] = torch.tensor([90, 91])  # labels nowhere else: no positive unless the queue has one
    row_ids = row_ids[torch.randperm(m, generator=gen)]
    z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    q = torch.randn(k, d, generator=gen, dtype=torch.float64)
    q_ids = torch.randint(0, labels + 1, (k,), generator=gen)
    q_ids[torch.rand(k, generator=gen) < 0.2] = -1
    self_col = torch.arange(m)
    col_z = row_ids.clone()
    if layout in ("self-in-queue", "memory"):
        copies = 12 if layout == "self-in-queue" else 20
        anchors = torch.randperm(m, generator=gen)[:copies]
        slots = torch.randperm(k, generator=gen)[:copies]
        q[slots] = z[anchors] + 0.1 * torch.randn(copies, d, generator=gen, dtype=torch.float64)
        q_ids[slots] = row_ids[anchors]
        self_col[anchors] = m + slots
        if layout == "self-in-queue":
            others = torch.tensor([i for i in torch.randperm(m, generator=gen).tolist() if i not in anchors.tolist()][:5])
            self_col[others] = -1
        else:
            col_z[:] = -1
            self_col[[i for i in range(m) if i not in anchors.tolist()]] = -1
    if layout == "ignored-rows":
        col_z[torch.randperm(m, generator=gen)[:9]] = -1
    cols = torch.cat([z, q])
    cols = torch.nn.functional.normalize(cols, dim=1)
    if not unit:
        cols = cols * (0.5 + torch.rand(m + k, 1, generator=gen, dtype=torch.float64))
    return cols, m, row_ids, torch.cat([col_z, q_ids]), self_col


def contract_masks(row_ids, col_ids, self_col, lo, hi):
    """(P, J), (R, C) boolean masks of the anchors [lo, hi), from the definitions."""
    r = row_ids[lo:hi, None]
    c = col_ids[None, :]
    index = torch.arange(col_ids.numel())[None, :]
    return (c == r) & (index != self_col[lo:hi, None]), (c >= 0) & (c != r)


def contract_distances(rows, cols, unit):
    """The Gram form of d2 (reference.squared_distances) without its clamp at 0: an anchor
    whose self column lies elsewhere has its own row as a positive, d2_ii = 0 up to rounding,
    whose gradient under the clamp would depend on the sign of that rounding (the kernels use
    the Gram form's, 0 for raw rows and −2 z_i for unit rows, which the normalisation removes)."""
    if unit:
        return 1 - rows @ cols.T
    return ((rows * rows).sum(1)[:, None] + (cols * cols).sum(1)[None, :]) / 2 - rows @ cols.T


def dense_contract_loss_rows(cols, spec, positives, negatives, lo, hi):
    """loss_i from the definitions, differentiable in cols (float64); 0 without a positive or a negative."""
    active = torch.nonzero(positives.any(1) & negatives.any(1))[:, 0]
    pos, neg = positives[active], negatives[active]
    d2 = contract_distances(cols[lo + active], cols, spec.unit_rows)
    d2_pos = torch.where(pos, d2, torch.zeros_like(d2)).sum(1) / pos.sum(1).to(d2.dtype)
    if spec.rule == "infonce":
        v = (d2_pos[:, None] - d2) / spec.temperature
        logits = torch.where(neg, v, torch.full_like(v, -float("inf")))
        if spec.eps > 0:
            logits = torch.where(pos, v + math.log(spec.eps), logits)
        values = torch.logsumexp(logits, 1)
    else:
        source = (d2.detach(), d2_pos.detach()) if spec.detach_alpha else (d2, d2_pos)
        alpha = reference.alpha_from_distances(*source, neg, spec)
        values = (alpha * (d2_pos[:, None] - d2)).sum(1)
    return (cols[lo:hi, 0] * 0).index_put((active,), values, accumulate=True)


def dense_pull_gradient(cols, positives, pull, lo, hi, unit):
    """∂/∂[Z; Q] of Σ_i pull_i d̄2_i (d̄2_i the mean of d2 over P_i), densely."""
    count = positives.sum(1).to(cols.dtype)
    u = torch.where(count > 0, pull / count.clamp_min(1), torch.zeros_like(pull))
    coef = u[:, None] * positives.to(cols.dtype)
    rows = cols[lo:hi]
    grad = -(coef.T @ rows)
    grad[lo:hi] -= coef @ cols
    if not unit:
        grad += coef.sum(0)[:, None] * cols
        grad[lo:hi] += coef.sum(1)[:, None] * rows
    return grad


def check_contract(gen, cols, m, row_ids, col_ids, self_col, spec, dtype, device="cpu", lo=None, hi=None):
    """The raw grouped op (+ the dense pull) against autograd of the dense reference: loss
    rows of the anchors with a loss term, every gradient row of [Z; Q], finite everywhere."""
    if lo is None:
        lo, hi = random_row_range(gen, m)
    positives, negatives = contract_masks(row_ids, col_ids, self_col, lo, hi)
    has_loss = positives.any(1) & negatives.any(1)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64) * has_loss
    d2 = contract_distances(cols[lo:hi], cols, spec.unit_rows)
    count = positives.sum(1)
    d2_mean = torch.where(count > 0, torch.where(positives, d2, torch.zeros_like(d2)).sum(1) / count.clamp_min(1),
                          torch.zeros(hi - lo, dtype=torch.float64))
    compute = torch.promote_types(dtype, torch.float32)
    c = cols.to(dtype).to(compute)
    on = dict(device=device)
    loss, grad, pull = cpp_build.ops("cpu" if device == "cpu" else "cuda").alpha_cl_fused_grouped(
        c[:m].to(**on).contiguous(), c[m:].to(**on).contiguous() if cols.shape[0] > m else None, lo, hi,
        weight.to(compute).to(**on), row_ids.to(**on), col_ids.to(**on), self_col.to(**on),
        d2_mean.to(compute).to(**on), negatives.sum(1).to(**on), spec.rule, spec.temperature, spec.p, spec.gamma,
        spec.eps, spec.detach_alpha, spec.unit_rows, True)
    loss, grad, pull = loss.cpu(), grad.cpu(), pull.cpu()
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(pull).all()
    assert grad.shape == cols.shape and (loss[negatives.sum(1) == 0] == 0).all()
    total = grad.double() + dense_pull_gradient(c.double(), positives, pull.double(), lo, hi, spec.unit_rows)
    x = c.double().requires_grad_()
    ref_rows = dense_contract_loss_rows(x, spec, positives, negatives, lo, hi)
    (ref_rows * weight).sum().backward()
    precision = precision_of(dtype)
    assert_close(loss[has_loss], ref_rows.detach()[has_loss], precision, "loss rows", scale=loss_scale(c, spec))
    assert_close(total, x.grad, precision, "gradient", scale=grad_scale(c, spec))


@pytest.mark.parametrize("layout", QUEUE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unit,detach", [(True, True), (False, False)])
@pytest.mark.parametrize("rule,eps", RULE_EPS)
def test_labelled_queue_contract(gen, algorithm, layout, dtype, unit, detach, rule, eps):
    """Every rule on the general contract: labelled queues of K < M and K > M rows with empty
    slots, self columns in the queue, the memory drop-in and ignored rows of Z, both CPU
    algorithms (the symmetric one runs where the ids allow it, the one pass otherwise)."""
    spec = make_spec(rule, eps=eps, normalize=unit, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    cols, m, row_ids, col_ids, self_col = contract_case_inputs(gen, layout, 9, unit)
    check_contract(gen, cols, m, row_ids, col_ids, self_col, spec, dtype)


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("rule,eps", [("infonce", 1.0), ("direct", 0.3), ("entropy", None), ("quadratic", None)])
def test_backend_with_positives_groups_and_a_queue(gen, algorithm, memory, rule, eps):
    """cpp.alpha_cl_fused with a fastalpha.positives.Groups and a queue (the Python glue: d̄2_i
    and the pull from group sums over [Z; Q]) against reference.grouped_closed_form_gradient:
    a labelled queue with empty slots, or the CrossBatchMemory drop-in (batch rows not columns,
    self columns in the memory)."""
    m, k, d = 36, 50, 8
    labels = torch.randint(0, 5, (m,), generator=gen)
    z = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    q = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    q_labels = torch.randint(0, 6, (k,), generator=gen)
    valid = torch.rand(k, generator=gen) > 0.2
    self_col = None
    if memory:
        slots = torch.randperm(k, generator=gen)[:m]
        q[slots] = z
        q_labels[slots] = labels
        valid[slots] = True
        self_col = m + slots
    groups = positives.Groups.of(labels, k, q_labels, valid, batch_columns=not memory, self_col=self_col)
    spec = make_spec(rule, eps=eps)
    lo, hi = random_row_range(gen, m)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64)
    rows, grad = cpp.alpha_cl_fused(z, spec, lo, hi, weight, True, queue=q, groups=groups)
    ref_rows, ref_grad = reference.grouped_closed_form_gradient(z, spec, groups, weight, lo, hi, queue=q)
    assert grad.shape == (m + k, d)
    assert_close(rows, ref_rows, "float64", "loss rows", scale=loss_scale(z, spec))
    assert_close(grad, ref_grad, "float64", "gradient", scale=grad_scale(z, spec))


@pytest.mark.parametrize("rule", ["direct", "infonce"])
def test_contract_without_any_loss_term_is_finite(gen, algorithm, rule):
    """No anchor with a negative (one live label in the columns) or none with a positive:
    losses 0, zero gradient, no NaN."""
    cols, m, row_ids, _, self_col = contract_case_inputs(gen, "queue-short", 7, True)
    spec = make_spec(rule, eps=1.0)
    k = cols.shape[0] - m
    same = torch.cat([torch.zeros(m, dtype=torch.long), torch.where(torch.rand(k, generator=gen) < 0.3, -1, 0)])
    for row, col in ((torch.zeros(m, dtype=torch.long), same), (torch.arange(m), torch.cat([torch.arange(m), -torch.ones(k, dtype=torch.long)]))):
        check_contract(gen, cols, m, row, col, self_col, spec, torch.float32, lo=0, hi=m)


def test_ordinary_contract_equals_the_groups_call(gen, algorithm):
    """col_ids = row_ids, self_col = arange(M), no queue: the raw op is what groups= computes."""
    z, ids = grouped_rows(gen, "labels", 12, torch.float64)
    dense = positives.dense_ids(ids)
    check_contract(gen, z, z.shape[0], dense, dense, torch.arange(z.shape[0]), make_spec("entropy", eps=0.4),
                   torch.float64)


# ---------------------------------------------------------------------------------------------
# The cuda backend: the same checks on a GPU (float32 products with tf32 off, so that the
# float32 tolerance applies).

@pytest.fixture
def cuda_float32(monkeypatch):
    ok, reason = cuda.status()
    assert ok, f"the cuda backend is not available: {reason}"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.mark.gpu
def test_cuda_supports_groups():
    assert cuda.supports_groups and cuda.supports_grouped_queue
    assert dispatch.supports("cuda", "all", False, True)[0] and dispatch.supports("cuda", "all", True, True)[0]


@pytest.mark.gpu
@over_the_grouped_contract
def test_cuda_matches_grouped_closed_form(gen, cuda_float32, rule, eps, detach, unit, dtype, layout):
    contract_case(gen, rule, eps, detach, unit, dtype, layout, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rule,options", GROUPED_RULE_PARAMETERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_grouped_rule_parameters(gen, cuda_float32, rule, options, dtype):
    spec = make_spec(rule, normalize=False, **options)
    z, ids = grouped_rows(gen, "labels", 24, dtype, unit=False)
    check_grouped(z, ids, spec, 0, z.shape[0], None, precision_of(dtype), device="cuda")


@pytest.mark.gpu
def test_cuda_agrees_with_cpp_and_handles_singletons_and_one_group(gen, cuda_float32):
    z, ids = grouped_rows(gen, "labels", 20, torch.float64)
    spec = make_spec("infonce", eps=1.0, temperature=0.1)
    rows, grad = cuda.alpha_cl_fused(z.cuda(), spec, 3, 50, None, True, groups=ids.cuda())
    cpu_rows, cpu_grad = cpp.alpha_cl_fused(z, spec, 3, 50, None, True, groups=ids)
    assert_close(rows.cpu(), cpu_rows, "float64", "loss rows", scale=loss_scale(z, spec))
    assert_close(grad.cpu(), cpu_grad, "float64", "gradient", scale=grad_scale(z, spec))
    one = torch.zeros(z.shape[0], dtype=torch.long, device="cuda")
    rows, grad = cuda.alpha_cl_fused(z.cuda(), spec, 0, z.shape[0], None, True, groups=one)
    assert (rows == 0).all() and (grad == 0).all()


@pytest.mark.gpu
def test_cuda_raw_grouped_op_rejects_groups_on_another_device():
    z = torch.randn(6, 4, dtype=torch.float64, device="cuda")
    with pytest.raises(ValueError, match="row_ids must be on cuda"):
        cpp_build.ops("cuda").alpha_cl_fused_grouped(
            z, None, 0, 6, None, torch.arange(6) % 3, torch.arange(6, device="cuda") % 3, torch.arange(6, device="cuda"),
            torch.zeros(6, dtype=torch.float64, device="cuda"), torch.full((6,), 4, dtype=torch.long, device="cuda"),
            "direct", 0.5, 4.0, 2.0, 0.0, True, True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", QUEUE_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unit,detach", [(True, True), (False, False)])
@pytest.mark.parametrize("rule,eps", RULE_EPS)
def test_cuda_labelled_queue_contract(gen, cuda_float32, layout, dtype, unit, detach, rule, eps):
    """The raw CUDA op on the general contract (labelled queues, ignored columns, self columns)."""
    spec = make_spec(rule, eps=eps, normalize=unit, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    cols, m, row_ids, col_ids, self_col = contract_case_inputs(gen, layout, 9, unit)
    check_contract(gen, cols, m, row_ids, col_ids, self_col, spec, dtype, device="cuda")

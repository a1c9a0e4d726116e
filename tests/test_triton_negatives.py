"""Triton backend: the two-tower ("cross") and queue-only ("none") negative sets, and queues.

Every rule × {cross, none+queue, all+queue, cross+queue} × detach_alpha × normalize (unit
rows) in float64 against `reference.closed_form_gradient` (float64, dense, explicit J_i mask):
the per-anchor losses and the whole gradient over [Z; queue], the queue's rows included (the
learnable temperature's Euler identity reads them). Then: tiles smaller than the columns (so
that the view boundary, the end of Z and the queue fall inside and between tiles) on both the
single-chunk and the chunked-feature path, row ranges with row weights, float32, the public
API against backend="eager" (with a learnable τ and MoCo's N = 1), and `supports`.

Kernels run in Triton's CPU interpreter without a GPU (conftest sets TRITON_INTERPRET=1):
sizes are tiny. tests/test_negatives.py also covers triton once `supports` says yes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastalpha
from fastalpha import dispatch, reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)
from fastalpha.backends.triton import launch  # noqa: E402
from fastalpha.backends.triton.blocks import BlockConfig  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

#: (negatives, queue rows K): the set-ups beyond SimCLR.
MODES = [("cross", 0), ("none", 3), ("all", 3), ("cross", 3)]

#: Parameters that make every rule's extra terms matter (ε·|J_i| counts, a wide sparsemax support).
RULE_PARAMS = {"quadratic": {}, "entropy": dict(eps=0.5), "direct": dict(eps=0.3), "inverse": {},
               "square": dict(temperature=1.0), "infonce": dict(eps=1.0)}


# float32 products in IEEE: the interpreter ignores TF32 (GPU tests opt in explicitly).
pytestmark = pytest.mark.usefixtures("ieee_float32")


def rows_and_queue(gen, n, d, k, unit, dtype=torch.float64):
    """Z (2n × d) and a queue (k × d, or None) as the fused op receives them: unit rows when
    `unit`, else Gaussian rows of norm ≈ 1 (so that d2 = O(1)). The second view is the first
    plus noise, so positives are closer than negatives and the rules' weights are uneven."""
    z1 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    z = torch.cat([z1, z1 + 0.7 * torch.randn(n, d, generator=gen, dtype=torch.float64)])
    queue = torch.randn(k, d, generator=gen, dtype=torch.float64) if k else None
    if unit:
        z = F.normalize(z, dim=1)
        queue = None if queue is None else F.normalize(queue, dim=1)
    else:
        z = z / math.sqrt(d)
        queue = None if queue is None else queue / math.sqrt(d)
    return z.to(dtype), (None if queue is None else queue.to(dtype))


def call(z, spec, lo, hi, weight, queue, need_grad=True, config=None):
    """The backend's contract; `queue=` only when given, as fastalpha.ops passes it."""
    extra = {} if queue is None else {"queue": queue.to(DEVICE)}
    w = None if weight is None else weight.to(DEVICE)
    if config is not None:
        return launch.fused_loss_and_grad(z.to(DEVICE), spec, lo, hi, w, need_grad, config, **extra)
    return kernels.alpha_cl_fused(z.to(DEVICE), spec, lo, hi, w, need_grad, **extra)


def oracle(z, spec, lo, hi, weight, queue):
    return reference.closed_form_gradient(z.double(), spec, None if weight is None else weight.double(), lo, hi,
                                          None if queue is None else queue.double())


def check(z, spec, queue, precision="float64", lo=0, hi=None, weight=None, config=None, what=""):
    hi = z.shape[0] if hi is None else hi
    rows, grad = call(z, spec, lo, hi, weight, queue, config=config)
    ref_rows, ref_grad = oracle(z, spec, lo, hi, weight, queue)
    k = 0 if queue is None else queue.shape[0]
    assert grad.shape == (z.shape[0] + k, z.shape[1]), f"{what}: grad must have M + K rows"
    assert grad.dtype == z.dtype, what
    assert_close(rows, ref_rows, precision, f"{what} loss rows")
    assert_close(grad[:z.shape[0]], ref_grad[:z.shape[0]], precision, f"{what} grad of Z")
    if k:
        assert_close(grad[z.shape[0]:], ref_grad[z.shape[0]:], precision, f"{what} grad rows of the queue")
    # The values alone (need_grad=False) are the same losses and an empty gradient.
    rows_only, empty = call(z, spec, lo, hi, weight, queue, need_grad=False, config=config)
    assert empty.shape == (0, z.shape[1]), what
    assert_close(rows_only, ref_rows, precision, f"{what} loss rows without the gradient")


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("unit", [True, False])
def test_every_rule_and_set_matches_the_float64_reference(gen, rule, negatives, k, detach_alpha, unit):
    z, queue = rows_and_queue(gen, 5, 4, k, unit)
    spec = make_spec(rule, normalize=unit, detach_alpha=detach_alpha, negatives=negatives, **RULE_PARAMS[rule])
    check(z, spec, queue, what=f"{rule} {negatives} K={k} detach={detach_alpha} unit={unit}")


#: Tiles of 16 rows/columns over M = 24 (view boundary at 12, inside the first tile) and a
#: queue of 10 (columns 24..33: the end of Z inside the second tile, the queue's last rows in a
#: third tile that no tile of Z reaches); D = 20 on the chunked path runs two Gram chunks and two
#: output-feature programs.
SMALL_TILES = [BlockConfig(16, 16, 16, 16, True, 4, 1), BlockConfig(16, 16, 16, 16, False, 4, 1)]


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("config", SMALL_TILES, ids=["single-chunk", "chunked"])
@pytest.mark.parametrize("rule,detach_alpha", [("direct", True), ("square", False), ("infonce", True), ("inverse", False)])
def test_tiles_smaller_than_the_columns(gen, negatives, k, config, rule, detach_alpha):
    d = 12 if config.single_chunk else 20
    z, queue = rows_and_queue(gen, 12, d, 10 if k else 0, unit=rule != "inverse")
    spec = make_spec(rule, normalize=rule != "inverse", detach_alpha=detach_alpha, negatives=negatives,
                     **RULE_PARAMS[rule])
    check(z, spec, queue, config=config, what=f"{rule} {negatives} {config}")


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("rule,detach_alpha", [("quadratic", True), ("direct", False), ("square", True), ("infonce", True)])
def test_row_range_and_row_weights(gen, negatives, k, rule, detach_alpha):
    """The anchors [3, 9) of M = 12 (both views, a partial tile) with weights: the distributed
    layer's call; the gradient still covers every row of Z and of the queue."""
    z, queue = rows_and_queue(gen, 6, 4, k, unit=rule != "direct")
    weight = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5
    spec = make_spec(rule, normalize=rule != "direct", detach_alpha=detach_alpha, negatives=negatives,
                     **RULE_PARAMS[rule])
    check(z, spec, queue, lo=3, hi=9, weight=weight, what=f"{rule} {negatives} K={k} rows [3, 9)")


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("rule,detach_alpha", [("direct", False), ("square", False), ("infonce", True)])
def test_skipped_tiles_with_an_unaligned_row_range(gen, negatives, k, rule, detach_alpha):
    """Tiles of 16 over M = 48 (half = 24) for the anchors [5, 40) with weights: the row blocks
    [5, 21), [21, 37), [37, 40) lie in view 1, across the views and in view 2, and the column
    blocks of 16 over [Z; queue] in view 1, across the views, in view 2 and (K = 10) across the
    end of Z, so every branch of the kernels' tile ranges (tiles._column_range, _row_range)
    runs, and the tiles they skip must have held no counted pair."""
    z, queue = rows_and_queue(gen, 24, 12, 10 if k else 0, unit=rule != "direct")
    weight = torch.rand(35, generator=gen, dtype=torch.float64) + 0.5
    spec = make_spec(rule, normalize=rule != "direct", detach_alpha=detach_alpha, negatives=negatives,
                     **RULE_PARAMS[rule])
    check(z, spec, queue, lo=5, hi=40, weight=weight, config=SMALL_TILES[0],
          what=f"{rule} {negatives} K={k} rows [5, 40)")


#: The tile-product count: M = 1024 stacked rows in the 64 × 64 tiles of bf16 (D = 8, padded to
#: 16 features), a queue of K = 256. The view boundary (512) and the end of Z fall between tiles.
COUNT_M, COUNT_K, COUNT_D = 1024, 256, 8


def tile_products(gen, rule, negatives, k, **params):
    """{kernel: Counter(products, flops)} of one loss-and-gradient call, counted in the interpreter."""
    from triton_interpreter import counting_tile_products

    z, queue = rows_and_queue(gen, COUNT_M // 2, COUNT_D, k, unit=True, dtype=torch.bfloat16)
    spec = make_spec(rule, negatives=negatives, **params)
    with counting_tile_products() as counts:
        call(z, spec, 0, COUNT_M, None, queue)
    return counts


@pytest.mark.skipif(DEVICE.type == "cuda", reason="counts the products that Triton's CPU interpreter runs")
@pytest.mark.parametrize("rule,params", [("direct", {}), ("square", dict(temperature=1e4, detach_alpha=False))],
                         ids=["direct", "square"])
def test_two_tower_and_queue_calls_skip_the_tiles_without_a_counted_pair(gen, rule, params):
    """The products each set-up's kernels run: a two-tower call about half of SimCLR's, a
    queue-only call the queue's share K/(M + K) of an all-negatives call with the same queue.

    Exactly: 64-row blocks of one view stream the other view's M/2 columns (and the queue), so
    cross / all = 1/2, cross + queue / all + queue = (M/2 + K)/(M + K) = 0.6, none + queue /
    all + queue = K/(M + K) = 0.2, per kernel. `square` with τ = 10⁴ keeps every negative in the
    sparsemax support, so Michelot's iteration takes the same two steps in every set-up and its
    threshold pass is compared like the others."""
    counts = {(negatives, k): tile_products(gen, rule, negatives, k, **params)
              for negatives, k in [("all", 0), ("cross", 0), ("all", COUNT_K), ("cross", COUNT_K), ("none", COUNT_K)]}
    full = counts[("all", 0)]
    # The counter sees what SimCLR's kernels run: every 64 × 64 tile pair, two products per tile
    # in the row pass and in the column pass, 8·M²·D̂ flops forward and backward (D̂ = 16).
    blocks = COUNT_M // 64
    assert full["row_pass_kernel"]["products"] == full["column_pass_kernel"]["products"] == 2 * blocks * blocks
    assert full["row_pass_kernel"]["flops"] + full["column_pass_kernel"]["flops"] == 8 * COUNT_M ** 2 * 16
    expected = {("cross", 0): (full, 0.5),
                ("cross", COUNT_K): (counts[("all", COUNT_K)], (COUNT_M / 2 + COUNT_K) / (COUNT_M + COUNT_K)),
                ("none", COUNT_K): (counts[("all", COUNT_K)], COUNT_K / (COUNT_M + COUNT_K))}
    for set_up, (baseline, share) in expected.items():
        assert set(counts[set_up]) == set(baseline), set_up
        for kernel, count in counts[set_up].items():
            ratio = count["products"] / baseline[kernel]["products"]
            assert ratio == pytest.approx(share, abs=0.01), f"{rule} {set_up} {kernel}: {ratio:.3f} of the tiles"
            assert count["flops"] / baseline[kernel]["flops"] == pytest.approx(ratio)
    total = {set_up: sum(c["products"] for c in count.values()) for set_up, count in counts.items()}
    assert total[("cross", 0)] <= 0.55 * total[("all", 0)]


@pytest.mark.parametrize("negatives,k", [("cross", 0), ("none", 4), ("cross", 4)])
def test_float32(gen, negatives, k):
    z, queue = rows_and_queue(gen, 5, 6, k, unit=True, dtype=torch.float32)
    spec = make_spec("direct", eps=0.3, negatives=negatives)
    check(z, spec, queue, precision="float32", what=f"float32 direct {negatives} K={k}")


@pytest.mark.parametrize("negatives,k", MODES + [("none", 5)])
@pytest.mark.parametrize("rule", ["quadratic", "entropy", "square", "infonce"])
def test_public_api_matches_eager(gen, rule, negatives, k):
    """alpha_cl_loss(..., backend="triton") against backend="eager": loss and the gradients of
    both views (the queue gets none), reduction="none" with an upstream gradient."""
    n = 1 if (negatives, k) == ("none", 5) else 4          # MoCo with a batch of one pair
    z1 = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(n, 4, generator=gen, dtype=torch.float64)
    queue = torch.randn(k, 4, generator=gen, dtype=torch.float64) if k else None
    upstream = torch.rand(2 * n, generator=gen, dtype=torch.float64)
    kwargs = dict(rule=rule, negatives=negatives, reduction="none", **RULE_PARAMS[rule])

    def run(backend, device):
        a = z1.clone().to(device).requires_grad_()
        b = z2.clone().to(device).requires_grad_()
        q = None if queue is None else queue.to(device)
        loss = fastalpha.alpha_cl_loss(a, b, backend=backend, queue=q, **kwargs)
        ga, gb = torch.autograd.grad((loss * upstream.to(device)).sum(), (a, b))
        return loss, ga, gb

    expected = run("eager", "cpu")
    got = run("triton", DEVICE)
    for name, x, y in zip(("loss", "grad z1", "grad z2"), got, expected):
        assert_close(x, y, "float64", f"{rule} {negatives} K={k} {name}")


@pytest.mark.parametrize("negatives", ["cross", "none", "all"])
def test_learnable_temperature_with_a_queue(gen, negatives):
    """CLIP's / MoCo's learnable τ for infonce: its gradient is −⟨[Z; queue], G⟩/(2τ), so it
    reads the queue's gradient rows that the kernels return."""
    z1 = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(4, 5, generator=gen, dtype=torch.float64)
    queue = torch.randn(6, 5, generator=gen, dtype=torch.float64)

    def run(backend):
        a, b = z1.clone().to(DEVICE).requires_grad_(), z2.clone().to(DEVICE).requires_grad_()
        tau = torch.tensor(0.3, dtype=torch.float64, device=DEVICE, requires_grad=True)
        loss = fastalpha.alpha_cl_loss(a, b, "infonce", temperature=tau, negatives=negatives, queue=queue.to(DEVICE),
                                       backend=backend)
        return (loss, *torch.autograd.grad(loss, (a, b, tau)))

    expected, got = run("eager"), run("triton")
    for name, x, y in zip(("loss", "grad z1", "grad z2", "grad tau"), got, expected):
        assert_close(x, y, "float64", f"infonce {negatives} + queue: {name}")


def test_supports_every_set_up():
    for negatives in ("all", "cross", "none"):
        for has_queue in (False, True):
            assert kernels.supports(negatives, has_queue) == (True, "")
            assert dispatch.supports("triton", negatives, has_queue) == (True, "")
            assert dispatch.resolve_backend("triton", DEVICE, make_spec("direct", negatives=negatives),
                                            has_queue) == "triton"

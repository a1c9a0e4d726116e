"""The C++ CPU kernel (backend "cpp") against the float64 dense reference.

Two levels, both on fresh random inputs:
  * the kernel contract (fastalpha.backends.cpp.alpha_cl_fused: a row range, row weights,
    raw or unit rows, every negative set with or without a queue) against
    reference.closed_form_gradient in float64, for both CPU algorithms (the one-pass full-row
    chunks and the symmetric two-pass tiles, forced through FASTALPHA_CPP_ALGORITHM, which is
    read per call, with small tiles so that every tile case occurs at small M);
  * the public API (fastalpha.alpha_cl_loss(..., backend="cpp")) against autograd through
    the dense reference, value and both input gradients, every reduction and option.
The first call compiles csrc/ (about a minute, once per machine: fastalpha.cpp_build caches it).
"""
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import background
import fastalpha
from fastalpha import cpp_build, dispatch, reference
from fastalpha.backends import cpp
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import (SQUARE_BETA_IN_FLOAT64, assert_close, beta_jumps_under_rounding, grad_scale, loss_scale,
                               precision_of)

if cpp_build.flag_set("FASTALPHA_NO_CPP"):
    pytest.skip("the cpp backend is disabled by FASTALPHA_NO_CPP=1", allow_module_level=True)

# (N, D): M = 2N = 6, 74, 514 stacked rows; D = 3, 24, 130. With 32-row tiles M = 74 and 514
# are not multiples of the tile, and a random row range adds block edges inside tiles.
SHAPES = [(3, 3), (37, 24), (257, 130)]
BETA_RULES = ("entropy", "direct", "inverse", "square")  # rules where detach_alpha=False changes the gradient
ALGORITHMS = ("onepass", "symmetric")


@pytest.fixture(scope="module", autouse=True)
def built_library():
    ok, reason = cpp.status()
    assert ok, f"the cpp backend did not build: {reason}"


@pytest.fixture(params=ALGORITHMS)
def algorithm(request, monkeypatch):
    """Force one CPU algorithm; small tiles and chunks so that small M has many of them."""
    monkeypatch.setenv("FASTALPHA_CPP_ALGORITHM", request.param)
    monkeypatch.setenv("FASTALPHA_TILE", "32")
    monkeypatch.setenv("FASTALPHA_CHUNK_ROWS", "13")
    return request.param


def random_rows(gen, n, d, dtype, unit=True):
    z = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), dim=1)
    if not unit:
        z = z * (0.5 + torch.rand(2 * n, 1, generator=gen, dtype=torch.float64))  # norms in [0.5, 1.5)
    return z.to(dtype)


def random_row_range(gen, m):
    lo = int(torch.randint(0, m // 2, (1,), generator=gen))
    hi = int(torch.randint(lo + 1, m + 1, (1,), generator=gen))
    return lo, hi


def check_kernel(z, spec, row_lo, row_hi, weight, precision, queue=None):
    rows, grad = cpp.alpha_cl_fused(z, spec, row_lo, row_hi, weight, True, queue=queue)
    w64 = None if weight is None else weight.double()
    q64 = None if queue is None else queue.double()
    ref_rows, ref_grad = reference.closed_form_gradient(z.double(), spec, w64, row_lo, row_hi, queue=q64)
    assert rows.dtype == torch.promote_types(z.dtype, torch.float32)
    assert grad.dtype == z.dtype
    # Errors follow the size of the terms each value is summed from: a row's loss can be a
    # near-cancellation of O(1) terms (inverse on unit rows: 6e-4 out of terms of about 2).
    stacked = z if queue is None else torch.cat([z, queue])
    anchor_weight = 1.0 if weight is None else weight.abs().max().item()
    assert_close(rows, ref_rows, precision, "loss rows", scale=loss_scale(stacked, spec))
    assert_close(grad, ref_grad, precision, "gradient", scale=grad_scale(stacked, spec, anchor_weight))


def over_the_contract_matrix(test):
    """Parametrize a kernel-contract test over rule × detach × unit/raw rows × float64/float32."""
    for mark in (pytest.mark.parametrize("rule", RULES), pytest.mark.parametrize("detach", [True, False]),
                 pytest.mark.parametrize("unit", [True, False]),
                 pytest.mark.parametrize("dtype", [torch.float64, torch.float32])):
        test = mark(test)
    return test


@over_the_contract_matrix
@pytest.mark.parametrize("n,d", SHAPES)
def test_kernel_matches_closed_form(gen, algorithm, rule, detach, unit, n, d, dtype):
    """Row sub-range, random row weights, unit or raw rows: the whole kernel contract."""
    spec = make_spec(rule, normalize=unit, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z = random_rows(gen, n, d, dtype, unit)
    lo, hi = random_row_range(gen, 2 * n)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_kernel(z, spec, lo, hi, weight, precision_of(dtype))


@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_full_range_without_weights(gen, algorithm, rule, unit):
    """The common call (every row an anchor, unit weights) at a size with several tile rounds;
    α differentiated except where that is ill-posed in float32 (square: its α only)."""
    z = random_rows(gen, 101, 40, torch.float32, unit)
    spec = make_spec(rule, normalize=unit, detach_alpha=False)
    if beta_jumps_under_rounding(spec, torch.float32):
        spec = make_spec(rule, normalize=unit, detach_alpha=True)
    check_kernel(z, spec, 0, 202, None, "float32")


@pytest.mark.parametrize("rule,options", [
    ("direct", dict(p=3.0)),                     # general power d2^{p/2}
    ("direct", dict(p=1.5, temperature=0.2)),
    ("direct", dict(eps=0.3)),                   # ε in the normaliser
    ("entropy", dict(eps=2.0, temperature=0.1)),
    ("entropy", dict(temperature=0.02)),         # large logits: per-row shifts keep exp in range
    ("entropy", dict(temperature=0.004)),        # logits spread over more than float32's exp range
    ("inverse", dict(gamma=1.0)),
    ("inverse", dict(gamma=3.0, temperature=0.1)),
    ("square", dict(temperature=0.05)),          # sparse support: several Michelot iterations
    ("square", dict(temperature=50.0)),          # support = every negative
    ("infonce", dict(eps=0.0)),                  # decoupled form
    ("infonce", dict(temperature=0.05, eps=3.0)),
])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rule_parameters(gen, algorithm, rule, options, detach, dtype):
    if dtype == torch.float32 and not detach and options.get("temperature", 1.0) < 0.01:
        pytest.skip("β = α(1 − t'(v − c)) with t' = 1/τ = 250 amplifies float32's rounding of d2 beyond the "
                    "float32 tolerance (a fresh seed measured 1.3e-5 relative): this case is checked in float64")
    spec = make_spec(rule, normalize=False, detach_alpha=detach, **options)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z = random_rows(gen, 37, 24, dtype, unit=False)
    check_kernel(z, spec, 0, 74, None, precision_of(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("temperature", [0.05, 0.3])
def test_square_with_tied_distances(gen, algorithm, temperature, dtype):
    """Duplicated rows tie many distances; the support is exactly {d2 < μ} (ties in or out together)."""
    base = random_rows(gen, 12, 5, torch.float64)
    z = torch.cat([base[:12].repeat(3, 1), base[12:].repeat(3, 1)])[torch.randperm(72, generator=gen)]
    z = z.to(dtype)
    for detach in (True, False):
        check_kernel(z, make_spec("square", temperature=temperature, normalize=True, detach_alpha=detach), 0, 72, None,
                     precision_of(dtype))


def test_tiny_infonce_losses_keep_float32_precision(gen, algorithm):
    """loss_i = log(1 + ξ_i) with ξ_i < 1e-6: formed from log ξ_i, not as a difference of O(1/τ) terms."""
    n, d, tau = 40, 64, 0.02
    z1 = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    # Partners almost equal, negatives nearly orthogonal: (d2_i − d2_ij)/τ ≈ −30 … −70.
    z = torch.cat([z1, torch.nn.functional.normalize(z1 + 1e-3 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)])
    spec = make_spec("infonce", temperature=tau, eps=1.0, normalize=True)
    rows, _ = cpp.alpha_cl_fused(z.float(), spec, 0, 2 * n, None, True)
    zd = z.float().double()
    d2 = (1 - zd @ zd.T).clamp_min(0)
    mask = reference.negative_mask(2 * n)
    d2_pos = d2.gather(1, reference.partner_index(2 * n)[:, None])
    xi = torch.where(mask, torch.exp((d2_pos - d2) / tau), torch.zeros_like(d2)).sum(1)
    expected = torch.log1p(xi)
    assert expected.max() < 1e-6, "the construction should give tiny losses"
    # The float32 distances carry ~1e-7 absolute error, i.e. ~5e-6 relative in ξ at τ = 0.02;
    # the lse + d2_i/τ form would be wrong by orders of magnitude here (ξ ~ 1e-17).
    assert ((rows.double() - expected).abs() <= 1e-4 * expected).all(), (rows.double() / expected - 1).abs().max()


# detach_alpha=False only changes the gradient of the β rules; quadratic/infonce get it once.
API_CASES = [
    (rule, detach, normalize, reduction)
    for rule in RULES
    for detach in (True, False)
    for normalize in (True, False)
    for reduction in ("mean", "sum", "none")
    if detach or rule in BETA_RULES or (normalize and reduction == "none")
]


@pytest.mark.parametrize("rule,detach,normalize,reduction", API_CASES)
def test_public_api_matches_autograd(gen, rule, detach, normalize, reduction):
    """alpha_cl_loss(backend="cpp") vs autograd of the dense float64 reference (float32 inputs)."""
    n, d = 29, 17
    # Entries of size 1/√D: rows of norm ≈ 1 also when they are not normalised.
    z1 = (torch.randn(n, d, generator=gen) / d**0.5).requires_grad_()
    z2 = (torch.randn(n, d, generator=gen) / d**0.5).requires_grad_()
    r1, r2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    spec = make_spec(rule, normalize=normalize, detach_alpha=detach)
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, normalize=normalize, detach_alpha=detach, reduction=reduction,
                                   backend="cpp")
    ref = reference.alpha_cl_loss(r1, r2, spec, reduction)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    # The loss of independent random views nearly cancels (quadratic, inverse): its error
    # follows the size of the terms it is summed from, not its own size.
    rows = 2 * n if reduction == "sum" else 1
    assert_close(loss, ref, "float32", "loss", scale=loss_scale(torch.cat([r1, r2]).detach(), spec, rows))
    assert_close(z1.grad, r1.grad, "float32", "grad z1")
    assert_close(z2.grad, r2.grad, "float32", "grad z2")


@pytest.mark.parametrize("rule", ["direct", "square", "infonce"])
def test_zero_row_has_cosine_zero(gen, rule):
    """normalize=True: a dead (all-zero) row has d2 = 1 − 0 = 1 with every other row."""
    z1 = torch.randn(9, 7, generator=gen)
    z2 = torch.randn(9, 7, generator=gen)
    z1[4] = 0
    r1, r2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    z1.requires_grad_(), z2.requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend="cpp")
    loss.backward()
    ref = reference.alpha_cl_loss(r1, r2, make_spec(rule), "mean")
    ref.backward()
    assert_close(loss, ref, "float32", "loss", scale=loss_scale(torch.cat([r1, r2]).detach(), make_spec(rule)))
    assert_close(z1.grad, r1.grad, "float32", "grad z1")
    assert_close(z2.grad, r2.grad, "float32", "grad z2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["direct", "square", "infonce"])
def test_half_inputs(gen, rule, dtype):
    """bf16/fp16 in: float32 compute, loss and gradient in the input dtype."""
    z1 = torch.randn(37, 24, generator=gen).to(dtype).requires_grad_()
    z2 = torch.randn(37, 24, generator=gen).to(dtype).requires_grad_()
    r1, r2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend="cpp")
    loss.backward()
    ref = reference.alpha_cl_loss(r1, r2, make_spec(rule), "mean")
    ref.backward()
    assert loss.dtype == dtype and z1.grad.dtype == dtype
    precision = precision_of(dtype)
    assert_close(loss, ref, precision, "loss", scale=loss_scale(torch.cat([r1, r2]).detach(), make_spec(rule)))
    assert_close(z1.grad, r1.grad, precision, "grad z1")
    assert_close(z2.grad, r2.grad, precision, "grad z2")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_thread_count_only_changes_rounding(gen, monkeypatch, algo):
    """1 and 2 threads split the work differently; the sums agree to float64 rounding."""
    monkeypatch.setenv("FASTALPHA_CPP_ALGORITHM", algo)
    monkeypatch.setenv("FASTALPHA_TILE", "48")
    z = random_rows(gen, 257, 130, torch.float64, unit=False)
    spec = make_spec("direct", normalize=False, detach_alpha=False)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpp.alpha_cl_fused(z, spec, 0, 514, None, True))
    finally:
        torch.set_num_threads(before)
    (rows1, grad1), (rows2, grad2) = results
    assert_close(rows2, rows1, "float64", "loss rows, 2 vs 1 threads")
    assert_close(grad2, grad1, "float64", "gradient, 2 vs 1 threads")
    _, ref_grad = reference.closed_form_gradient(z, spec)
    assert_close(grad1, ref_grad, "float64", "gradient, 1 thread")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_default_algorithm_at_a_larger_size(gen, dtype):
    """No forcing: whatever the size rule picks at M = 2050, D = 64 (tiles of the default size).

    square's β is checked in float64 only (fastalpha.testing.beta_jumps_under_rounding), its α,
    continuous in d2, in both.
    """
    z = random_rows(gen, 1025, 64, dtype)
    for rule in ("direct", "square"):
        spec = make_spec(rule, normalize=True, detach_alpha=False)
        if beta_jumps_under_rounding(spec, dtype):
            spec = make_spec(rule, normalize=True, detach_alpha=True)
        check_kernel(z, spec, 0, 2050, None, precision_of(dtype))


# (negatives, K): every negative set; K = 1, and K = 45, not a multiple of the 32-row tiles.
NEGATIVE_SETS = [("all", 1), ("all", 45), ("cross", 0), ("cross", 1), ("cross", 45), ("none", 1), ("none", 45)]
# ε > 0 wherever a rule has one, so that the count |J_i| of the set enters (ε|J_i|).
EPS = {"entropy": 0.5, "direct": 0.3, "infonce": 1.0}


def random_queue(gen, k, d, dtype, unit=True):
    q = torch.nn.functional.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    if not unit:
        q = q * (0.5 + torch.rand(k, 1, generator=gen, dtype=torch.float64))
    return q.to(dtype) if k else None


@over_the_contract_matrix
@pytest.mark.parametrize("negatives,k", NEGATIVE_SETS)
def test_negative_sets_match_closed_form(gen, algorithm, rule, detach, unit, negatives, k, dtype):
    """Odd shapes: M = 74 (not a multiple of the 32-row tiles, N = 37 splits a tile), D = 7,
    a random row range with random weights; the queue's gradient rows are compared too."""
    spec = make_spec(rule, normalize=unit, detach_alpha=detach, negatives=negatives, eps=EPS.get(rule))
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z = random_rows(gen, 37, 7, dtype, unit)
    queue = random_queue(gen, k, 7, dtype, unit)
    lo, hi = random_row_range(gen, 74)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_kernel(z, spec, lo, hi, weight, precision_of(dtype), queue)


@pytest.mark.parametrize("negatives,k", [("all", 70), ("cross", 3), ("none", 300)])
@pytest.mark.parametrize("rule", ["direct", "square", "infonce"])
def test_negative_sets_full_range(gen, algorithm, rule, negatives, k):
    """Every row an anchor and several tile rounds (M = 202, D = 40); K beside, below and above M."""
    z = random_rows(gen, 101, 40, torch.float32)
    queue = random_queue(gen, k, 40, torch.float32)
    spec = make_spec(rule, normalize=True, negatives=negatives, eps=EPS.get(rule))
    check_kernel(z, spec, 0, 202, None, "float32", queue)


@pytest.mark.parametrize("negatives", ["all", "cross", "none"])
def test_one_pair_with_a_queue(gen, algorithm, negatives):
    """N = 1 (M = 2): only a queue gives the anchors negatives ("cross" has none in Z)."""
    z = random_rows(gen, 1, 5, torch.float64, unit=False)
    queue = random_queue(gen, 3, 5, torch.float64, unit=False)
    spec = make_spec("direct", normalize=False, eps=0.2, negatives=negatives)
    check_kernel(z, spec, 0, 2, None, "float64", queue)


def test_no_negatives_is_an_empty_sum():
    """A raw call where no anchor has a negative returns zero losses and a zero gradient."""
    z = torch.randn(2, 3, dtype=torch.float64)
    for negatives, queue in (("cross", None), ("all", None), ("none", torch.zeros(0, 3, dtype=torch.float64))):
        rows, grad = cpp.alpha_cl_fused(z, make_spec("infonce", negatives=negatives), 0, 2, None, True, queue=queue)
        assert torch.equal(rows, torch.zeros(2, dtype=torch.float64)) and torch.equal(grad, torch.zeros(2, 3, dtype=torch.float64))


def test_cross_and_queue_through_the_public_api(gen):
    """alpha_cl_loss(backend="cpp", negatives=..., queue=...) vs autograd of the float64 reference."""
    z1 = torch.randn(13, 9, generator=gen).requires_grad_()
    z2 = torch.randn(13, 9, generator=gen).requires_grad_()
    queue = torch.randn(6, 9, generator=gen)
    for negatives, q in (("cross", None), ("cross", queue), ("none", queue), ("all", queue)):
        spec = make_spec("direct", negatives=negatives)
        r1, r2 = (z.detach().double().requires_grad_() for z in (z1, z2))
        loss = fastalpha.alpha_cl_loss(z1, z2, rule="direct", negatives=negatives, queue=q, backend="cpp")
        ref = reference.alpha_cl_loss(r1, r2, spec, "mean", None if q is None else q.double())
        g1, g2 = torch.autograd.grad(loss, (z1, z2))
        e1, e2 = torch.autograd.grad(ref, (r1, r2))
        assert_close(loss, ref, "float32", f"{negatives} loss", scale=loss_scale(torch.cat([r1, r2]).detach(), spec))
        assert_close(g1, e1, "float32", f"{negatives} grad z1")
        assert_close(g2, e2, "float32", f"{negatives} grad z2")


def test_loss_only_and_empty_range(gen, algorithm):
    z = random_rows(gen, 37, 24, torch.float64, unit=False)
    spec = make_spec("inverse", normalize=False)
    rows, grad = cpp.alpha_cl_fused(z, spec, 3, 40, None, False)
    assert grad.shape == (0, 24)
    assert_close(rows, reference.loss_rows(z, spec, 3, 40), "float64", "loss rows without gradient")
    rows, grad = cpp.alpha_cl_fused(z, spec, 10, 10, None, True)
    assert rows.shape == (0,) and grad.shape == (74, 24)
    assert torch.count_nonzero(grad) == 0


def test_auto_picks_cpp_for_cpu_tensors():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert fastalpha.available_backends()["cpp"][0]
    spec = make_spec("direct", negatives="cross")
    assert dispatch.resolve_backend("auto", torch.device("cpu"), spec, has_queue=True) == "cpp"
    assert dispatch.resolve_backend("auto", torch.device("cpu"), make_spec("direct", negatives="none"), True) == "cpp"


def _raw_call(ops, z, lo, hi, weight, rule="direct", negatives="all", queue=None):
    return ops.alpha_cl_fused(z, queue, lo, hi, weight, rule, 0.5, 4.0, 2.0, 0.0, True, False, negatives, True)


@pytest.mark.parametrize("bad,message", [
    (lambda z: (z[:5], 0, 5, None), "M = 2N even"),
    (lambda z: (z[:0], 0, 0, None), "M = 2N even"),
    (lambda z: (z, 3, 2, None), "row_lo <= row_hi"),
    (lambda z: (z, 0, 80, None), "row_hi <= M"),
    (lambda z: (z, 0, 6, torch.ones(5, dtype=z.dtype)), "row_weight must have shape"),
    (lambda z: (z, 0, 6, torch.ones(6, dtype=torch.float32)), "row_weight must have dtype"),
    (lambda z: (z.to(torch.int32), 0, 6, None), "float32 or float64"),
    (lambda z: (z[None], 0, 6, None), "2-D"),
])
def test_kernel_rejects_bad_input(bad, message):
    ops = cpp_build.ops("cpu")
    z, lo, hi, weight = bad(torch.randn(6, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=message):
        _raw_call(ops, z, lo, hi, weight)


def test_raw_op_rejects_unknown_rule_and_negatives():
    ops = cpp_build.ops("cpu")
    with pytest.raises(RuntimeError, match="unknown rule 'cubic'"):
        _raw_call(ops, torch.randn(6, 4), 0, 6, None, rule="cubic")
    with pytest.raises(RuntimeError, match="unknown negatives='others'; expected all, cross or none"):
        _raw_call(ops, torch.randn(6, 4), 0, 6, None, negatives="others")


@pytest.mark.parametrize("queue,message", [
    (torch.randn(3, 5), r"queue must have shape \(K, 4\)"),
    (torch.randn(3), r"queue must have shape \(K, 4\)"),
    (torch.randn(3, 4, dtype=torch.float64), "queue must have dtype Float"),
])
def test_raw_op_rejects_bad_queue(queue, message):
    with pytest.raises(RuntimeError, match=message):
        _raw_call(cpp_build.ops("cpu"), torch.randn(6, 4), 0, 6, None, queue=queue)


def test_cpp_backend_rejects_cuda_device_request():
    ok, reason = cpp.device_status(torch.device("cuda"))
    assert not ok and "CPU tensors only" in reason


_NO_COMPILER_SCRIPT = """
import torch, fastalpha
from fastalpha.backends import cpp
ok, reason = cpp.status()
print("STATUS", ok, reason)
z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
try:
    fastalpha.alpha_cl_loss(z1, z2, backend="cpp")
    print("EXPLICIT no error")
except (RuntimeError, ValueError) as err:
    print("EXPLICIT", err)
print("AUTO", float(fastalpha.alpha_cl_loss(z1, z2, backend="auto")))
"""


#: (environment, what status() must say) of a machine where the C++ backend is unavailable.
UNAVAILABLE = {"no C++ compiler": {"CXX": "/nonexistent/c++"},
               "disabled by FASTALPHA_NO_CPP=1": {"FASTALPHA_NO_CPP": "1"}}


def start_in_background(tmp_path_factory, items) -> None:
    """Start the unavailable-backend processes beside the other tests (tests/background.py)."""
    for item in items:
        if item.originalname == "test_unavailable_backend_says_why":
            expected = item.callspec.params["expected"]
            background.start(f"cpp unavailable: {expected}", _unavailable_process, expected,
                             tmp_path_factory.mktemp("cpp-unavailable"))


def _unavailable_process(expected: str, cache_dir) -> subprocess.CompletedProcess:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(background.environment(), FASTALPHA_CACHE_DIR=str(cache_dir), PYTHONPATH=repo, **UNAVAILABLE[expected])
    return subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("expected", list(UNAVAILABLE))
@pytest.mark.background
def test_unavailable_backend_says_why(tmp_path, expected):
    """No compiler (or disabled): status() explains, backend="cpp" raises it, "auto" falls back."""
    out = background.result(f"cpp unavailable: {expected}", _unavailable_process, expected, tmp_path)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["STATUS"].startswith("False") and expected in lines["STATUS"], out.stdout
    assert expected in lines["EXPLICIT"], out.stdout
    assert math.isfinite(float(lines["AUTO"])), out.stdout  # a fallback backend ran


def test_two_checkouts_with_the_same_sources_share_one_build(tmp_path, monkeypatch):
    """The build reads a copy of the sources inside its cache folder, so a second checkout
    (same text, another path) hands ninja the very same build and does not recompile; the
    copy is the checkout's text and is not rewritten (its mtime would make ninja rebuild)."""
    import torch.utils.cpp_extension as cpp_extension

    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("FASTALPHA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTALPHA_NO_CPP", raising=False)
    monkeypatch.delenv("FASTALPHA_REBUILD", raising=False)
    checkouts = [tmp_path / "one" / "csrc", tmp_path / "two" / "csrc"]
    for folder in checkouts:
        shutil.copytree(cpp_build.csrc_dir(), folder)
    mtimes = []
    for folder in checkouts:
        monkeypatch.setenv("FASTALPHA_CSRC", str(folder))
        cpp_build._build("cpu")
        mtimes.append({name: os.stat(name).st_mtime_ns for name in calls[-1]["sources"]})
    first, second = calls
    assert first == second, "the same sources in another folder must give the same build"
    staged = os.path.dirname(first["sources"][0])
    assert staged.startswith(str(tmp_path / "cache")) and first["extra_include_paths"] == [staged], first
    for source in first["sources"]:
        assert os.path.dirname(source) == staged, source
        assert open(source, "rb").read() == (checkouts[0] / os.path.basename(source)).read_bytes()
    assert mtimes[0] == mtimes[1], "staging again must not touch the copied sources"
    for header in cpp_build.HEADERS:
        assert open(os.path.join(staged, header), "rb").read() == (checkouts[0] / header).read_bytes(), header

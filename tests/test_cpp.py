"""The C++ CPU kernel (backend "cpp") against the float64 dense reference.

Two levels, both on fresh random inputs:
  * the kernel contract (fastalpha.cpp_backend.alpha_cl_fused: a row range, row weights,
    raw or normalised rows) against reference.closed_form_gradient in float64;
  * the public API (fastalpha.alpha_cl_loss(..., backend="cpp")) against autograd through
    the dense reference, value and both input gradients, every reduction and option.
The first call compiles csrc/ (about 30 s, once per machine: fastalpha.cpp_build caches it).
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import fastalpha
from fastalpha import cpp_backend, cpp_build, dispatch, reference
from fastalpha.rules import RULES, resolve_rule
from tolerances import assert_close, precision_of

if cpp_build.flag_set("FASTALPHA_NO_CPP"):
    pytest.skip("the cpp backend is disabled by FASTALPHA_NO_CPP=1", allow_module_level=True)

# (N, D): M = 2N = 6, 74, 514 stacked rows; D = 3, 24, 130.
SHAPES = [(3, 3), (37, 24), (257, 130)]
BETA_RULES = ("entropy", "direct", "inverse", "square")  # rules where detach_alpha=False changes the gradient


@pytest.fixture(scope="module", autouse=True)
def built_library():
    ok, reason = cpp_backend.status()
    assert ok, f"the cpp backend did not build: {reason}"


def random_rows(gen, n, d, dtype, normalize=True):
    z = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), dim=1)
    if not normalize:
        z = z * (0.5 + torch.rand(2 * n, 1, generator=gen, dtype=torch.float64))  # norms in [0.5, 1.5)
    return z.to(dtype)


def random_row_range(gen, m):
    lo = int(torch.randint(0, m // 2, (1,), generator=gen))
    hi = int(torch.randint(lo + 1, m + 1, (1,), generator=gen))
    return lo, hi


def check_kernel(z, params, detach, row_lo, row_hi, weight, precision):
    rows, grad = cpp_backend.alpha_cl_fused(z, row_lo, row_hi, weight, params, detach, True)
    w64 = None if weight is None else weight.double()
    ref_rows, ref_grad = reference.closed_form_gradient(z.double(), params, detach, w64, row_lo, row_hi)
    assert rows.dtype == torch.promote_types(z.dtype, torch.float32)
    assert grad.dtype == z.dtype
    assert_close(rows, ref_rows, precision, "loss rows")
    assert_close(grad, ref_grad, precision, "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_kernel_matches_closed_form(gen, rule, detach, n, d, dtype):
    """Row sub-range, random row weights, raw (unnormalised) rows: the whole kernel contract."""
    z = random_rows(gen, n, d, dtype, normalize=False)
    lo, hi = random_row_range(gen, 2 * n)
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_kernel(z, resolve_rule(rule), detach, lo, hi, weight, precision_of(dtype))


@pytest.mark.parametrize("rule,options", [
    ("direct", dict(p=3.0)),                     # general power d2^{p/2}
    ("direct", dict(p=1.5, temperature=0.2)),
    ("direct", dict(eps=0.3)),                   # ε in the normaliser
    ("entropy", dict(eps=2.0, temperature=0.1)),
    ("entropy", dict(temperature=0.02)),         # large logits: the row max keeps exp in range
    ("inverse", dict(gamma=1.0)),
    ("inverse", dict(gamma=3.0, temperature=0.1)),
    ("square", dict(temperature=0.05)),          # sparse support: several Michelot iterations
    ("square", dict(temperature=50.0)),          # support = every negative
    ("infonce", dict(eps=0.0)),                  # decoupled form
    ("infonce", dict(temperature=0.05, eps=3.0)),
])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rule_parameters(gen, rule, options, detach, dtype):
    z = random_rows(gen, 37, 24, dtype)
    check_kernel(z, resolve_rule(rule, **options), detach, 0, 74, None, precision_of(dtype))


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
    kwargs = dict(rule=rule, normalize=normalize, detach_alpha=detach, reduction=reduction)
    loss = fastalpha.alpha_cl_loss(z1, z2, backend="cpp", **kwargs)
    ref = reference.alpha_cl_loss(r1, r2, resolve_rule(rule), normalize, detach, reduction)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(loss, ref, "float32", "loss")
    assert_close(z1.grad, r1.grad, "float32", "grad z1")
    assert_close(z2.grad, r2.grad, "float32", "grad z2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["direct", "square", "infonce"])
def test_half_inputs_are_upcast(gen, rule, dtype):
    """bf16/fp16 in: float32 compute, gradient back in the input dtype, losses in float32."""
    z1 = torch.randn(37, 24, generator=gen).to(dtype).requires_grad_()
    z2 = torch.randn(37, 24, generator=gen).to(dtype).requires_grad_()
    r1, r2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend="cpp")
    loss.backward()
    ref = reference.alpha_cl_loss(r1, r2, resolve_rule(rule), True, True, "mean")
    ref.backward()
    assert loss.dtype == torch.float32 and z1.grad.dtype == dtype
    precision = precision_of(dtype)
    assert_close(loss, ref, precision, "loss")
    assert_close(z1.grad, r1.grad, precision, "grad z1")
    assert_close(z2.grad, r2.grad, precision, "grad z2")


def test_many_small_chunks(gen, monkeypatch):
    """7-row chunks: uneven last chunk, many chunks per thread, a row range not aligned to chunks."""
    monkeypatch.setenv("FASTALPHA_CHUNK_ROWS", "7")
    z = random_rows(gen, 257, 24, torch.float64)
    for rule in ("direct", "square"):
        check_kernel(z, resolve_rule(rule), False, 5, 500, torch.rand(495, generator=gen, dtype=torch.float64), "float64")


def test_thread_count_only_changes_rounding(gen):
    """1 and 2 threads split the chunks differently; the sums agree to float64 rounding."""
    z = random_rows(gen, 257, 130, torch.float64)
    params = resolve_rule("direct")
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(cpp_backend.alpha_cl_fused(z, 0, 514, None, params, False, True))
    finally:
        torch.set_num_threads(before)
    (rows1, grad1), (rows2, grad2) = results
    assert_close(rows2, rows1, "float64", "loss rows, 2 vs 1 threads")
    assert_close(grad2, grad1, "float64", "gradient, 2 vs 1 threads")
    ref_rows, ref_grad = reference.closed_form_gradient(z, params, False)
    assert_close(grad1, ref_grad, "float64", "gradient, 1 thread")


def test_loss_only_and_empty_range(gen):
    z = random_rows(gen, 37, 24, torch.float64)
    params = resolve_rule("inverse")
    rows, grad = cpp_backend.alpha_cl_fused(z, 3, 40, None, params, True, False)
    assert grad.shape == (0, 24)
    assert_close(rows, reference.loss_rows(z, params, True, 3, 40), "float64", "loss rows without gradient")
    rows, grad = cpp_backend.alpha_cl_fused(z, 10, 10, None, params, True, True)
    assert rows.shape == (0,) and grad.shape == (74, 24)
    assert torch.count_nonzero(grad) == 0


def test_auto_picks_cpp_for_cpu_tensors():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpp"
    assert fastalpha.available_backends()["cpp"][0]


@pytest.mark.parametrize("bad,message", [
    (lambda z: (z[:5], 0, 5, None), "M = 2N even"),
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
        ops.alpha_cl_fused(z, lo, hi, weight, "direct", 0.5, 4.0, 2.0, 0.0, True, True)
    with pytest.raises(RuntimeError, match="unknown rule"):
        ops.alpha_cl_fused(torch.randn(6, 4), 0, 6, None, "cubic", 0.5, 4.0, 2.0, 0.0, True, True)


def test_cpp_backend_rejects_cuda_device_request():
    ok, reason = cpp_backend.device_status(torch.device("cuda"))
    assert not ok and "CPU tensors only" in reason


_NO_COMPILER_SCRIPT = """
import torch, fastalpha
from fastalpha import cpp_backend
ok, reason = cpp_backend.status()
print("STATUS", ok, reason)
z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
try:
    fastalpha.alpha_cl_loss(z1, z2, backend="cpp")
    print("EXPLICIT no error")
except (RuntimeError, ValueError) as err:
    print("EXPLICIT", err)
print("AUTO", float(fastalpha.alpha_cl_loss(z1, z2, backend="auto")))
"""


@pytest.mark.parametrize("env,expected", [
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler"),
    ({"FASTALPHA_NO_CPP": "1"}, "disabled by FASTALPHA_NO_CPP=1"),
])
def test_unavailable_backend_says_why(tmp_path, env, expected):
    """No compiler (or disabled): status() explains, backend="cpp" raises it, "auto" falls back to eager."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full_env = dict(os.environ, FASTALPHA_CACHE_DIR=str(tmp_path), PYTHONPATH=repo, **env)
    out = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], env=full_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert lines["STATUS"].startswith("False") and expected in lines["STATUS"], out.stdout
    assert expected in lines["EXPLICIT"], out.stdout
    assert math.isfinite(float(lines["AUTO"])), out.stdout  # the eager fallback ran

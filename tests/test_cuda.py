"""The CUDA kernel (backend "cuda") against the float64 dense reference, and its build.

The numerical tests carry the `gpu` marker (skipped without a CUDA device). One test needs
no GPU: it compiles csrc/'s CUDA sources for sm_80 and sm_90 wherever nvcc and a CUDA build
of torch exist, so the kernel cannot rot on CPU-only CI.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import background
import fastalpha
from fastalpha import cpp_build, reference
from fastalpha.backends import cpp, cuda
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import SQUARE_BETA_IN_FLOAT64, assert_close, beta_jumps_under_rounding, precision_of

BETA_RULES = ("entropy", "direct", "inverse", "square")
REPO = Path(__file__).resolve().parent.parent


COMPILE_TEST = "test_cuda_sources_compile_and_a_second_spelling_of_the_toolkit_reuses_the_build"


def start_in_background(tmp_path_factory, items) -> None:
    """Start the two builds beside the other tests (tests/background.py)."""
    if any(item.name == COMPILE_TEST for item in items) and _can_compile():
        background.start(COMPILE_TEST, _build_twice, tmp_path_factory.mktemp("cuda-home"))


def _can_compile() -> bool:
    return torch.version.cuda is not None and cpp_build.find_cuda_home() is not None


def _build(cuda_home):
    env = dict(background.environment(), TORCH_CUDA_ARCH_LIST="8.0;9.0", CUDA_HOME=str(cuda_home), PYTHONPATH=str(REPO))
    env.pop("FASTALPHA_NO_CUDA", None)
    out = subprocess.run([sys.executable, "-m", "fastalpha.cpp_build", "cuda"], env=env, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, f"CUDA build (CUDA_HOME={cuda_home}) failed:\n{out.stdout}\n{out.stderr[-4000:]}"
    assert "cuda: ok: compiled library " in out.stdout, out.stdout
    library = Path(out.stdout.split("cuda: ok: compiled library ", 1)[1].split()[0])
    return library, library.stat().st_mtime_ns


def _build_twice(tmp_path):
    """Build under the toolkit's own path, then under a symbolic link to it."""
    toolkit = Path(os.path.realpath(cpp_build.find_cuda_home()))
    first = _build(toolkit)
    link = tmp_path / "cuda"
    link.symlink_to(toolkit, target_is_directory=True)
    return first, _build(link)


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is not a CUDA build")
@pytest.mark.skipif(cpp_build.find_cuda_home() is None, reason="no CUDA toolkit (nvcc): set CUDA_HOME to compile the CUDA kernel")
@pytest.mark.background
def test_cuda_sources_compile_and_a_second_spelling_of_the_toolkit_reuses_the_build(tmp_path):
    """`python -m fastalpha.cpp_build cuda` for sm_80 + sm_90 (cached after the first run).

    Then once more with CUDA_HOME a link to the same toolkit (as /usr/local/cuda is): the same
    library, not recompiled, so that callers who spell the toolkit differently share one build.
    """
    (library, built), (again, rebuilt) = background.result(COMPILE_TEST, _build_twice, tmp_path)
    assert again == library, (library, again)
    assert rebuilt == built, f"{library} was recompiled when CUDA_HOME named the same toolkit through a link"


def test_cuda_status_explains_without_device():
    ok, reason = cuda.status()
    if not torch.cuda.is_available():
        assert not ok and reason, "without a GPU the cuda backend must say it is unavailable, and why"
    ok, reason = cuda.device_status(torch.device("cpu"))
    assert not ok and "CUDA tensors only" in reason


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def cuda_ready():
    ok, reason = cuda.status()
    if not ok:
        pytest.skip(f"cuda backend unavailable: {reason}")


@pytest.fixture
def ieee_fp32():
    """float32 products in full precision (the tolerance table's float32 row)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def random_rows(gen, n, d, dtype, unit=True):
    z = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=gen, dtype=torch.float64), dim=1)
    if not unit:
        z = z * (0.5 + torch.rand(2 * n, 1, generator=gen, dtype=torch.float64))
    return z.to(dtype)


def check_kernel(z, spec, row_lo, row_hi, weight, precision):
    rows, grad = cuda.alpha_cl_fused(z.cuda(), spec, row_lo, row_hi, None if weight is None else weight.cuda(), True)
    w64 = None if weight is None else weight.double()
    ref_rows, ref_grad = reference.closed_form_gradient(z.double(), spec, w64, row_lo, row_hi)
    assert rows.device.type == "cuda" and grad.dtype == z.dtype
    assert_close(rows, ref_rows, precision, "loss rows")
    assert_close(grad, ref_grad, precision, "gradient")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", [(3, 3), (37, 24), (257, 130), (1500, 64)])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_cuda_kernel_matches_closed_form(cuda_ready, ieee_fp32, gen, rule, detach, unit, n, d, dtype):
    if beta_jumps_under_rounding(make_spec(rule, detach_alpha=detach), dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z = random_rows(gen, n, d, dtype, unit)
    m = 2 * n
    lo = int(torch.randint(0, m // 2, (1,), generator=gen))
    hi = int(torch.randint(lo + 1, m + 1, (1,), generator=gen))
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_kernel(z, make_spec(rule, normalize=unit, detach_alpha=detach), lo, hi, weight, precision_of(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("rule,options", [
    ("direct", dict(p=3.0)),
    ("direct", dict(eps=0.3)),
    ("entropy", dict(temperature=0.02)),
    ("inverse", dict(gamma=1.0)),
    ("inverse", dict(gamma=3.0, temperature=0.1)),
    ("square", dict(temperature=0.05)),
    ("infonce", dict(eps=0.0)),
])
@pytest.mark.parametrize("detach", [True, False])
def test_cuda_rule_parameters(cuda_ready, ieee_fp32, gen, rule, options, detach):
    spec = make_spec(rule, normalize=False, detach_alpha=detach, **options)
    if beta_jumps_under_rounding(spec, torch.float32):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z = random_rows(gen, 37, 24, torch.float32, unit=False)
    check_kernel(z, spec, 0, 74, None, "float32")


@pytest.mark.gpu
def test_cuda_many_chunks(cuda_ready, gen, monkeypatch):
    monkeypatch.setenv("FASTALPHA_CHUNK_ROWS", "7")
    z = random_rows(gen, 257, 24, torch.float64)
    check_kernel(z, make_spec("square", detach_alpha=False), 5, 500, torch.rand(495, generator=gen, dtype=torch.float64),
                 "float64")


@pytest.mark.gpu
def test_cuda_tiny_infonce_losses_keep_float32_precision(cuda_ready, ieee_fp32, gen):
    """loss_i = log(1 + ξ_i) with ξ_i < 1e-6, against a float64 log1p form."""
    n, d, tau = 40, 64, 0.02
    z1 = torch.nn.functional.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    z = torch.cat([z1, torch.nn.functional.normalize(z1 + 1e-3 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)])
    spec = make_spec("infonce", temperature=tau, eps=1.0, normalize=True)
    rows, _ = cuda.alpha_cl_fused(z.float().cuda(), spec, 0, 2 * n, None, True)
    zd = z.float().double()
    d2 = (1 - zd @ zd.T).clamp_min(0)
    d2_pos = d2.gather(1, reference.partner_index(2 * n)[:, None])
    xi = torch.where(reference.negative_mask(2 * n), torch.exp((d2_pos - d2) / tau), torch.zeros_like(d2)).sum(1)
    expected = torch.log1p(xi)
    assert expected.max() < 1e-6
    # float32 distances: ~5e-6 relative in ξ at τ = 0.02; the lse + d2_i/τ form is off by orders of magnitude.
    assert ((rows.cpu().double() - expected).abs() <= 1e-4 * expected).all()


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("rule", RULES)
def test_cuda_public_api_matches_autograd(cuda_ready, ieee_fp32, gen, rule, detach, normalize, reduction):
    n, d = 29, 17
    z1 = (torch.randn(n, d, generator=gen) / d**0.5).cuda().requires_grad_()
    z2 = (torch.randn(n, d, generator=gen) / d**0.5).cuda().requires_grad_()
    r1, r2 = (z.detach().cpu().double().requires_grad_() for z in (z1, z2))
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, normalize=normalize, detach_alpha=detach, reduction=reduction,
                                   backend="cuda")
    ref = reference.alpha_cl_loss(r1, r2, make_spec(rule, normalize=normalize, detach_alpha=detach), reduction)
    upstream = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (loss * upstream.to(loss.device, loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    assert_close(loss, ref, "float32", "loss")
    assert_close(z1.grad, r1.grad, "float32", "grad z1")
    assert_close(z2.grad, r2.grad, "float32", "grad z2")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, False), (torch.float16, False), (torch.float32, True)])
@pytest.mark.parametrize("rule", ["direct", "square", "infonce"])
def test_cuda_low_precision(cuda_ready, gen, rule, dtype, tf32):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        z1 = torch.randn(300, 64, generator=gen).to(dtype).cuda().requires_grad_()
        z2 = torch.randn(300, 64, generator=gen).to(dtype).cuda().requires_grad_()
        loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend="cuda")
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    r1, r2 = (z.detach().cpu().double().requires_grad_() for z in (z1, z2))
    ref = reference.alpha_cl_loss(r1, r2, make_spec(rule), "mean")
    ref.backward()
    precision = precision_of(dtype, tf32)
    assert loss.dtype == dtype and z1.grad.dtype == dtype and math.isfinite(float(loss))
    assert_close(loss, ref, precision, "loss")
    assert_close(z1.grad, r1.grad, precision, "grad z1")
    assert_close(z2.grad, r2.grad, precision, "grad z2")


@pytest.mark.gpu
def test_cuda_matches_cpp_at_scale(cuda_ready, ieee_fp32, gen):
    """M = 20000: several chunks of full rows on the GPU; the cpp kernel in float64 is the oracle here."""
    z = random_rows(gen, 10000, 128, torch.float32)
    spec = make_spec("direct")
    rows, grad = cuda.alpha_cl_fused(z.cuda(), spec, 0, 20000, None, True)
    ref_rows, ref_grad = cpp.alpha_cl_fused(z.double(), spec, 0, 20000, None, True)
    assert_close(rows, ref_rows, "float32", "loss rows")
    assert_close(grad, ref_grad, "float32", "gradient")

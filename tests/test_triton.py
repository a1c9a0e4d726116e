"""Triton backend (fastalpha.backends.triton) against the float64 dense reference.

Without a GPU every kernel runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are small and the parametrisation covers each rule and option once rather than their
cartesian product. The oracle is autograd through `fastalpha.reference` in float64 on the same
inputs (for bf16 inputs: on the bf16 values, so that only the kernels' own rounding is measured).
float32 comparisons force IEEE products (torch.set_float32_matmul_precision("highest")).

GPU tests (marker `gpu`) go up to M = 65536, where the oracle is the float64 closed-form
gradient accumulated over blocks of anchor rows (reference.closed_form_gradient), and check
with torch.cuda.max_memory_allocated that no M × M buffer is ever allocated.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import background
import fastalpha
from fastalpha import reference
from fastalpha.rules import make_spec
from fastalpha.testing import (SQUARE_BETA_IN_FLOAT64, assert_close, beta_jumps_under_rounding, grad_scale, loss_scale,
                               precision_of)

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)
from fastalpha.backends.triton import launch  # noqa: E402
from fastalpha.backends.triton.blocks import BlockConfig, block_config, padded_features  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiler_env(base=None):
    """Environment of a subprocess that imports fastalpha with the real (not interpreted) kernels:
    `base` (default: this process's environment) without TRITON_INTERPRET."""
    env = {key: value for key, value in (os.environ if base is None else base).items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


# float32 products in IEEE: the interpreter ignores TF32 (GPU tests opt in explicitly).
pytestmark = pytest.mark.usefixtures("ieee_float32")


def make_views(gen, n, d, dtype, on_sphere):
    """Two (n, d) views in `dtype` and their exact float64 values. `on_sphere`: unit rows
    (rounded to dtype); otherwise Gaussian rows of norm ≈ 1 (so that d2 = O(1))."""
    z = torch.randn(2 * n, d, generator=gen, dtype=torch.float64)
    z = F.normalize(z, dim=1) if on_sphere else z / math.sqrt(d)
    z = z.to(dtype)
    return z[:n].to(DEVICE), z[n:].to(DEVICE)


def reference_loss_and_grads(z1, z2, spec, reduction, upstream):
    a = z1.detach().double().requires_grad_()
    b = z2.detach().double().requires_grad_()
    loss = reference.alpha_cl_loss(a, b, spec, reduction)
    total = (loss * upstream).sum() if reduction == "none" else loss
    ga, gb = torch.autograd.grad(total, (a, b))
    return loss.detach(), ga, gb


# One row per (rule, detach_alpha); the other options rotate so that every value of every
# option (N, D, normalize, reduction, dtype, eps, p) appears with several rules.
API_CASES = [
    # rule,       detach, N,  D,  normalize, reduction, dtype,           rule kwargs
    ("quadratic", True,   3,  3,  True,  "mean", torch.float32,  {}),
    ("quadratic", False,  37, 64, False, "none", torch.bfloat16, {}),
    ("entropy",   True,   37, 24, True,  "sum",  torch.float32,  {"eps": 0.2}),
    ("entropy",   False,  35, 3,  False, "mean", torch.float64,  {}),
    ("direct",    True,   35, 64, True,  "none", torch.float32,  {"eps": 0.05}),
    ("direct",    False,  3,  24, True,  "mean", torch.bfloat16, {}),
    ("direct",    False,  37, 24, False, "sum",  torch.float32,  {"p": 1.5, "temperature": 0.3}),
    ("direct",    True,   37, 24, False, "mean", torch.float16,  {"p": 3.0}),
    ("inverse",   True,   3,  64, False, "sum",  torch.bfloat16, {"gamma": 1.5}),
    ("inverse",   False,  37, 3,  True,  "none", torch.float32,  {}),
    ("square",    True,   35, 24, True,  "mean", torch.float32,  {}),
    ("square",    False,  37, 64, False, "sum",  torch.float64,  {"temperature": 0.3}),
    ("square",    False,  3,  3,  True,  "none", torch.bfloat16, {"temperature": 0.5}),
    ("infonce",   True,   37, 64, True,  "mean", torch.bfloat16, {}),
    ("infonce",   False,  35, 24, False, "none", torch.float32,  {"eps": 0.0}),
    ("infonce",   True,   3,  3,  True,  "sum",  torch.float64,  {"temperature": 0.2}),
]


@pytest.mark.parametrize("rule,detach,n,d,normalize,reduction,dtype,kwargs", API_CASES)
def test_public_api_matches_reference(gen, rule, detach, n, d, normalize, reduction, dtype, kwargs):
    """alpha_cl_loss(backend="triton"): value and both input gradients, through the custom op."""
    # 16-bit rows start on the sphere (then rounded), so that PyTorch's own 16-bit normalisation
    # (normalize=True) moves them by about an ulp and the comparison measures the kernels.
    z1, z2 = make_views(gen, n, d, dtype, on_sphere=dtype in (torch.bfloat16, torch.float16) or normalize)
    spec = make_spec(rule, normalize=normalize, detach_alpha=detach, **kwargs)
    upstream = torch.randn(2 * n, generator=gen, dtype=torch.float64).to(DEVICE)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, spec, reduction, upstream)

    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(a, b, rule=rule, normalize=normalize, detach_alpha=detach,
                                   reduction=reduction, backend="triton", **kwargs)
    total = (loss * upstream.to(loss.dtype)).sum() if reduction == "none" else loss
    total.backward()
    precision = precision_of(dtype)
    assert loss.dtype == dtype
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    # Tolerances follow the size of the summed terms, not the result: a loss of random views
    # can be a near-cancellation (fastalpha.testing.loss_scale / grad_scale).
    stacked = torch.cat([z1, z2]).cpu()
    rows = 2 * n if reduction == "sum" else 1
    anchor_weight = {"mean": 1.0 / (2 * n), "sum": 1.0}.get(reduction) or upstream.abs().max().item()
    g_scale = grad_scale(stacked, spec, anchor_weight)
    assert_close(loss, ref_loss, precision, "loss", scale=loss_scale(stacked, spec, rows))
    assert_close(a.grad, ref_g1, precision, "grad z1", scale=g_scale)
    assert_close(b.grad, ref_g2, precision, "grad z2", scale=g_scale)


SMALL_CHUNKED = BlockConfig(16, 16, 16, 16, False, 4, 2)


def _small_single(d):
    return BlockConfig(16, 16, padded_features(d), padded_features(d), True, 4, 2)


# The contract directly: anchor sub-range, row weights, unit rows (with a zero row) or general
# rows, and block shapes small enough that the loops run over several row/column tiles and,
# for the chunked shape, several feature chunks.
RANGE_CASES = [
    # rule,      detach, unit,  M,  D,  lo, hi, weights, config,        dtype,          kwargs
    ("entropy",  False,  False, 70, 40, 10, 53, True,  SMALL_CHUNKED,  torch.float64,  {}),
    ("entropy",  True,   True,  70, 40, 10, 53, False, SMALL_CHUNKED,  torch.float32,  {"eps": 0.3}),
    ("direct",   False,  True,  74, 24, 0,  74, True,  "single",       torch.float32,  {"eps": 0.1}),
    ("direct",   True,   False, 70, 33, 37, 70, False, SMALL_CHUNKED,  torch.float32,  {"p": 3.0}),
    ("inverse",  False,  True,  70, 40, 5,  6,  True,  SMALL_CHUNKED,  torch.float32,  {}),
    ("inverse",  True,   False, 70, 3,  0,  70, False, "single",       torch.float64,  {}),
    ("square",   False,  False, 70, 40, 3,  64, True,  SMALL_CHUNKED,  torch.float64,  {"temperature": 0.2}),
    ("square",   True,   True,  74, 24, 20, 74, False, "single",       torch.bfloat16, {"temperature": 1.0}),
    ("infonce",  True,   False, 70, 40, 0,  35, True,  SMALL_CHUNKED,  torch.float32,  {"eps": 1.0}),
    ("infonce",  False,  True,  70, 24, 12, 61, True,  "single",       torch.float16,  {"eps": 0.0}),
    ("quadratic", True,  False, 70, 24, 11, 50, True,  None,           torch.float32,  {}),
    ("quadratic", True,  True,  70, 24, 11, 50, True,  None,           torch.float64,  {}),
]


@pytest.mark.parametrize("rule,detach,unit,m,d,lo,hi,weighted,config,dtype,kwargs", RANGE_CASES)
def test_row_range_and_weights_match_reference(gen, rule, detach, unit, m, d, lo, hi, weighted, config, dtype, kwargs):
    """loss_i for i in [lo, hi) and ∂(Σ w_i loss_i)/∂Z over all M rows vs autograd in float64.

    With unit rows (normalize=True) d2 = 1 − z_i·z_j: the gradient has no terms in z_i itself,
    and a zero row has cosine 0 with every row (d2 = 1), as the reference defines it."""
    z = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1).to(dtype)
    spec = make_spec(rule, normalize=unit, detach_alpha=detach, **kwargs)
    if unit:
        z[lo] = 0          # a dead row: cosine 0 with everything, not a distance from its norm
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64) + 0.5 if weighted else None
    z64 = z.double().requires_grad_()
    ref_rows = reference.loss_rows(z64, spec, lo, hi)
    w64 = torch.ones(hi - lo, dtype=torch.float64) if weight is None else weight
    (ref_grad,) = torch.autograd.grad((ref_rows * w64).sum(), z64)

    config = _small_single(d) if config == "single" else config
    w = None if weight is None else weight.to(torch.promote_types(dtype, torch.float32)).to(DEVICE)
    rows, grad = launch.fused_loss_and_grad(z.to(DEVICE), spec, lo, hi, w, True, config)
    precision = precision_of(dtype)
    assert_close(rows, ref_rows, precision, "loss rows")
    assert_close(grad, ref_grad, precision, "grad")

    rows_only, no_grad = kernels.alpha_cl_fused(z.to(DEVICE), spec, lo, hi, w, False)
    assert no_grad.shape == (0, d)
    assert_close(rows_only, ref_rows, precision, "loss rows without gradient")


@pytest.mark.parametrize("rule,kwargs", [
    ("entropy", {"temperature": 1e-4}),
    ("direct", {"temperature": 1e-3, "eps": 0.5}),
    ("infonce", {"temperature": 1e-4, "eps": 1.0}),
])
def test_tiny_temperature_needs_the_running_max(gen, rule, kwargs):
    """Logits of order −10⁴ underflow e^t even in float64: only the online row max (and the
    log-domain ε term) keep α finite. Float64, so the reference itself is exact."""
    z1, z2 = make_views(gen, 35, 24, torch.float64, on_sphere=True)
    spec = make_spec(rule, **kwargs)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, spec, "mean", None)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(a, b, rule=rule, backend="triton", **kwargs)
    loss.backward()
    assert_close(loss, ref_loss, "float64", "loss")
    assert_close(a.grad, ref_g1, "float64", "grad z1")
    assert_close(b.grad, ref_g2, "float64", "grad z2")


@pytest.mark.parametrize("unit", [True, False])
def test_tiny_infonce_loss_keeps_float32_precision(gen, unit):
    """NT-Xent (ε = 1) with positives almost equal, negatives far and a small τ: ξ_i ≈ 1e-7, so
    loss_i = log(1 + ξ_i) ≈ ξ_i. Formed as lse_i + d2_i/τ it cancels two O(1/τ) numbers (a
    relative error of 1e-2 here); from log ξ_i by log1p it keeps float32's relative precision.
    Oracle: the float64 log1p form on the same float32 inputs."""
    n, d, tau = 19, 48, 0.05
    # Orthonormal anchors, so that every negative is far (cos = 0) whatever the draw: random
    # rows in 48 dimensions can reach cos ≈ 0.5, and then ξ_i is no longer tiny.
    base = torch.linalg.qr(torch.randn(d, n, generator=gen, dtype=torch.float64))[0].T
    near = F.normalize(base + 2e-3 * torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    z = torch.cat([base, near]).float()
    if not unit:
        z = z * (1 + 0.01 * torch.rand(2 * n, 1, generator=gen))
    spec = make_spec("infonce", temperature=tau, eps=1.0, normalize=unit)
    z64, m = z.double(), 2 * n
    d2 = reference.squared_distances(z64, z64, unit)
    d2_pos = d2[torch.arange(m), reference.partner_index(m)]
    xi = torch.where(reference.negative_mask(m), torch.exp((d2_pos[:, None] - d2) / tau), 0.0).sum(1)
    expected = torch.log1p(xi)
    assert expected.max() < 1e-4, "the case must produce tiny losses"
    rows, _ = kernels.alpha_cl_fused(z.to(DEVICE), spec, 0, m, None, False)
    rel = ((rows.double().cpu() - expected).abs() / expected).max().item()
    assert rel < 2e-5, f"relative error of log(1 + ξ): {rel:.3g}"


def test_unknown_rule_is_rejected_by_the_launcher():
    """A spec whose rule slipped past LossSpec's check (set after construction) must not be
    computed as some other rule."""
    spec = make_spec("direct")
    object.__setattr__(spec, "rule", "softmax")
    with pytest.raises(ValueError, match="softmax"):
        kernels.alpha_cl_fused(torch.randn(8, 3).to(DEVICE), spec, 0, 8, None, True)


def test_feature_dimension_above_the_single_chunk_limit(gen):
    """D = 130 takes the chunked path of the default block rule for float32 (D̂ = 256 > 64)."""
    assert not block_config(130, torch.float32, "ieee").single_chunk
    z1, z2 = make_views(gen, 37, 130, torch.float32, on_sphere=True)
    spec = make_spec("direct", detach_alpha=False)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, spec, "mean", None)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    fastalpha.alpha_cl_loss(a, b, rule="direct", detach_alpha=False, backend="triton").backward()
    assert_close(a.grad, ref_g1, "float32", "grad z1")
    assert_close(b.grad, ref_g2, "float32", "grad z2")


def test_float32_dot_precision_follows_torch_setting():
    for setting, expected in [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")]:
        torch.set_float32_matmul_precision(setting)
        assert launch.dot_precision(torch.float32) == expected
        assert launch.dot_precision(torch.bfloat16) == "ieee"   # bf16 always runs on tensor cores


def test_block_rule_is_keyed_on_dimension_and_dtype_only():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for precision in ("ieee", "tf32"):
            for d in (1, 3, 24, 64, 130, 256, 2048, 5000):
                cfg = block_config(d, dtype, precision)
                assert min(cfg.block_m, cfg.block_n, cfg.block_k) >= 16            # tl.dot minimum
                if cfg.single_chunk:
                    assert cfg.block_do == cfg.block_k >= d
                else:
                    assert cfg.block_k <= cfg.block_do and cfg.block_do < padded_features(d)


@pytest.mark.parametrize("bad,error", [
    (dict(z=torch.randn(7, 3)), ValueError),                       # odd M
    (dict(z=torch.randn(2, 3)), ValueError),                       # N < 2
    (dict(z=torch.randint(0, 3, (6, 3))), TypeError),              # integer dtype
    (dict(row_lo=4, row_hi=2), ValueError),
    (dict(row_hi=7), ValueError),
    (dict(row_weight=torch.ones(5)), ValueError),                  # wrong length
])
def test_bad_input_is_rejected_with_a_clear_error(bad, error):
    args = dict(z=torch.randn(6, 3), row_lo=0, row_hi=6, row_weight=None)
    args.update(bad)
    with pytest.raises(error):
        kernels.alpha_cl_fused(args["z"].to(DEVICE), make_spec("direct"), args["row_lo"], args["row_hi"],
                               args["row_weight"], True)


STATUS_TEST = "test_status_without_the_interpreter_explains_why"


def start_in_background(tmp_path_factory, items) -> None:
    """Start the process without the interpreter beside the other tests (tests/background.py)."""
    if not torch.cuda.is_available() and any(item.name == STATUS_TEST for item in items):
        background.start(STATUS_TEST, _status_without_interpreter)


def _status_without_interpreter():
    code = "import fastalpha.backends.triton as k, torch; print(k.device_status(torch.device('cpu')))"
    return subprocess.run([sys.executable, "-c", code], env=compiler_env(background.environment()), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU availability logic")
def test_status_explains_availability():
    assert kernels.device_status(torch.device("cpu"))[0]               # interpreter is on here
    ok, reason = kernels.device_status(torch.device("meta"))
    assert not ok and "meta" in reason
    assert fastalpha.available_backends()["triton"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU availability logic")
@pytest.mark.background
def test_status_without_the_interpreter_explains_why():
    out = background.result(STATUS_TEST, _status_without_interpreter)
    assert out.returncode == 0, out.stderr
    assert "False" in out.stdout and "TRITON_INTERPRET" in out.stdout


# ----------------------------------------------------------------------------------- GPU --

def chunked_closed_form(z, spec, block=1024):
    """Float64 loss rows and gradient over all M anchors, accumulated over blocks of anchor
    rows with reference.closed_form_gradient: O(block × M) memory instead of M × M."""
    z64 = z.double()
    m = z64.shape[0]
    rows, grad = [], torch.zeros_like(z64)
    for lo in range(0, m, block):
        r, g = reference.closed_form_gradient(z64, spec, None, lo, min(lo + block, m))
        rows.append(r)
        grad += g
    return torch.cat(rows), grad


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["quadratic", "entropy", "direct", "inverse", "square", "infonce"])
@pytest.mark.parametrize("detach", [True, False])
def test_gpu_every_rule_bf16_matches_dense_reference(gen, rule, detach):
    spec = make_spec(rule, normalize=False, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, torch.bfloat16):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z1, z2 = make_views(gen, 2048, 128, torch.bfloat16, on_sphere=True)
    upstream = torch.randn(4096, generator=gen, dtype=torch.float64).to(DEVICE)
    ref_loss, ref_g1, ref_g2 = reference_loss_and_grads(z1, z2, spec, "none", upstream)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(a, b, rule=rule, normalize=False, detach_alpha=detach, reduction="none", backend="triton")
    (loss.float() * upstream.float()).sum().backward()
    assert_close(loss, ref_loss, "bfloat16", "loss")
    assert_close(a.grad, ref_g1, "bfloat16", "grad z1")
    assert_close(b.grad, ref_g2, "bfloat16", "grad z2")


@pytest.mark.gpu
@pytest.mark.parametrize("rule,detach,unit,dtype,matmul", [
    ("direct", True, True, torch.bfloat16, "highest"),
    ("entropy", False, False, torch.float32, "high"),       # TF32 products
    ("square", True, True, torch.float32, "highest"),       # IEEE float32 products; α only: β jumps where d2 crosses μ
    ("infonce", True, False, torch.float32, "high"),
])
def test_gpu_m65536_matches_chunked_float64(gen, rule, detach, unit, dtype, matmul):
    torch.set_float32_matmul_precision(matmul)
    m, d = 65536, 128
    z = F.normalize(torch.randn(m, d, generator=gen), dim=1).to(dtype).to(DEVICE)
    spec = make_spec(rule, normalize=unit, detach_alpha=detach)
    rows, grad = kernels.alpha_cl_fused(z, spec, 0, m, None, True)
    ref_rows, ref_grad = chunked_closed_form(z, spec)
    precision = precision_of(dtype, tf32=matmul != "highest")
    assert_close(rows, ref_rows, precision, "loss rows")
    assert_close(grad, ref_grad, precision, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_no_m_by_m_buffer(gen, dtype):
    """Peak extra memory of a forward + backward at M = 65536 stays O(M·D)."""
    m, d = 65536, 128
    z1, z2 = (torch.randn(m // 2, d, generator=gen).to(dtype).to(DEVICE).requires_grad_() for _ in range(2))
    fastalpha.alpha_cl_loss(z1[:4], z2[:4], rule="direct", detach_alpha=False, backend="triton").backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fastalpha.alpha_cl_loss(z1, z2, rule="direct", detach_alpha=False, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * m * d * 4 + 8 * 2**20, f"peak extra memory {extra / 2**20:.0f} MiB"
    assert torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


@pytest.mark.gpu
@pytest.mark.parametrize("rule,dtype,d,matmul", [
    ("direct", torch.bfloat16, 2048, "highest"),      # chunked features, tensor cores
    ("inverse", torch.float32, 130, "high"),          # chunked features, TF32
    ("square", torch.float64, 64, "highest"),         # float64 products
    ("entropy", torch.float16, 24, "highest"),
])
def test_gpu_row_range_weights_and_dtypes(gen, rule, dtype, d, matmul):
    torch.set_float32_matmul_precision(matmul)
    m, lo, hi = 4096, 1000, 3001
    z = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1).to(dtype).to(DEVICE)
    spec = make_spec(rule, normalize=False, detach_alpha=False)
    weight = (torch.rand(hi - lo, generator=gen, dtype=torch.float64) + 0.5).to(DEVICE)
    rows, grad = kernels.alpha_cl_fused(z, spec, lo, hi, weight.to(torch.promote_types(dtype, torch.float32)), True)
    ref_rows, ref_grad = reference.closed_form_gradient(z.double(), spec, weight, lo, hi)
    precision = precision_of(dtype, tf32=matmul != "highest")
    assert_close(rows, ref_rows, precision, "loss rows")
    assert_close(grad, ref_grad, precision, "grad")

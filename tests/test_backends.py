"""The backend contract matrix, written once and run on every backend.

Every backend (eager, chunked, cpp, triton — under Triton's CPU interpreter without a GPU, at
small sizes —, cuda with the `gpu` marker) is compared with the float64 dense reference
(autograd of fastalpha.reference) on fresh random inputs: the loss value and the gradients of
both views, for every rule and option (detach_alpha, normalize, ε, p, γ, τ extremes),
reductions, dtypes and shapes (M not a multiple of any block, D = 3 and 130), and through the
raw fused-op contract (row ranges, row weights, need_grad). Inputs that random draws never
produce are built on purpose: exact ties on the sparsemax threshold, and (chunked) tiny and
large τ, p = 8, identical rows, large unnormalised norms.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastalpha
from fastalpha import dispatch, reference
from fastalpha.backends import chunked
from fastalpha.ops import call_fused
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

import naive

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]
FUSED = ["chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _backend(name: str):
    device = _device(name)
    ok, reason = dispatch.backend_status(name, device)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name, device


@pytest.fixture(params=BACKENDS)
def backend(request):
    """(name, device) of an available backend (skipped, with the reason, otherwise)."""
    return _backend(request.param)


@pytest.fixture(params=FUSED)
def fused_backend(request):
    return _backend(request.param)


def _interpreted(name: str, device: torch.device) -> bool:
    return name == "triton" and device.type == "cpu"


#: Every rule with its default parameters: the first cases of each table of rule cases.
DEFAULT_RULE_CASES = [(rule, {}) for rule in RULES]
# (rule, parameters): every parameter of every rule, and τ at both ends of its useful range.
RULE_CASES = DEFAULT_RULE_CASES + [
    ("entropy", {"temperature": 0.05, "eps": 0.5}),
    ("direct", {"p": 3.0, "eps": 0.3, "temperature": 0.7}),
    ("direct", {"p": 8.0, "temperature": 20.0}),
    ("inverse", {"gamma": 0.5, "temperature": 0.02}),
    ("square", {"temperature": 0.05}),
    ("infonce", {"eps": 0.0, "temperature": 0.05}),
    ("infonce", {"eps": 3.0, "temperature": 10.0}),
]


def _case_id(case):
    """A (rule, parameters) case's test id: the rule, then each parameter's first letters and value."""
    rule, extra = case
    return rule + "".join(f"-{k[:4]}{v:g}" for k, v in extra.items())


def views(gen, n, d, dtype=F64, device="cpu", correlated=0.0):
    """Two views drawn in float64 and rounded once to `dtype` (so the reference sees exactly
    the values the backend sees). `correlated` > 0 makes z2 = z1 + noise/correlated."""
    z1 = torch.randn(n, d, generator=gen, dtype=F64)
    z2 = torch.randn(n, d, generator=gen, dtype=F64)
    if correlated:
        z2 = z1 + z2 / correlated
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def expected_loss_and_grads(z1, z2, spec, reduction="mean", weight=None):
    """Float64 reference value and (∂/∂z1, ∂/∂z2) of Σ weight · loss by autograd."""
    a = z1.detach().cpu().to(F64).requires_grad_()
    b = z2.detach().cpu().to(F64).requires_grad_()
    value = reference.alpha_cl_loss(a, b, spec, reduction)
    objective = value.sum() if weight is None else (value * weight.cpu().to(F64)).sum()
    g1, g2 = torch.autograd.grad(objective, (a, b))
    return value.detach(), g1, g2


def check_public_api(name, device, z1, z2, rule, extra=None, normalize=True, detach_alpha=True, reduction="mean",
                     gen=None, what=""):
    """Value and both gradients of fastalpha.alpha_cl_loss(backend=name) against the reference."""
    extra = extra or {}
    spec = make_spec(rule, **extra, normalize=normalize, detach_alpha=detach_alpha)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    value = fastalpha.alpha_cl_loss(a, b, rule=rule, normalize=normalize, detach_alpha=detach_alpha,
                                    reduction=reduction, backend=name, **extra)
    assert value.dtype == z1.dtype, f"{what}: loss dtype {value.dtype} for {z1.dtype} input"
    assert value.device.type == device.type
    weight = None
    if reduction == "none":
        weight = torch.randn(value.shape, generator=gen, dtype=F64).to(device=device, dtype=value.dtype)
    g1, g2 = torch.autograd.grad(value if weight is None else (value * weight).sum(), (a, b))
    assert g1.dtype == z1.dtype and g2.dtype == z2.dtype
    exp_value, exp_g1, exp_g2 = expected_loss_and_grads(z1, z2, spec, reduction, weight)
    precision = precision_of(z1.dtype)
    stacked = torch.cat([z1, z2]).cpu()
    rows = 2 * z1.shape[0] if reduction == "sum" else 1
    assert_close(value, exp_value, precision, f"{what} {name} {rule} loss", scale=loss_scale(stacked, spec, rows))
    anchor_weight = {"mean": 1.0 / (2 * z1.shape[0]), "sum": 1.0}.get(reduction)
    if anchor_weight is None:
        anchor_weight = weight.abs().max().item()
    g_scale = grad_scale(stacked, spec, anchor_weight)
    assert_close(g1, exp_g1, precision, f"{what} {name} {rule} grad z1", scale=g_scale)
    assert_close(g2, exp_g2, precision, f"{what} {name} {rule} grad z2", scale=g_scale)


# ----------------------------------------------------------------------------- rules × options

@pytest.mark.parametrize("case", RULE_CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_rules_and_options_match_reference(backend, gen, case, detach_alpha, normalize):
    """Every rule and parameter, α detached or differentiated, rows normalised or not; float64,
    M = 14 (no block multiple), correlated views (the regime a trained encoder is in)."""
    name, device = backend
    rule, extra = case
    z1, z2 = views(gen, 7, 5, device=device, correlated=1.5)
    check_public_api(name, device, z1, z2, rule, extra, normalize, detach_alpha, gen=gen)


# ----------------------------------------------------------------------------- dtypes × shapes

SHAPES = [(2, 3), (13, 3), (19, 130)]
INTERPRETER_SHAPES = [(2, 3), (7, 3), (3, 130)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("shape", range(len(SHAPES)), ids=["M4-D3", "oddM-D3", "oddM-D130"])
def test_dtypes_and_shapes_match_reference(backend, gen, rule, dtype, shape):
    """Loss in the input dtype and at the tolerance of that dtype (fastalpha.testing), for
    M = 4, 26, 38 (14 and 6 under the interpreter) and D = 3, 130 (odd, no power of two)."""
    name, device = backend
    n, d = (INTERPRETER_SHAPES if _interpreted(name, device) else SHAPES)[shape]
    z1, z2 = views(gen, n, d, dtype, device, correlated=2.0)
    check_public_api(name, device, z1, z2, rule, what=f"{n}x{d} {dtype}")


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_match_reference(backend, gen, rule, reduction):
    """mean / sum / none ("none" backpropagates random per-anchor weights); float32."""
    name, device = backend
    z1, z2 = views(gen, 6, 5, torch.float32, device)
    check_public_api(name, device, z1, z2, rule, reduction=reduction, gen=gen)


def test_non_contiguous_inputs(backend, gen):
    name, device = backend
    big = torch.randn(9, 10, generator=gen, dtype=F64).to(device)
    a, b = big[:, ::2], big.flip(0)[:, 1::2]
    assert not a.is_contiguous() and not b.is_contiguous()
    check_public_api(name, device, a, b, "inverse")


# ----------------------------------------------------------------------------- the raw contract

ROW_RANGES = {"all": lambda m: (0, m), "middle": lambda m: (3, m - 5), "last": lambda m: (m - 1, m)}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("unit_rows", [True, False])
def test_raw_contract_row_ranges_and_weights(backend, gen, rule, detach_alpha, unit_rows):
    """alpha_cl_fused(z, spec, lo, hi, w, need_grad) through the custom op: the rows [lo, hi),
    signed row weights, all M rows of the gradient, dtypes and shapes of the outputs."""
    name, device = backend
    m, d = 16, 5
    z = torch.randn(m, d, generator=gen, dtype=F64)
    if unit_rows:
        z = torch.nn.functional.normalize(z, dim=1)
    spec = make_spec(rule, normalize=unit_rows, detach_alpha=detach_alpha)
    for label, rows in ROW_RANGES.items():
        lo, hi = rows(m)
        weight = torch.randn(hi - lo, generator=gen, dtype=F64)
        leaf = z.clone().requires_grad_()
        expected_rows = reference.loss_rows(leaf, spec, lo, hi)
        (expected_grad,) = torch.autograd.grad((expected_rows * weight).sum(), leaf)
        got_rows, got_grad = call_fused(z.to(device), spec, name, lo, hi, weight.to(device), True)
        assert got_rows.shape == (hi - lo,) and got_rows.dtype == F64, (label, got_rows.shape, got_rows.dtype)
        assert got_grad.shape == (m, d) and got_grad.dtype == F64, (label, got_grad.shape)
        assert_close(got_rows, expected_rows, "float64", f"{name} {rule} rows {label}")
        assert_close(got_grad, expected_grad, "float64", f"{name} {rule} weighted gradient, rows {label}")
    # Without row weights: the plain sum; without need_grad: an empty (0, D) gradient.
    lo, hi = ROW_RANGES["middle"](m)
    leaf = z.clone().requires_grad_()
    expected_rows = reference.loss_rows(leaf, spec, lo, hi)
    (expected_grad,) = torch.autograd.grad(expected_rows.sum(), leaf)
    got_rows, got_grad = call_fused(z.to(device), spec, name, lo, hi, None, True)
    assert_close(got_grad, expected_grad, "float64", f"{name} {rule} unweighted gradient")
    got_rows, no_grad = call_fused(z.to(device), spec, name, lo, hi, None, False)
    assert no_grad.shape == (0, d), no_grad.shape
    assert_close(got_rows, expected_rows, "float64", f"{name} {rule} rows without gradient")


def test_raw_contract_float32_rows_and_gradient_dtypes(backend, gen):
    name, device = backend
    z = torch.nn.functional.normalize(torch.randn(10, 3, generator=gen), dim=1)
    for dtype in (torch.float32, torch.bfloat16):
        rows, grad = call_fused(z.to(device=device, dtype=dtype), make_spec("direct"), name, 0, 10, None, True)
        assert rows.dtype == torch.float32 and grad.dtype == dtype, (dtype, rows.dtype, grad.dtype)


def test_raw_op_rejects_unknown_rule(backend):
    name, device = backend
    z = torch.randn(6, 3, dtype=F64, device=device)
    with pytest.raises(ValueError, match="unknown rule"):
        torch.ops.fastalpha.alpha_cl_fused(z, None, 0, 6, None, "drect", 0.5, 4.0, 2.0, 0.0, True, True, "all", True, name, [])


# ----------------------------------------------------------------------------- ε reaches the kernel

@pytest.mark.parametrize("rule", ["entropy", "direct", "infonce"])
def test_eps_reaches_the_kernel(backend, gen, rule):
    """The value at ε = 2 and at ε = 0 equals the naive loops of each (which apply ε straight
    from the formula), and the two differ: a kernel that drops ε for some rule fails."""
    name, device = backend
    z1, z2 = views(gen, 4, 3, device=device, correlated=1.0)
    tau = 0.5
    got = {}
    for eps in (0.0, 2.0):
        got[eps] = fastalpha.alpha_cl_loss(z1, z2, rule=rule, temperature=tau, eps=eps, reduction="none", backend=name)
        expected = naive.loss_rows(z1.cpu().numpy(), z2.cpu().numpy(), rule, tau, p=4.0, eps=eps)
        assert_close(got[eps], torch.from_numpy(expected), "float64", f"{name} {rule} eps={eps}")
    assert (got[0.0] - got[2.0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- exact sparsemax ties

def tie_views(dtype, device):
    """Unit-axis rows with an exact tie on the sparsemax threshold (τ = 1):
    z1 = [e1, e2, −e1], z2 = [e3, −e1, −e1]. Anchor z1[0] = e1 has the negatives e2 (d2 = 1)
    and −e1 three times (d2 = 2), so μ = (τ + 1)/1 = 2: three negatives sit exactly on μ, the
    support is {e2} alone (k = 1), not all four (k = 4), and β = 2α − 1/k on e2 is 1, not 1.75.
    The distances 0, 1 and 2 are exact in every float format."""
    e = torch.eye(3, dtype=F64)
    z1 = torch.stack([e[0], e[1], -e[0]])
    z2 = torch.stack([e[2], -e[0], -e[0]])
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


@pytest.mark.parametrize("normalize", [True, False])
def test_tie_input_tells_the_support_conventions_apart(normalize):
    """The precondition of the tie tests: negatives sit exactly at μ_i, and counting them in
    the support (`d2 <= μ`) changes the gradient with detach_alpha=False by far more than any
    tolerance — otherwise the tie tests would test nothing."""
    z1, z2 = (v.numpy() for v in tie_views(F64, "cpu"))
    z = naive.stacked(z1, z2)
    d2 = naive.distances(z, normalize=normalize)
    m = len(z)
    ties = 0
    for i in range(m):
        values = [d2[i, j] for j in naive.negatives(i, m)]
        mu, _ = naive.sparsemax_support(values, 1.0)
        ties += sum(v == mu for v in values)
    assert ties >= 3, ties
    right = naive.square_gradient(z1, z2, 1.0, False, normalize)
    wrong = naive.square_gradient(z1, z2, 1.0, False, normalize, inclusive=True)
    assert max(np.abs(r - w).max() for r, w in zip(right, wrong)) > 0.05


@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_square_exact_ties_match_closed_form(fused_backend, detach_alpha, normalize, dtype):
    """On exact ties the support is {d2 < μ}: with detach_alpha=False its size k enters
    β = 2α − 1/k, so a kernel testing `d2 <= μ` gets a different gradient. Expected: the
    closed-form gradient computed in naive loops (tests/naive.py), exact in float64."""
    name, device = fused_backend
    z1, z2 = tie_views(dtype, device)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    rows = fastalpha.alpha_cl_loss(a, b, rule="square", temperature=1.0, normalize=normalize, detach_alpha=detach_alpha,
                                   reduction="none", backend=name)
    weights = torch.linspace(0.5, 1.5, rows.numel(), dtype=F64)
    g1, g2 = torch.autograd.grad((rows * weights.to(device=device, dtype=rows.dtype)).sum(), (a, b))
    exp_rows = naive.loss_rows(z1.cpu().numpy(), z2.cpu().numpy(), "square", 1.0, normalize=normalize)
    exp_g1, exp_g2 = naive.square_gradient(z1.cpu().numpy(), z2.cpu().numpy(), 1.0, detach_alpha, normalize,
                                           weights.numpy())
    precision = precision_of(dtype)
    assert_close(rows, torch.from_numpy(exp_rows), precision, f"{name} tie rows")
    assert_close(g1, torch.from_numpy(exp_g1), precision, f"{name} tie grad z1 (detach_alpha={detach_alpha})")
    assert_close(g2, torch.from_numpy(exp_g2), precision, f"{name} tie grad z2 (detach_alpha={detach_alpha})")


def test_square_ties_naive_gradient_is_autograd_off_the_ties(gen):
    """naive.square_gradient is itself checked: on random inputs (no ties) it equals autograd
    of the reference, detach on and off, normalised or not."""
    z1, z2 = views(gen, 4, 3)
    weights = torch.rand(8, generator=gen, dtype=F64)
    for detach in (True, False):
        for normalize in (True, False):
            spec = make_spec("square", temperature=0.7, normalize=normalize, detach_alpha=detach)
            _, e1, e2 = expected_loss_and_grads(z1, z2, spec, "none", weights)
            n1, n2 = naive.square_gradient(z1.numpy(), z2.numpy(), 0.7, detach, normalize, weights.numpy())
            assert_close(torch.from_numpy(n1), e1, "float64", f"naive grad z1 detach={detach} normalize={normalize}")
            assert_close(torch.from_numpy(n2), e2, "float64", f"naive grad z2 detach={detach} normalize={normalize}")


# ----------------------------------------------------------------------------- chunked: extremes

EXTREME_CASES = [
    ("entropy", {"temperature": 1e-3}),
    ("entropy", {"temperature": 1e3}),
    ("direct", {"temperature": 1e-3}),
    ("direct", {"temperature": 1e3, "eps": 1.0}),
    ("direct", {"p": 8.0}),
    ("direct", {"p": 8.0, "temperature": 1e-2}),
    ("inverse", {"temperature": 1e-4, "gamma": 0.25}),
    ("inverse", {"temperature": 1e3}),
    ("square", {"temperature": 1e-4}),
    ("square", {"temperature": 1e4}),
    ("infonce", {"temperature": 1e-2, "eps": 0.0}),
    ("infonce", {"temperature": 1e3}),
    ("quadratic", {}),
]


@pytest.mark.parametrize("case", EXTREME_CASES, ids=_case_id)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_extreme_temperatures_and_powers(gen, case, detach_alpha, normalize):
    rule, extra = case
    z1, z2 = views(gen, 9, 4, correlated=1.0)
    check_public_api("chunked", torch.device("cpu"), z1, z2, rule, extra, normalize, detach_alpha, gen=gen)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_chunked_large_unnormalised_norms(gen, rule, detach_alpha):
    """Rows of norm ~1e3 without normalisation: d2 ~ 1e6, α saturates to one-hot rows."""
    z1, z2 = views(gen, 6, 4, correlated=1.0)
    scales = torch.exp(torch.randn(6, 1, generator=gen, dtype=F64)) * 1e3
    check_public_api("chunked", torch.device("cpu"), z1 * scales, z2 * scales, rule, normalize=False,
                     detach_alpha=detach_alpha, gen=gen)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
def test_identical_rows(backend, rule, normalize):
    """Every row equal: all d2 = 0, α uniform (ε = 0) or ξ = M − 2; loss 0 (log(ε + M − 2) for
    infonce) and gradient exactly 0 (every pair difference vanishes)."""
    name, device = backend
    n = 5
    row = torch.tensor([[0.3, -1.2, 0.5]], dtype=F64, device=device)
    z1, z2 = row.expand(n, 3).clone().requires_grad_(), row.expand(n, 3).clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, normalize=normalize, backend=name)
    spec = make_spec(rule)
    expected = math.log(spec.eps + 2 * n - 2) if rule == "infonce" else 0.0
    assert abs(loss.item() - expected) < 1e-12, (loss.item(), expected)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert g1.abs().max() < 1e-12 and g2.abs().max() < 1e-12, (g1, g2)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_partial_chunks(gen, rule, detach_alpha, reduction):
    """M = 38 in chunks of 5 rows: the last chunk is partial and the partners of a chunk's
    rows live in other chunks; row ranges cut through chunks."""
    z = torch.nn.functional.normalize(torch.randn(38, 3, generator=gen, dtype=F64), dim=1)
    spec = make_spec(rule, temperature=0.05 if rule == "square" else None, detach_alpha=detach_alpha)
    for lo, hi in ((0, 38), (7, 33)):
        weight = torch.randn(hi - lo, generator=gen, dtype=F64) if reduction == "none" else None
        leaf = z.clone().requires_grad_()
        rows = reference.loss_rows(leaf, spec, lo, hi)
        (expected,) = torch.autograd.grad(rows.sum() if weight is None else (rows * weight).sum(), leaf)
        got_rows, got = chunked.loss_rows_and_grad(z, spec, lo, hi, weight, True, chunk_rows=5)
        assert_close(got_rows, rows, "float64", f"chunked {rule} rows [{lo}, {hi})")
        assert_close(got, expected, "float64", f"chunked {rule} gradient [{lo}, {hi})")


def test_chunked_random_shapes(gen):
    """A dozen random (N, D, chunk) draws, every rule, float64."""
    for _ in range(12):
        unit = bool(torch.randint(2, (), generator=gen))
        n = int(torch.randint(2, 40, (), generator=gen))
        # Unit rows in D = 1 are ±1: exact duplicates, d2 = 0 exactly, where the oracle's
        # autograd through clamp_min(0) drops the derivative −z_j that the closed form keeps
        # (a radial direction, which normalisation projects away in the public API).
        d = int(torch.randint(2 if unit else 1, 150, (), generator=gen))
        chunk = int(torch.randint(1, 2 * n + 3, (), generator=gen))
        rule = RULES[int(torch.randint(len(RULES), (), generator=gen))]
        detach = bool(torch.randint(2, (), generator=gen))
        # Raw rows get norms in [0.5, 1.5], not randn's √D: at D = 110 those put d2 near 300,
        # where float64 sums of α-weighted terms lose digits that a float64 tolerance on the
        # largest gradient entry does not allow (a fresh seed: 1.3e-11 against 1.1e-11).
        # Large norms have their own test (test_chunked_large_unnormalised_norms).
        z = torch.nn.functional.normalize(torch.randn(2 * n, d, generator=gen, dtype=F64), dim=1)
        if not unit:
            z = z * (0.5 + torch.rand(2 * n, 1, generator=gen, dtype=F64))
        spec = make_spec(rule, normalize=unit, detach_alpha=detach)
        leaf = z.clone().requires_grad_()
        rows = reference.loss_rows(leaf, spec)
        (expected,) = torch.autograd.grad(rows.sum(), leaf)
        got_rows, got = chunked.loss_rows_and_grad(z, spec, 0, 2 * n, None, True, chunk_rows=chunk)
        what = f"chunked N={n} D={d} chunk={chunk} {rule} detach={detach} unit={unit}"
        assert_close(got_rows, rows, "float64", what + " rows")
        assert_close(got, expected, "float64", what + " gradient")


@pytest.mark.parametrize("temperature", [1e-3, 0.05, 0.5, 5.0])
def test_chunked_sparsemax_threshold_matches_sort_based_reference(gen, temperature):
    m = 41
    d2 = torch.rand(23, m, generator=gen, dtype=F64) * 2
    d2[:, ::7] = d2[:, 1:2]   # ties
    mask = torch.rand(23, m, generator=gen) > 0.2
    mask[:, 0] = True
    expected = reference.sparsemax_threshold(d2, mask, temperature)
    mu, support_size = chunked._sparsemax_threshold(torch.where(mask, d2, math.inf), temperature)
    assert_close(mu, expected, "float64", "sparsemax threshold")
    alpha = torch.where(mask, (mu[:, None] - d2).clamp_min(0) / temperature, 0.0)
    assert_close(alpha.sum(1), torch.ones(23, dtype=F64), "float64", "sum of alpha")
    assert torch.equal(support_size, (alpha > 0).sum(1)), "support size disagrees with the support of alpha"


def test_chunked_rejects_bad_chunk_rows():
    z = torch.randn(8, 3, dtype=F64)
    with pytest.raises(ValueError, match="chunk_rows"):
        chunked.loss_rows_and_grad(z, make_spec("direct"), 0, 8, chunk_rows=0)


def test_every_backend_is_listed():
    listed = fastalpha.available_backends()
    assert set(listed) == {"eager", "chunked", "cpp", "cuda", "triton"}
    assert listed["eager"][0] and listed["chunked"][0]
    assert np.all([isinstance(reason, str) and reason for _, reason in listed.values()])

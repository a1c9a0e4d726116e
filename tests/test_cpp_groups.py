"""Group-defined positives (labels, more than two views) in the compiled kernels.

The kernel contract with `groups=` (fastalpha.dispatch) of the cpp backend, and of the cuda
backend on a GPU (marker `gpu`), against the float64 closed form
reference.grouped_closed_form_gradient (itself checked against autograd in
tests/test_reference.py), on fresh random inputs: every rule, detach on/off, unit and raw
rows, float64/float32 (and bfloat16), a random row range with random row weights, several
chunks per call, and group layouts with V = 3 views, labels with singletons (anchors without
a positive) and pairs. Also: groups of two are the SimCLR kernel, a batch of one group has no
loss, infonce's positives beyond float32's exponential range, and the raw op's input checks.
"""
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


def contract_case(gen, rule, eps, detach, unit, dtype, layout, device="cpu"):
    spec = make_spec(rule, eps=eps, normalize=unit, detach_alpha=detach)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip(SQUARE_BETA_IN_FLOAT64)
    z, ids = grouped_rows(gen, layout, {"views": 3, "labels": 11, "pairs": 8}[layout], dtype, unit)
    lo, hi = random_row_range(gen, z.shape[0])
    weight = torch.rand(hi - lo, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    check_grouped(z, ids, spec, lo, hi, weight, precision_of(dtype), device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("rule,eps", RULE_EPS)
def test_kernel_matches_grouped_closed_form(gen, rule, eps, detach, unit, dtype, layout):
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
]


@pytest.mark.parametrize("rule,options", GROUPED_RULE_PARAMETERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_rule_parameters(gen, rule, options, dtype):
    spec = make_spec(rule, normalize=False, **options)
    z, ids = grouped_rows(gen, "labels", 24, dtype, unit=False)
    check_grouped(z, ids, spec, 0, z.shape[0], None, precision_of(dtype))


@pytest.mark.parametrize("algorithm", ["onepass", "symmetric"])
def test_grouped_calls_run_the_one_pass_whatever_the_forced_algorithm(gen, monkeypatch, algorithm):
    """The grouped mode has one algorithm: forcing the symmetric one (SimCLR only) changes nothing."""
    monkeypatch.setenv("FASTALPHA_CPP_ALGORITHM", algorithm)
    monkeypatch.setenv("FASTALPHA_TILE", "32")
    z, ids = grouped_rows(gen, "views", 40, torch.float32)
    check_grouped(z, ids, make_spec("direct"), 0, z.shape[0], None, "float32")


def test_infonce_positives_beyond_float32_exponential_range(gen):
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


def test_anchors_without_a_positive_or_a_negative(gen):
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
    assert cpp.supports_groups
    assert dispatch.resolve_backend("auto", torch.device("cpu"), make_spec("direct"), False, True) == "cpp"


def _raw_grouped(z, groups, positive_distance, negative_count, row_lo=0, row_hi=None):
    row_hi = z.shape[0] if row_hi is None else row_hi
    return cpp_build.ops("cpu").alpha_cl_fused_grouped(
        z, row_lo, row_hi, None, groups, positive_distance, negative_count, "direct", 0.5, 4.0, 2.0, 0.0, True, True,
        True)


@pytest.mark.parametrize("bad,error,message", [
    (dict(groups=torch.zeros(6, dtype=torch.int32)), TypeError, "groups must have dtype Long"),
    (dict(groups=torch.zeros(5, dtype=torch.long)), ValueError, r"groups must have shape \(6,\)"),
    (dict(groups=torch.zeros(6, 1, dtype=torch.long)), ValueError, r"groups must have shape \(6,\)"),
    (dict(positive_distance=torch.zeros(6)), TypeError, "positive_distance must have dtype Double"),
    (dict(positive_distance=torch.zeros(4, dtype=torch.float64)), ValueError, r"positive_distance must have shape"),
    (dict(negative_count=torch.zeros(6)), TypeError, "negative_count must have dtype Long"),
    (dict(negative_count=torch.zeros(7, dtype=torch.long)), ValueError, r"negative_count must have shape \(6,\)"),
])
def test_raw_grouped_op_rejects_bad_input(bad, error, message):
    args = dict(groups=torch.arange(6) % 3, positive_distance=torch.zeros(6, dtype=torch.float64),
                negative_count=torch.full((6,), 4, dtype=torch.long))
    args.update(bad)
    with pytest.raises(error, match=message):
        _raw_grouped(torch.randn(6, 4, dtype=torch.float64), **args)


def test_raw_grouped_op_checks_z_and_the_rows():
    args = (torch.arange(6) % 3, torch.zeros(6, dtype=torch.float64), torch.full((6,), 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _raw_grouped(torch.zeros(6, 4, dtype=torch.int32), *args)
    with pytest.raises(RuntimeError, match="row_hi <= M"):
        _raw_grouped(torch.randn(6, 4, dtype=torch.float64), *args, row_hi=7)


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
    assert cuda.supports_groups
    assert dispatch.supports("cuda", "all", False, True)[0]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("unit", [True, False])
@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("rule,eps", RULE_EPS)
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
    with pytest.raises(ValueError, match="groups must be on cuda"):
        cpp_build.ops("cuda").alpha_cl_fused_grouped(
            z, 0, 6, None, torch.arange(6) % 3, torch.zeros(6, dtype=torch.float64, device="cuda"),
            torch.full((6,), 4, dtype=torch.long, device="cuda"), "direct", 0.5, 4.0, 2.0, 0.0, True, True, True)


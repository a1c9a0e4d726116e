"""Triton backend at large norms and small temperatures: one d2 and one t per pair in every pass.

With normalize=False and rows of large norm, t_ij = −d2_ij^k/τ reaches 10³…10⁸, and the passes
that recompute α_ij = e^{t_ij − lse_i} from the row statistics amplify any rounding that is not
common to all of them: half an ulp of |lse_i| (≈ |m_i|) in float32 is 10⁻⁴ of t at
|m_i| ≈ 10³ and units at 10⁸, so α is off by e^{that}, its row sums Σ_j α_ij leave 1 and the
gradient follows. Checked here (kernels in Triton's CPU interpreter, tiny sizes):

* Σ_j α_ij = 1 (ε = 0) as the row pass sums it, at entries of standard deviation 3 and 30,
  with near ties planted so that the normaliser λ_i = lse_i − m_i is not 0; the bound is the
  rounding of a sum of C terms and a log, independent of |t|;
* translation invariance: with d2 a function of differences, Σ_k ∂L/∂z_k = 0, so the column
  pass's α must be the row pass's α; the bound is the rounding of the sums the gradient is
  assembled from, from the float64 reference's weights;
* every rule × detach_alpha, float32 and bf16/fp16 inputs, against the float64 closed-form
  gradient (reference.closed_form_gradient), with the per-entry bound of
  testing.pair_rounding_bound: the first-order propagation of d2's rounding through the pairs
  the reference weights, at the format's relative precision (the repository's table);
* unit rows at small τ (0.05), and the grouped mode (labels) at large norms (A_i = 1).
"""
import inspect
import math

import pytest
import torch

from fastalpha import ops, positives, reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import (assert_within, beta_jumps_under_rounding, gradient_term_magnitude, pair_rounding_bound,
                               precision_of)

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)
from fastalpha.backends.triton import launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("ieee_float32")


def large_rows(gen, m, d, std, ties=6):
    """(M, D) Gaussian rows of entry standard deviation `std`, with `ties` anchors whose two
    nearest negatives are almost equally far: the second is the first reflected through a
    random hyperplane through the anchor (the same distance) and moved out by a relative
    η = τ/(4 d2²) (τ = 0.5), so that for direct's k = 2 their log-weights differ by O(1) or less
    and λ_i = log Σ_j e^{t_ij − m_i} is neither 0 nor carried by one pair."""
    z = std * torch.randn(m, d, generator=gen, dtype=F64)
    half = m // 2
    used = set()
    for i in range(ties):
        d2 = reference.squared_distances(z[i:i + 1], z)[0]
        d2[[i, (i + half) % m]] = math.inf
        near = int(d2.argmin())
        other = next(j for j in range(ties, m) if j not in (i, (i + half) % m, near) and j not in used)
        used.update((near, other))
        normal = torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=F64), dim=0)
        offset = z[near] - z[i]
        mirrored = offset - 2 * (offset @ normal) * normal
        z[other] = z[i] + mirrored * (1 + 0.5 / (4 * d2[near].item() ** 2))
    return z


def run_passes(z, spec, groups=None):
    """The row pass's arguments by name after the launches ran (launch.recording_launches
    records them; they are run here by hand)."""
    with launch.recording_launches() as recorded:
        launch.fused_loss_and_grad(z, spec, 0, z.shape[0], None, False, groups=groups)
    for item in recorded:
        launch._run(item, tune=False)
    row = next(item for item in recorded if item.kind == "row")
    return dict(zip(inspect.signature(row.kernel.fn).parameters, row.args))


@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("rule,extra", [("direct", {"p": 4.0}), ("entropy", {}), ("direct", {"p": 3.0})])
def test_weights_of_every_anchor_sum_to_one_at_large_norms(gen, std, rule, extra):
    """A_i = Σ_j α_ij = 1 for ε = 0, whatever t_ij the kernel rounded to: the C terms
    e^{t_ij − m_i} (each within 2u of its value), their sum (C − 1 roundings), λ_i = log l_i
    (u |λ_i| + 2u) and e^{−λ_i} (2u) give |A_i − 1| ≤ (C + 7)(1 + log C) u, nothing of |t|."""
    m, d = 24, 8
    z = large_rows(gen, m, d, std).to(torch.float32).to(DEVICE)
    spec = make_spec(rule, temperature=0.5, normalize=False, **extra)
    out = run_passes(z, spec)
    a = out["row_a_ptr"].double().cpu()
    u = 2.0 ** -24
    bound = (m + 7) * (1 + math.log(m)) * u
    assert (a - 1).abs().max().item() <= bound, f"max |A_i − 1| = {(a - 1).abs().max().item():.3g} > {bound:.3g}"


@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("rule", ["direct", "entropy", "inverse", "square"])
def test_gradient_sums_to_zero_over_the_rows(gen, std, detach_alpha, rule):
    """d2 depends on differences only, so Σ_k ∂L/∂z_k = 0: the row side (row pass's α) and the
    column side (column pass's α) cancel exactly when both passes weight each pair alike. What
    is left is rounding: each of the M rows sums R = M anchors (column side), C = M columns
    (row side) and a few assembly terms, each weight is an exp of rounded arguments (≤ 4u
    apart between the passes), and Σ_k adds M rows: ≤ (3M + 12) u × the magnitude of the terms
    (testing.gradient_term_magnitude, from the float64 reference's weights)."""
    m, d = 20, 8
    z = large_rows(gen, m, d, std).to(torch.float32).to(DEVICE)
    extra = {"temperature": 5.0 * std ** 2} if rule == "square" else {}
    spec = make_spec(rule, normalize=False, detach_alpha=detach_alpha, **extra)
    _, grad = ops.call_fused(z, spec, "triton", 0, m, None, True)
    residue = grad.double().cpu().sum(0).abs().max().item()
    slack = (3 * m + 12) * 2.0 ** -24 * gradient_term_magnitude(z, spec).sum().item()
    assert residue <= slack, f"|Σ_k G_k| = {residue:.3g} > {slack:.3g}"


def fused_against_reference(z, spec, weight=None, what=""):
    """ops.call_fused on `z` (its dtype) against the float64 closed form on the same values,
    within testing.pair_rounding_bound."""
    m = z.shape[0]
    precision = precision_of(z.dtype)
    distance_precision = "float64" if z.dtype == F64 else "float32"
    loss, grad = ops.call_fused(z.to(DEVICE), spec, "triton", 0, m, None if weight is None else weight.to(DEVICE), True)
    z64 = z.double().cpu()
    want_loss, want_grad = reference.closed_form_gradient(z64, spec, weight)
    loss_bound, grad_bound = pair_rounding_bound(z64, spec, distance_precision, precision, weight)
    if (grad_bound >= want_grad.abs().max()).any():
        # Rounding d2 to the format can move this gradient by more than its size (β with
        # |t'| ~ 10⁴ at entries of standard deviation 30: chunked and cpp are as far off): a
        # comparison with the float64 value is ill-posed, as square's β jump is.
        pytest.skip(f"{what}: ill-conditioned at {precision} (the rounding bound exceeds max|G|)")
    assert_within(loss, want_loss, loss_bound, distance_precision, f"{what} loss")
    assert_within(grad, want_grad, grad_bound, precision, f"{what} grad")


#: (rule, extra): every rule, direct with its default p = 4 and a non-integer power.
RULE_CASES = [(rule, {}) for rule in RULES] + [("direct", {"p": 3.0}), ("entropy", {"eps": 0.3})]


@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("rule,extra", RULE_CASES, ids=lambda v: v if isinstance(v, str) else str(v))
def test_large_norm_rows_match_the_reference_in_float32(gen, std, detach_alpha, rule, extra):
    """16 + 16 rows of D = 8 at entries of standard deviation 3 and 30 (the issue's case), near
    ties included, τ = 0.5 (square: τ proportional to the distances, so its support has
    several pairs), row weights."""
    if rule in ("quadratic", "infonce") and not detach_alpha:
        pytest.skip("β = α: detach_alpha changes nothing for this rule")
    m, d = 32, 8
    z = large_rows(gen, m, d, std).to(torch.float32)
    extra = dict(extra)
    if rule == "square":
        extra["temperature"] = 5.0 * std ** 2
    spec = make_spec(rule, normalize=False, detach_alpha=detach_alpha, **extra)
    if beta_jumps_under_rounding(spec, z.dtype):
        pytest.skip("square with β is compared in float64 only (testing.SQUARE_BETA_IN_FLOAT64)")
    weight = torch.rand(m, generator=gen, dtype=torch.float32) + 0.5
    fused_against_reference(z, spec, weight, f"{rule} std={std}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", ["direct", "entropy", "inverse", "infonce", "square"])
def test_large_norm_rows_match_the_reference_in_16_bit(gen, dtype, rule):
    """bf16/fp16 inputs (the reference takes the same 16-bit values): products of 16-bit values
    are exact in float32, so d2 rounds as in float32 and the pair weights enter the products
    in the 16-bit format (u_p of the table)."""
    m, d = 20, 8
    std = 3.0
    z = large_rows(gen, m, d, std).to(dtype)
    extra = {"temperature": 5.0 * std ** 2} if rule == "square" else {}
    spec = make_spec(rule, normalize=False, **extra)
    fused_against_reference(z, spec, None, f"{rule} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("rule", ["direct", "entropy", "inverse", "infonce", "square"])
def test_unit_rows_at_a_small_temperature(gen, dtype, detach_alpha, rule):
    """normalize=True at τ = 0.05 (square: τ = 0.05 too, a support of a few pairs)."""
    if rule == "infonce" and not detach_alpha:
        pytest.skip("β = α for infonce")
    m, d = 24, 6
    z = torch.nn.functional.normalize(torch.randn(m, d, generator=gen, dtype=F64), dim=1).to(dtype)
    spec = make_spec(rule, temperature=0.05, detach_alpha=detach_alpha)
    if beta_jumps_under_rounding(spec, dtype):
        pytest.skip("square with β is compared in float64 only (testing.SQUARE_BETA_IN_FLOAT64)")
    fused_against_reference(z, spec, None, f"{rule} unit τ=0.05")


@pytest.mark.parametrize("std", [3.0, 30.0])
@pytest.mark.parametrize("rule,extra", [("direct", {}), ("entropy", {}), ("infonce", {"eps": 0.5})])
def test_grouped_weights_sum_to_one_at_large_norms(gen, std, rule, extra):
    """Labels (the GROUPS kernels): the same statistics, so the same bound on A_i − 1 for the
    anchors with a negative (ε = 0; infonce with ε > 0 has its positives in the loop, with
    log ε added to their t, and A_i = 1 as well)."""
    m, d = 21, 8
    z = large_rows(gen, m, d, std, ties=2).to(torch.float32).to(DEVICE)
    labels = torch.randint(0, 4, (m,), generator=gen)
    groups = positives.Groups.of(labels.to(DEVICE))
    spec = make_spec(rule, temperature=0.5, normalize=False, **extra)
    out = run_passes(z, spec, groups)
    counted = groups.has_loss.cpu()
    a = out["row_a_ptr"].double().cpu()[counted]
    u = 2.0 ** -24
    bound = (m + 7) * (1 + math.log(m)) * u
    assert (a - 1).abs().max().item() <= bound, f"max |A_i − 1| = {(a - 1).abs().max().item():.3g} > {bound:.3g}"

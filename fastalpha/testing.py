"""The one tolerance table of the test suite and the assert helper that uses it.

A fused result `actual` is compared with the float64 reference `expected` elementwise:
|actual − expected| ≤ rtol·|expected| + atol·max(max|expected|, scale). The absolute part is
scaled by the largest reference entry because gradients have entries near zero whose relative
error means nothing; `rtol` is the precision one can ask of the format.

`scale` is for values that are sums of terms which nearly cancel: the loss of independent
random views is a difference of O(1) distances, so its rounding error follows the size of
those terms, not the (small) result. `loss_scale` and `grad_scale` give that size for a loss
value and for a gradient entry, so the tolerance follows the conditioning of the sum instead
of being loosened blindly.
"""
import torch

#: (rtol, atol relative to max|expected|) per compute precision.
TOLERANCES = {
    "float64": (1e-10, 1e-12),
    "float32": (1e-5, 1e-5),
    "tf32": (1e-3, 1e-3),
    "float16": (5e-3, 5e-3),
    "bfloat16": (2e-2, 2e-2),
}


#: Why square with a differentiated α is compared with the reference in float64 only.
SQUARE_BETA_IN_FLOAT64 = ("square's β = 2α − 1/k jumps by 1/k where a distance crosses the threshold μ, and "
                          "rounding d2 coarser than float64 moves pairs across it: this case is compared in float64")


def beta_jumps_under_rounding(spec, dtype: torch.dtype) -> bool:
    """Whether a comparison of `spec` in `dtype` with the float64 reference is ill-posed.

    square's β = 2α − 1/k (detach_alpha=False) changes by 1/k when a pair enters or leaves the
    support, at d2 = μ. The float64 reference and a kernel that rounds d2 in a coarser dtype
    may then put a pair on different sides of μ, so the two disagree by far more than rounding,
    on a whole row. No tolerance can follow that (it is a jump, not an error that scales), so
    the suite checks these cases in float64, where a crossing is vanishingly rare.
    """
    return spec.rule == "square" and spec.uses_beta and dtype != torch.float64


def precision_of(dtype: torch.dtype, tf32: bool = False) -> str:
    if dtype == torch.float32 and tf32:
        return "tf32"
    return str(dtype).replace("torch.", "")


def _d2_max(z: torch.Tensor, spec) -> float:
    """Bound on every d2 of the stacked rows z: 2 for unit rows, else 2·max||z_k||²."""
    return 2.0 if spec.unit_rows else 2.0 * z.detach().double().square().sum(1).max().item()


def _alpha_sensitivity(spec, d2_max: float) -> float:
    """1 + d2_max · (relative change of α per unit change of d2), bounded over [0, d2_max].

    A rounding error δ in the distances moves α_ij by about α·|∂ log α/∂d2|·δ; summed against
    distances ≤ d2_max this is the amplification of δ in the loss and in the gradient.
    """
    if spec.rule == "quadratic":
        return 1.0
    if spec.rule in ("square", "infonce"):
        return 1.0 + 2.0 * d2_max / spec.temperature
    grid = torch.linspace(1e-6, d2_max, 257, dtype=torch.float64)
    return 1.0 + 2.0 * d2_max * spec.log_weight_slope(grid).abs().max().item()


def loss_scale(z: torch.Tensor, spec, rows: int = 1) -> float:
    """Size of the terms a loss value is summed from, for `assert_close(..., scale=)`.

    One anchor's loss is built from squared distances d2 ≤ 2·max_i ||z_i||² (≤ 2 for unit
    rows), weighted by α whose own rounding follows `_alpha_sensitivity`, divided by τ for
    `infonce` (its logits); a sum over `rows` anchors adds `rows` such terms (rows=1 for a
    mean or a per-anchor vector). `z` is the stacked (M, D) input, `spec` a LossSpec.
    """
    d2_max = _d2_max(z, spec)
    per_row = d2_max / spec.temperature if spec.rule == "infonce" else d2_max * _alpha_sensitivity(spec, d2_max)
    return rows * per_row


def grad_scale(z: torch.Tensor, spec, row_weight: float = 1.0) -> float:
    """Size of the terms one gradient entry is summed from, for `assert_close(..., scale=)`.

    ∂/∂z_k is a sum over pairs of (anchor weight) × (pair weight) × (a difference of rows):
    anchor weights ≤ `row_weight` (1/M for a mean), pair weights summing to about 4 per row
    (A_k, A_p(k) and the row and column sums of α), times |β|/α for a differentiated α, times
    1/τ for `infonce`, times the sensitivity of α to rounded distances, and differences of
    rows ≤ 2·max||z_k||; normalisation then divides by ||z_k||. `z` is the stacked (M, D)
    input before normalisation.
    """
    norms = z.detach().double().norm(dim=1)
    radius = 1.0 if spec.unit_rows else norms.max().item()
    jacobian = 1.0 / max(norms.min().item(), 1e-12) if spec.unit_rows else 1.0
    d2_max = _d2_max(z, spec)
    beta = 1.0
    if spec.uses_beta:
        beta = 3.0 if spec.rule == "square" else _alpha_sensitivity(spec, d2_max)  # |2α − 1/k| ≤ 2α + 1/k
    rule = 1.0 / spec.temperature if spec.rule == "infonce" else 1.0
    return row_weight * 4.0 * beta * _alpha_sensitivity(spec, d2_max) * rule * 2.0 * radius * jacobian


def assert_close(actual: torch.Tensor, expected: torch.Tensor, precision: str, what: str = "value",
                 scale: float | None = None) -> None:
    """Assert `actual` matches the float64 `expected` at `precision`; report the worst entry.

    `scale` (optional): the magnitude of the terms `expected` is summed from (see
    `loss_scale`); the absolute tolerance is atol·max(max|expected|, scale).
    """
    rtol, atol = TOLERANCES[precision]
    if not isinstance(actual, torch.Tensor):
        actual = torch.tensor(actual, dtype=torch.float64)
    if not isinstance(expected, torch.Tensor):
        expected = torch.tensor(expected, dtype=torch.float64)
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, float(scale or 0.0))
    err = (actual - expected).abs()
    allowed = rtol * expected.abs() + atol * max(scale, 1e-30)
    excess = err - allowed
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0]) if excess.dim() else ()
        raise AssertionError(
            f"{what} mismatch at {precision}: worst index {idx}: got {actual[idx].item():.10g}, "
            f"expected {expected[idx].item():.10g} (|diff| {err[idx].item():.3g}, allowed {allowed[idx].item():.3g}); "
            f"{int((excess > 0).sum())} of {excess.numel()} entries out of tolerance; scale = {scale:.3g}"
        )

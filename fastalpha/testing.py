"""The one tolerance table of the test suite and the assert helper that uses it.

A fused result `actual` is compared with the float64 reference `expected` elementwise:
|actual − expected| ≤ rtol·|expected| + atol·max|expected|. The absolute part is scaled by
the largest reference entry because gradients have entries near zero whose relative error
means nothing; `rtol` is the precision one can ask of the format.
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


def precision_of(dtype: torch.dtype, tf32: bool = False) -> str:
    if dtype == torch.float32 and tf32:
        return "tf32"
    return str(dtype).replace("torch.", "")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, precision: str, what: str = "value") -> None:
    """Assert `actual` matches the float64 `expected` at `precision`; report the worst entry."""
    rtol, atol = TOLERANCES[precision]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs()
    allowed = rtol * expected.abs() + atol * max(scale, 1e-30)
    excess = err - allowed
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0]) if excess.dim() else ()
        raise AssertionError(
            f"{what} mismatch at {precision}: worst index {idx}: got {actual[idx].item():.10g}, "
            f"expected {expected[idx].item():.10g} (|diff| {err[idx].item():.3g}, allowed {allowed[idx].item():.3g}); "
            f"{int((excess > 0).sum())} of {excess.numel()} entries out of tolerance; max|expected| = {scale:.3g}"
        )

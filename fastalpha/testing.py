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
import math

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


def pair_rounding_bound(z: torch.Tensor, spec, distance_precision: str, product_precision: str,
                        row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""First-order bounds (loss_rows (M,), gradient (M, 1)) on what rounding may change in a
    fused SimCLR call (negatives="all", no queue) on the stacked, already prepared rows `z`.

    Unlike `loss_scale`/`grad_scale`, which bound the sensitivity of α over every distance up
    to d2_max, this follows the pairs the float64 reference actually weights, so it stays
    meaningful at large norms and small τ, where the worst case over [0, d2_max] is vacuous.
    With u_d = rtol(`distance_precision`) (what d2 is accumulated in) and
    u_p = rtol(`product_precision`) (the format of the products' operands):

    * d2_ij = (n_i + n_j)/2 − z_i·z_j rounds relative to the terms, not to d2:
      δd2_ij ≤ Δ_ij = u_d ((n_i + n_j)/2 + |z_i·z_j|) (u_d (1 + |z_i·z_j|) for unit rows);
    * a log-weight moves by δt_ij ≤ |t'(d2_ij)| Δ_ij (infonce: (Δ_ij + Δ_ip)/τ), and
      α_ij = e^{t_ij}/(Σ_k e^{t_ik} + ε-term) by at most what every t_ik moved by δt_ik + 4u_d
      can do to it (`_softmax_perturbation`, exact, not first order), and by all of α_ij plus
      the smallest normal number where it underflows;
      square: δα_ij ≤ (Δ_ij + max_{k∈S_i} Δ_ik)/τ on the support S_i widened by that margin;
    * with β (detach_alpha=False) β = α (1 − t'(v − c)), v − c = Σ_k α_ik d2_ik − d2_ij:
      δβ ≤ δα |1 − t'(v − c)| + α (|t''| Δ |v − c| + |t'| δ(v − c)), δ(v − c) ≤ Δ_ij + Δ_ip +
      Σ_k (α_ik Δ_ik + δα_ik |v_ik|) + 2u_d (|d2_i| + |v_ij| + |c_i|) (the kernels form (d2_i − d2_ij) − c_i);
    * a gradient row sums w_i δω_ij (|z_i| + |z_j|) over its pairs at both ends and
      w_i δA_i (|z_i| + |z_p(i)|) at the anchor and its partner (δA_i ≤ Σ_j δα_ij), plus
      u_p times the magnitude of the terms it sums (every |ω| (|z_i| + |z_j|) and A (|z_i| + |z_p|));
    * a loss row: Σ_j δα_ij |v_ij| + Σ_j α_ij (Δ_ij + Δ_ip) + u_d Σ_j α_ij |v_ij| (infonce:
      Σ_j π_ij (Δ_ij + Δ_ip)/τ + u_d |loss_i|, π the softmax weights of its logits).

    Everything is computed in float64 from the reference's own α (fastalpha.reference), never
    from a kernel's output; the gradient bound is per row (it holds for every feature).
    """
    from . import reference

    z = z.detach().to(torch.float64)
    m = z.shape[0]
    u_d = TOLERANCES[distance_precision][0]
    u_p = TOLERANCES[product_precision][0]
    w = torch.ones(m, dtype=torch.float64) if row_weight is None else row_weight.detach().to(torch.float64).cpu()
    z = z.cpu()
    mask = reference.negative_mask(m)
    partners = reference.partner_index(m)
    d2 = reference.squared_distances(z, z, spec.unit_rows)
    d2_pos = d2.gather(1, partners[:, None])[:, 0]
    dots = (z @ z.T).abs()
    norms = torch.ones(m, dtype=torch.float64) if spec.unit_rows else z.square().sum(1)
    delta = u_d * ((norms[:, None] + norms[None, :]) / 2 + dots)
    delta_pos = delta.gather(1, partners[:, None])
    alpha = reference.alpha_from_distances(d2, d2_pos, mask, spec)
    zero = torch.zeros_like(d2)
    v = torch.where(mask, d2_pos[:, None] - d2, zero)
    if spec.rule == "square":
        mu = reference.sparsemax_threshold(d2, mask, spec.temperature)
        margin = torch.where(alpha > 0, delta, zero).amax(1, keepdim=True)
        near = mask & (d2 < mu[:, None] + 2 * margin)
        d_alpha = torch.where(near, (delta + margin) / spec.temperature, zero)
    elif spec.rule == "quadratic":
        d_alpha = 4 * u_d * alpha
    else:
        if spec.rule == "infonce":
            d_t = (delta + delta_pos) / spec.temperature
        else:
            d_t = spec.log_weight_slope(torch.where(mask, d2, torch.ones_like(d2))).abs() * delta
        d_t = torch.where(mask, d_t + 4 * u_d, zero)
        d_alpha = _softmax_perturbation(alpha, d_t, mask)
    # Below the format's smallest normal number a weight may be lost whole (exp underflows).
    tiny = torch.finfo(torch.float64 if distance_precision == "float64" else torch.float32).tiny
    d_alpha = d_alpha + torch.where(mask, torch.where(alpha < tiny, alpha, zero) + tiny, zero)
    omega = reference.pair_term_weights(alpha, d2, d2_pos, mask, spec)
    d_omega = d_alpha
    if spec.uses_beta and spec.is_log_weight:
        c = (alpha * v).sum(1, keepdim=True)
        spread = v - c
        safe = torch.where(mask, d2, torch.ones_like(d2)).requires_grad_()
        slope = spec.log_weight_slope(safe)
        # t'' (0 where t' is constant: entropy, k = 1).
        curvature = torch.autograd.grad(slope.sum(), safe)[0] if slope.requires_grad else torch.zeros_like(d2)
        slope, curvature = slope.detach().abs(), curvature.abs()
        d_spread = (delta + delta_pos + (alpha * delta + d_alpha * v.abs()).sum(1, keepdim=True)
                    + 2 * u_d * (d2_pos[:, None] + v.abs() + c.abs()))
        d_omega = d_alpha * (1 + slope * spread.abs()) + alpha * (curvature * delta * spread.abs() + slope * d_spread)
        d_omega = torch.where(mask, d_omega, zero)
    grad = _at_both_ends(z, w, d_omega, d_alpha.sum(1)) + u_p * _at_both_ends(z, w, omega.abs(), alpha.sum(1))
    if spec.rule == "infonce":
        logits = torch.where(mask, v / spec.temperature, torch.full_like(d2, -math.inf))
        soft = torch.softmax(logits, 1)
        rows = torch.logaddexp(torch.logsumexp(logits, 1), torch.tensor(math.log(spec.eps) if spec.eps > 0 else -math.inf,
                                                                         dtype=torch.float64))
        loss = (soft * (delta + delta_pos)).sum(1) / spec.temperature + u_d * rows.abs()
    else:
        loss = (d_alpha * v.abs()).sum(1) + (alpha * (delta + delta_pos)).sum(1) + u_d * (alpha * v.abs()).sum(1)
    return loss, (grad * spec.grad_scale)[:, None]


def _softmax_perturbation(alpha: torch.Tensor, d_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max |α'_ij − α_ij| over log-weights moved by at most d_t each, not only to first order.

    α'_ij = α_ij e^{δ_ij} / (Σ_k α_ik e^{δ_ik} + 1 − A_i) with |δ| ≤ d_t (1 − A_i: the ε-term,
    which does not move) lies between α_ij e^{−d_t,ij} / (Σ_k α_ik e^{d_t,ik} + 1 − A_i) and
    min(1, α_ij e^{d_t,ij} / (Σ_k α_ik e^{−d_t,ik} + 1 − A_i)); evaluated in log space so that
    d_t ≫ 1 (an ill-conditioned row) gives a bound of order 1 instead of an overflow.
    """
    log_alpha = torch.where(mask & (alpha > 0), alpha.log(), torch.full_like(alpha, -math.inf))
    rest = (1 - alpha.sum(1, keepdim=True)).clamp_min(0)
    log_rest = torch.where(rest > 0, rest.log(), torch.full_like(rest, -math.inf))
    low = torch.logaddexp(torch.logsumexp(log_alpha - d_t, 1, keepdim=True), log_rest)
    high = torch.logaddexp(torch.logsumexp(log_alpha + d_t, 1, keepdim=True), log_rest)
    up = torch.exp(log_alpha + d_t - low).clamp_max(1.0)
    down = torch.exp(log_alpha - d_t - high)
    return torch.where(mask, torch.maximum(up - alpha, alpha - down), torch.zeros_like(alpha))


def _at_both_ends(z: torch.Tensor, w: torch.Tensor, pair: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """(M,): Σ over the gradient terms of each row of w_i pair_ij (|z_i| + |z_j|) (the row and the
    column side) and w_i anchor_i (|z_i| + |z_p(i)|) (the anchor and its partner)."""
    m = z.shape[0]
    partners = (torch.arange(m) + m // 2) % m
    row_norm = z.norm(dim=1)
    weighted = w[:, None] * pair * (row_norm[:, None] + row_norm[None, :])
    partner = w * anchor * (row_norm + row_norm[partners])
    return weighted.sum(1) + weighted.sum(0) + partner + torch.zeros(m, dtype=z.dtype).index_add_(0, partners, partner)


def gradient_term_magnitude(z: torch.Tensor, spec, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """(M,): the magnitude of the terms each gradient row of a SimCLR call is summed from,
    Σ |ω_ij| (|z_i| + |z_j|) over its pairs and A (|z_i| + |z_p|) over its positive pairs, from
    the float64 reference's weights (× 1/τ for infonce)."""
    from . import reference

    z = z.detach().to(torch.float64).cpu()
    m = z.shape[0]
    w = torch.ones(m, dtype=torch.float64) if row_weight is None else row_weight.detach().to(torch.float64).cpu()
    mask = reference.negative_mask(m)
    d2 = reference.squared_distances(z, z, spec.unit_rows)
    d2_pos = d2.gather(1, reference.partner_index(m)[:, None])[:, 0]
    alpha = reference.alpha_from_distances(d2, d2_pos, mask, spec)
    omega = reference.pair_term_weights(alpha, d2, d2_pos, mask, spec)
    return _at_both_ends(z, w, omega.abs(), alpha.sum(1)) * spec.grad_scale


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, precision: str,
                  what: str = "value") -> None:
    """Assert |actual − expected| ≤ bound + rtol·|expected| elementwise (`bound` broadcasts), the
    check of a derived per-entry bound such as `pair_rounding_bound`; report the worst entry."""
    rtol = TOLERANCES[precision][0]
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    allowed = (bound.to(torch.float64).cpu() + rtol * expected.abs()).expand_as(expected)
    err = (actual - expected).abs()
    excess = err - allowed
    if excess.numel() and excess.max() > 0:
        idx = tuple(int(i) for i in torch.nonzero(excess == excess.max())[0])
        raise AssertionError(
            f"{what} mismatch at {precision}: worst index {idx}: got {actual[idx].item():.10g}, "
            f"expected {expected[idx].item():.10g} (|diff| {err[idx].item():.3g}, allowed {allowed[idx].item():.3g}); "
            f"{int((excess > 0).sum())} of {excess.numel()} entries out of bound; max|expected| = {expected.abs().max().item():.3g}"
        )

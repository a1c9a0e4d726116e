r"""`eager-chunked`: the strongest α-CL loss a user can write by hand in plain PyTorch.

It is the benchmark's baseline for the fused kernels (the approach of Inf-CL and of
open_clip's chunked losses, DESIGN.md §8 "On the CPU"): the M anchors are taken in chunks of
R full rows, so a chunk holds every column of its rows and therefore complete row
statistics. One pass per chunk, three matrix products:

    S   = Z_r Zᵀ                               (R × M)   →  d2 = (n_r + n)/2 − S, clamped at 0
    α   = rule(d2)  over J_i  (row max, exact sparsemax threshold, ...)
    αZ  = ω Z                                  (R × D)   row side of the gradient
    αᵀZ += ωᵀ Z_r                              (M × D)   column side, accumulated over chunks

with ω_ij = w_i α_ij (β instead of α when `detach_alpha=False`, DESIGN.md §1) and a_i = w_i A_i,
A_i = Σ_j α_ij. The gradient of Σ_i w_i loss_i (times 1/τ for infonce)

    G_k = (a_k + a_{p(k)}) (z_k − z_{p(k)}) − Σ_j (ω_kj + ω_jk)(z_k − z_j)

is assembled from a, the row and column sums of ω, ωZ and ωᵀZ, so memory is O(R·M + M·D),
never M × M. The forward returns the gradient and backward only scales it (α is a
stop-gradient, or folded into β), as the fused kernels do.

Every rule and both `detach_alpha` settings are supported; `square` uses Michelot's
threshold iteration on the full rows, which is exact (see `_sparsemax_threshold`).
Matrix products run in the input dtype, statistics in float32 (float64 for float64 input).
"""
from __future__ import annotations

import math

import torch

from fastalpha.checks import check_flag, check_views
from fastalpha.rules import RuleParams, check_reduction, resolve_rule

#: Elements of one (R × M) chunk buffer. CPU: 2^21 float32 = 8 MiB, big enough that the
#: three products run at matmul speed and small enough to stay near the cache (among 2^18…2^22
#: at M = 4096 and 16384, one thread, it was within noise of the best). GPU: 2^26 (256 MiB),
#: so that a chunk is enough work to hide the ~30 kernel launches it costs.
CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def default_chunk_rows(m: int, device_type: str = "cpu") -> int:
    """R = CHUNK_ELEMENTS / M rows per chunk, at least 32 (and at most M)."""
    return min(m, max(32, CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS["cpu"]) // m))


def _sparsemax_threshold(d2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Exact μ_i with Σ_j [(μ_i − d2_ij)/τ]_+ = 1 per row, and the support size k_i.

    Masked entries of `d2` are +inf. Michelot's iteration μ ← (τ + Σ_{d2<μ} d2) / |{d2<μ}|,
    started at μ_0 = min_j d2_ij + τ (≥ μ*, since the closest negative has α ≤ 1): every
    iterate stays ≥ μ* and the support {d2 < μ} only shrinks, so the first iteration that
    leaves the support size unchanged has found the exact support, and μ is then exact.
    """
    mu = d2.amin(1) + temperature
    count = None
    for _ in range(d2.shape[1] + 1):
        inside = d2 < mu[:, None]
        new_count = inside.sum(1)
        mu = (temperature + torch.where(inside, d2, 0.0).sum(1)) / new_count
        if count is not None and torch.equal(new_count, count):
            break
        count = new_count
    return mu, new_count


def _chunk_weights(d2: torch.Tensor, d2_pos: torch.Tensor, rows: torch.Tensor, masked_cols: tuple, params: RuleParams,
                   detach_alpha: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""For one chunk: (loss_i, A_i, ω_ij) with ω = α (or β for detach_alpha=False), 0 off J_i.

    `d2` (R × M) may be overwritten. `masked_cols` are the column indices of self and partner.
    """
    m = d2.shape[1]
    tau = params.temperature
    rule = params.rule

    def mask_(t: torch.Tensor, value: float) -> torch.Tensor:
        for cols in masked_cols:
            t[rows, cols] = value
        return t

    if rule == "quadratic":
        omega = mask_(torch.full_like(d2, 1.0 / (m - 2)), 0.0)
        a_sum = torch.ones_like(d2_pos)
        loss = d2_pos - (omega * d2).sum(1)
        return loss, a_sum, omega

    if rule == "infonce":
        logits = mask_(d2.neg_().add_(d2_pos[:, None]).div_(tau), -math.inf)
        row_max = logits.amax(1)
        if params.eps > 0:
            row_max = row_max.clamp_min(math.log(params.eps))
        e = logits.sub_(row_max[:, None]).exp_()
        xi = e.sum(1)
        denom = xi + params.eps * torch.exp(-row_max)
        loss = row_max + torch.log(denom)
        return loss, xi / denom, e.div_(denom[:, None])

    if rule == "square":
        work = mask_(d2.clone(), math.inf)
        mu, support_size = _sparsemax_threshold(work, tau)
        alpha = work.neg_().add_(mu[:, None]).clamp_min_(0).div_(tau)
        loss = d2_pos - (alpha * d2).sum(1)
        a_sum = torch.ones_like(d2_pos)
        if detach_alpha:
            return loss, a_sum, alpha
        # Sparsemax Jacobian folded into the pair weights: β = 2α − 1/k on the support.
        beta = torch.where(alpha > 0, 2 * alpha - (1.0 / support_size.to(alpha.dtype))[:, None], 0.0)
        return loss, a_sum, beta

    # Log-weight rules: α = e^{t} / (Σ_k e^{t_ik} + ε(M−2)), t = log w(d2), with the row max for range.
    t = mask_(params.log_weight(d2), -math.inf)
    row_max = t.amax(1)
    e = t.sub_(row_max[:, None]).exp_()
    denom = e.sum(1)
    if params.eps > 0:
        denom = denom + params.eps * (m - 2) * torch.exp(-row_max)
    alpha = e.div_(denom[:, None])
    a_sum = alpha.sum(1)
    loss = a_sum * d2_pos - (alpha * d2).sum(1)
    if detach_alpha:
        return loss, a_sum, alpha
    # Gradient through α: β = α (1 − t'(d2) (v − c)), v = d2_i − d2_ij, c_i = Σ_k α_ik v_ik = loss_i.
    shift = (d2_pos - loss)[:, None] - d2
    correction = mask_(params.log_weight_slope(d2).mul_(shift).mul_(alpha), 0.0)
    return loss, a_sum, alpha.sub_(correction)


def loss_rows_and_grad(z: torch.Tensor, params: RuleParams, detach_alpha: bool = True, row_weight: torch.Tensor | None = None,
                       need_grad: bool = True, chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""Per-anchor losses (M,) and ∂(Σ_i w_i loss_i)/∂Z (M × D, or None) of stacked rows Z.

    `z` is already normalised; `row_weight` (M,) defaults to ones. O(R·M + M·D) memory.
    """
    m, d = z.shape
    half = m // 2
    stat = torch.promote_types(z.dtype, torch.float32)
    chunk = default_chunk_rows(m, z.device.type) if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    half_sq = z.to(stat).square().sum(1).mul_(0.5)
    loss_rows = torch.empty(m, dtype=stat, device=z.device)
    if need_grad:
        col_acc = torch.zeros(m, d, dtype=stat, device=z.device)   # Σ_i ω_ij z_i  (ωᵀZ)
        col_sum = torch.zeros(m, dtype=stat, device=z.device)      # Σ_i ω_ij
        grad = torch.zeros(m, d, dtype=stat, device=z.device)
    for lo in range(0, m, chunk):
        hi = min(lo + chunk, m)
        rows = torch.arange(hi - lo, device=z.device)
        self_cols = rows + lo
        partner_cols = (self_cols + half) % m
        z_rows = z[lo:hi]
        d2 = (z_rows @ z.T).to(stat).neg_().add_(half_sq).add_(half_sq[lo:hi, None]).clamp_min_(0)
        d2_pos = d2[rows, partner_cols]
        loss, a_sum, omega = _chunk_weights(d2, d2_pos, rows, (self_cols, partner_cols), params, detach_alpha)
        del d2
        loss_rows[lo:hi] = loss
        if not need_grad:
            continue
        if row_weight is not None:
            w = row_weight[lo:hi].to(stat)
            omega.mul_(w[:, None])
            a_sum = a_sum * w
        omega_in = omega.to(z.dtype)
        z_rows_stat = z_rows.to(stat)
        positive = a_sum[:, None] * (z_rows_stat - z[partner_cols].to(stat))
        row_side = (omega_in @ z).to(stat).sub_(omega.sum(1)[:, None] * z_rows_stat).add_(positive)
        grad[lo:hi] += row_side
        grad.index_add_(0, partner_cols, positive, alpha=-1.0)
        col_acc += (omega_in.T @ z_rows).to(stat)
        col_sum += omega.sum(0)
    if not need_grad:
        return loss_rows, None
    grad.add_(col_acc).sub_(col_sum[:, None] * z.to(stat))
    if params.rule == "infonce":
        grad.div_(params.temperature)
    return loss_rows, grad.to(z.dtype)


class ChunkedAlphaCL(torch.autograd.Function):
    """loss = reduce(loss_rows(Z)); the gradient comes out of the forward, backward scales it."""

    @staticmethod
    def forward(ctx, z, params: RuleParams, detach_alpha: bool, reduction: str, chunk_rows):
        need_grad = ctx.needs_input_grad[0] and reduction != "none"
        loss_rows, grad = loss_rows_and_grad(z, params, detach_alpha, None, need_grad, chunk_rows)
        ctx.params, ctx.detach_alpha, ctx.reduction, ctx.chunk_rows = params, detach_alpha, reduction, chunk_rows
        if reduction == "none":
            ctx.save_for_backward(z)
            return loss_rows
        ctx.save_for_backward(grad if need_grad else None)
        return loss_rows.mean() if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        if ctx.reduction == "none":
            # Per-row incoming gradients are row weights: one more pass with them.
            _, grad = loss_rows_and_grad(saved, ctx.params, ctx.detach_alpha, grad_out, True, ctx.chunk_rows)
            return grad, None, None, None, None
        scale = grad_out / saved.shape[0] if ctx.reduction == "mean" else grad_out
        return saved * scale.to(saved.dtype), None, None, None, None


def chunked_alpha_cl_loss(z1: torch.Tensor, z2: torch.Tensor, rule: str = "direct", temperature=None, p=None, gamma=None, eps=None,
                          normalize: bool = True, detach_alpha: bool = True, reduction: str = "mean",
                          chunk_rows: int | None = None) -> torch.Tensor:
    """fastalpha.alpha_cl_loss computed chunk by chunk in plain PyTorch (same arguments, no `backend`)."""
    check_views(z1, z2)
    params = resolve_rule(rule, temperature, p, gamma, eps)
    check_flag("normalize", normalize)
    check_flag("detach_alpha", detach_alpha)
    check_reduction(reduction)
    z = torch.cat([z1, z2], 0)
    if normalize:
        z = torch.nn.functional.normalize(z, dim=1)
    return ChunkedAlphaCL.apply(z, params, detach_alpha, reduction, chunk_rows)

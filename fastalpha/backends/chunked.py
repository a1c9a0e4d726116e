r"""Backend "chunked": the fused-op contract in plain PyTorch, chunk by chunk of full rows.

No compiler and no Triton needed, so every machine gets O(R·M) memory; it is also the
strongest α-CL loss one can write by hand in plain PyTorch, hence the benchmarks' baseline for
the compiled kernels. The anchors are taken in chunks of R full rows, so a chunk holds every
column of its rows and therefore complete row statistics. One pass per chunk, three matrix
products:

    S   = Z_r Zᵀ                               (R × M)   →  d2 (1 − S for unit rows), clamped at 0
    α   = rule(d2)  over J_i  (row max, exact sparsemax threshold, ...)
    αZ  = ω Z                                  (R × D)   row side of the gradient
    αᵀZ += ωᵀ Z_r                              (M × D)   column side, accumulated over chunks

with ω_ij = w_i α_ij (β instead of α when α is differentiated) and a_i = w_i A_i,
A_i = Σ_j α_ij. The gradient of Σ_i w_i loss_i (times 1/τ for infonce)

    G_k = (a_k + a_{p(k)}) (z_k − z_{p(k)}) − Σ_j (ω_kj + ω_jk)(z_k − z_j)

(without the terms in z_k itself for unit rows) is assembled from a, the row and column
sums of ω, ωZ and ωᵀZ, so memory is O(R·M + M·D), never M × M.

Every rule and both `detach_alpha` settings are supported; `square` uses Michelot's
threshold iteration on the full rows, which is exact (see `_sparsemax_threshold`).
Matrix products run in the input dtype, statistics in float32 (float64 for float64 input).
"""
from __future__ import annotations

import math

import torch

from .. import positives
from ..rules import LossSpec, negative_count
from . import every_negative_set

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


def _chunk_weights(d2: torch.Tensor, d2_pos: torch.Tensor, mask_, count: int, params: LossSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""For one chunk: (loss_i, A_i, ω_ij) with ω = α (or β for detach_alpha=False), 0 off J_i.

    `d2` (R × C) may be overwritten. `mask_(t, value)` sets the entries outside J_i of t to
    value in place; `count` = |J_i|: an int (the same for every anchor) or, with groups, an (R,)
    tensor.
    """
    tau = params.temperature
    rule = params.rule

    if rule == "quadratic":
        omega = mask_(torch.ones_like(d2).div_(count if isinstance(count, int) else count[:, None]), 0.0)
        a_sum = torch.ones_like(d2_pos)
        loss = d2_pos - (omega * d2).sum(1)
        return loss, a_sum, omega

    if rule == "infonce":
        # loss_i = log(ε + ξ_i) from log ξ_i by logaddexp (log1p inside), not as
        # log(Σ …) of a sum that already rounded ε + ξ_i: tiny losses keep their digits.
        logits = mask_(d2.neg_().add_(d2_pos[:, None]).div_(tau), -math.inf)
        row_max = logits.amax(1)
        e = logits.sub_(row_max[:, None]).exp_()
        log_xi = row_max + torch.log(e.sum(1))
        loss = torch.logaddexp(log_xi, torch.tensor(math.log(params.eps), dtype=log_xi.dtype)) if params.eps > 0 else log_xi
        return loss, torch.exp(log_xi - loss), e.mul_(torch.exp(row_max - loss)[:, None])

    if rule == "square":
        work = mask_(d2.clone(), math.inf)
        mu, support_size = _sparsemax_threshold(work, tau)
        alpha = work.neg_().add_(mu[:, None]).clamp_min_(0).div_(tau)
        loss = d2_pos - (alpha * d2).sum(1)
        a_sum = torch.ones_like(d2_pos)
        if not params.uses_beta:
            return loss, a_sum, alpha
        # Sparsemax Jacobian folded into the pair weights: β = 2α − 1/k on the support.
        beta = torch.where(alpha > 0, 2 * alpha - (1.0 / support_size.to(alpha.dtype))[:, None], 0.0)
        return loss, a_sum, beta

    # Log-weight rules: α = e^{t} / (Σ_k e^{t_ik} + ε|J_i|), t = log w(d2), with the row max for range.
    t = mask_(params.log_weight(d2), -math.inf)
    row_max = t.amax(1)
    e = t.sub_(row_max[:, None]).exp_()
    denom = e.sum(1)
    if params.eps > 0:
        denom = denom + params.eps * count * torch.exp(-row_max)
    alpha = e.div_(denom[:, None])
    a_sum = alpha.sum(1)
    loss = a_sum * d2_pos - (alpha * d2).sum(1)
    if not params.uses_beta:
        return loss, a_sum, alpha
    # Gradient through α: β = α (1 − t'(d2) (v − c)), v = d2_i − d2_ij, c_i = Σ_k α_ik v_ik = loss_i.
    shift = (d2_pos - loss)[:, None] - d2
    correction = mask_(params.log_weight_slope(d2).mul_(shift).mul_(alpha), 0.0)
    return loss, a_sum, alpha.sub_(correction)


def status() -> tuple[bool, str]:
    return True, "plain PyTorch, full-row chunks, O(R*M) memory"


supports = every_negative_set
supports_groups = True
supports_grouped_queue = True


def _chunk_mask(lo: int, hi: int, m: int, queue_rows: int, negatives: str, device):
    """`mask_(t, value)` for the chunk of anchors [lo, hi): sets t outside J_i to value, in place.

    "all" excludes two entries per row (self and partner): two indexed writes. The other
    modes exclude whole column ranges, so they build the (R × C) boolean once per chunk.
    """
    half = m // 2
    rows = torch.arange(hi - lo, device=device)
    self_cols = rows + lo
    partner_cols = (self_cols + half) % m
    if negatives == "all":
        def mask_(t, value):
            t[rows, self_cols] = value
            t[rows, partner_cols] = value
            return t
        return mask_
    cols = torch.arange(m + queue_rows, device=device)[None, :]
    in_z = cols < m
    if negatives == "cross":
        same_view = (cols < half) == (self_cols[:, None] < half)
        excluded = in_z & (same_view | (cols == partner_cols[:, None]))
    else:
        excluded = in_z.expand(hi - lo, -1)

    def mask_(t, value):
        return t.masked_fill_(excluded, value)
    return mask_


def _group_mask(lo: int, hi: int, groups: positives.Groups, log_eps_positives: float | None):
    """`mask_(t, value)` of the chunk [lo, hi) with group-defined sets over [Z; Q]: J_i = the
    other groups' columns (fastalpha.positives.Groups).

    With `log_eps_positives` (infonce with ε > 0, whose positives are in its denominator) the
    pair loop also runs over P_i: the positives keep their logit plus log ε and every other
    column outside J_i is set to `value`.
    """
    positive, negative = groups.masks(lo, hi)
    if log_eps_positives is None:
        def mask_(t, value):
            return t.masked_fill_(~negative, value)
        return mask_
    outside = ~(positive | negative)

    def mask_with_positives(t, value):
        t.add_(positive, alpha=log_eps_positives)
        return t.masked_fill_(outside, value)
    return mask_with_positives


def loss_rows_and_grad(z: torch.Tensor, params: LossSpec, row_lo: int, row_hi: int, row_weight: torch.Tensor | None = None,
                       need_grad: bool = True, chunk_rows: int | None = None,
                       queue: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Losses of the anchors [row_lo, row_hi) and ∂(Σ_i w_i loss_i)/∂[Z; queue] ((M + K) × D, or (0, D)).

    `z` (and `queue`) are already normalised; `row_weight` (R,) defaults to ones. The queue's
    K rows are extra columns: O(R·(M + K) + (M + K)·D) memory. With `groups`
    (fastalpha.positives.Groups, or the M rows' group ids) positives and negatives come from
    the groups, over the batch and the queue.
    """
    if groups is not None:
        return _grouped_loss_rows_and_grad(z, params, row_lo, row_hi, row_weight, need_grad, chunk_rows,
                                           positives.groups_of(groups, 0 if queue is None else queue.shape[0]), queue)
    z = z.detach()
    m, d = z.shape
    half = m // 2
    cols = z if queue is None else torch.cat([z, queue.detach().to(z.dtype)], 0)
    c = cols.shape[0]
    count = negative_count(m // 2, c - m, params.negatives)
    stat = torch.promote_types(z.dtype, torch.float32)
    chunk = default_chunk_rows(c, z.device.type) if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    half_sq = torch.full((c,), 0.5, dtype=stat, device=z.device) if params.unit_rows else cols.to(stat).square().sum(1).mul_(0.5)
    loss_rows = torch.empty(row_hi - row_lo, dtype=stat, device=z.device)
    if need_grad:
        col_acc = torch.zeros(c, d, dtype=stat, device=z.device)   # Σ_i ω_ij z_i  (ωᵀZ)
        col_sum = torch.zeros(c, dtype=stat, device=z.device)      # Σ_i ω_ij
        grad = torch.zeros(c, d, dtype=stat, device=z.device)
    for lo in range(row_lo, row_hi, chunk):
        hi = min(lo + chunk, row_hi)
        rows = torch.arange(hi - lo, device=z.device)
        partner_cols = (rows + lo + half) % m
        z_rows = z[lo:hi]
        d2 = (z_rows @ cols.T).to(stat).neg_().add_(half_sq).add_(half_sq[lo:hi, None]).clamp_min_(0)
        d2_pos = d2[rows, partner_cols]
        mask_ = _chunk_mask(lo, hi, m, c - m, params.negatives, z.device)
        loss, a_sum, omega = _chunk_weights(d2, d2_pos, mask_, count, params)
        del d2
        loss_rows[lo - row_lo:hi - row_lo] = loss
        if not need_grad:
            continue
        if row_weight is not None:
            w = row_weight[lo - row_lo:hi - row_lo].to(stat)
            omega.mul_(w[:, None])
            a_sum = a_sum * w
        omega_in = omega.to(z.dtype)
        z_rows_stat = z_rows.to(stat)
        z_partners = z[partner_cols].to(stat)
        row_side = (omega_in @ cols).to(stat).sub_(a_sum[:, None] * z_partners)
        partner_side = -a_sum[:, None] * z_rows_stat
        if not params.unit_rows:
            row_side.add_((a_sum - omega.sum(1))[:, None] * z_rows_stat)
            partner_side.add_(a_sum[:, None] * z_partners)
        grad[lo:hi] += row_side
        grad.index_add_(0, partner_cols, partner_side)
        col_acc += (omega_in.T @ z_rows).to(stat)
        if not params.unit_rows:
            col_sum += omega.sum(0)
    if not need_grad:
        return loss_rows, z.new_empty((0, d))
    grad.add_(col_acc)
    if not params.unit_rows:
        grad.sub_(col_sum[:, None] * cols.to(stat))
    grad.mul_(params.grad_scale)
    return loss_rows, grad.to(z.dtype)


#: The fused-op contract (fastalpha.dispatch), which passes the queue and the groups as
#: keywords: loss_rows_and_grad with its default chunk size.
alpha_cl_fused = loss_rows_and_grad


def _grouped_loss_rows_and_grad(z, params: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool, chunk_rows,
                                groups: positives.Groups, queue=None):
    r"""`loss_rows_and_grad` with group-defined positives over the columns [Z; Q]
    (docs/design.md, "Positive sets").

    The pair loop of each chunk runs over J_i (and P_i with log ε for infonce, ε > 0) with
    d2_i = d̄2_i, exactly as the SimCLR loop runs over its J_i; the positives' uniform pull,
    a_i = w_i A_i spread over P_i, is added from group sums (fastalpha.positives). Anchors
    without a loss term (Groups.has_loss) have loss 0 and weight 0. The gradient covers the
    queue's rows too ((M + K) × D).
    """
    z = z.detach()
    m, d = z.shape
    cols = z if queue is None else torch.cat([z, queue.detach().to(z.dtype)], 0)
    c = cols.shape[0]
    stat = torch.promote_types(z.dtype, torch.float32)
    chunk = default_chunk_rows(c, z.device.type) if chunk_rows is None else int(chunk_rows)
    if chunk < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    infonce_positives = params.rule == "infonce" and params.eps > 0
    loop_params = params.with_(eps=0.0) if infonce_positives else params
    log_eps = math.log(params.eps) if infonce_positives else None
    d2_mean = positives.mean_positive_distance(cols, groups, row_lo, row_hi, params.unit_rows, stat)
    has_loss = groups.has_loss[row_lo:row_hi]
    weight = torch.ones(row_hi - row_lo, dtype=stat, device=z.device) if row_weight is None else row_weight.to(stat)
    half_sq = torch.full((c,), 0.5, dtype=stat, device=z.device) if params.unit_rows else cols.to(stat).square().sum(1).mul_(0.5)
    loss_rows = torch.zeros(row_hi - row_lo, dtype=stat, device=z.device)
    pull = torch.zeros(row_hi - row_lo, dtype=stat, device=z.device)
    grad = torch.zeros(c, d, dtype=stat, device=z.device) if need_grad else None
    # |J_i| ≥ 1 keeps the rules finite on anchors without negatives, which have weight 0.
    count = groups.negative_count.clamp_min(1).to(stat)
    for lo in range(row_lo, row_hi, chunk):
        hi = min(lo + chunk, row_hi)
        local = slice(lo - row_lo, hi - row_lo)
        z_rows = z[lo:hi]
        d2 = (z_rows @ cols.T).to(stat).neg_().add_(half_sq).add_(half_sq[lo:hi, None]).clamp_min_(0)
        loss, a_sum, omega = _chunk_weights(d2, d2_mean[local], _group_mask(lo, hi, groups, log_eps), count[lo:hi],
                                            loop_params)
        del d2
        loss_rows[local] = torch.where(has_loss[local], loss, torch.zeros_like(loss))
        if not need_grad:
            continue
        w, counted = weight[local], has_loss[local]
        # where, not a product: an anchor without a loss term may hold non-finite weights.
        omega = torch.where(counted[:, None], omega * w[:, None], torch.zeros_like(omega))
        pull[local] = torch.where(counted, a_sum * w, torch.zeros_like(w))
        omega_in = omega.to(z.dtype)
        row_side = (omega_in @ cols).to(stat)
        if not params.unit_rows:
            row_side.sub_(omega.sum(1)[:, None] * z_rows.to(stat))
            grad.sub_(omega.sum(0)[:, None] * cols.to(stat))
        grad[lo:hi] += row_side
        grad += (omega_in.T @ z_rows).to(stat)
    if not need_grad:
        return loss_rows, z.new_empty((0, d))
    positives.add_positive_pull_(grad, cols, groups, pull, row_lo, params.unit_rows)
    grad.mul_(params.grad_scale)
    return loss_rows, grad.to(z.dtype)

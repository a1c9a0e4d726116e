r"""Dense eager reference of the α-CL family: the oracle every fused backend is checked against.

Everything here builds the (R × M) block of pair quantities explicitly, so it is exact in
whatever dtype it is given (tests run it in float64) and costs O(R·M) memory.

Notation (docs/design.md). Z = [z1; z2] has M = 2N rows; the partner of row i is
p(i) = (i + N) mod M and its negatives are J_i = {j : j ≠ i, j ≠ p(i)}.

    d2_ij = ||z_i − z_j||² / 2 = (n_i + n_j)/2 − z_i·z_j,   clamped at 0,
    d2_ij = 1 − z_i·z_j                  for unit rows (normalize=True: a zero row has cosine 0),
    d2_i  = d2_{i, p(i)}                                      (the positive pair),
    loss_i = Σ_{j∈J_i} α_ij (d2_i − d2_ij)                    (every rule but infonce),
    loss_i = log(ε + ξ_i),  ξ_i = Σ_{j∈J_i} e^{(d2_i − d2_ij)/τ}  (infonce).

With `detach_alpha=True` α is computed from detached distances (the paper's α-CL: the min
player's choice is a constant for the max player); with False autograd also differentiates α.
"""
from __future__ import annotations

import math

import torch

from .positives import groups_of
from .rules import LossSpec


def partner_index(m: int, device=None) -> torch.Tensor:
    """p(i) = (i + M/2) mod M for i in [0, M)."""
    return (torch.arange(m, device=device) + m // 2) % m


def negative_mask(m: int, row_lo: int = 0, row_hi: int | None = None, device=None, negatives: str = "all",
                  queue_rows: int = 0) -> torch.Tensor:
    """Boolean (R, M + K) mask of J_i for the rows i in [row_lo, row_hi).

    Columns are the M rows of Z, then the K queue rows. "all": every row of Z but i and p(i);
    "cross": the rows of the other view but p(i); "none": no row of Z. Queue rows are
    negatives of every anchor in every mode.
    """
    row_hi = m if row_hi is None else row_hi
    rows = torch.arange(row_lo, row_hi, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    half = m // 2
    if negatives == "all":
        in_z = (cols != rows) & (cols != (rows + half) % m)
    elif negatives == "cross":
        in_z = ((cols < half) != (rows < half)) & (cols != (rows + half) % m)
    elif negatives == "none":
        in_z = torch.zeros(row_hi - row_lo, m, dtype=torch.bool, device=device)
    else:
        raise ValueError(f"unknown negatives={negatives!r}")
    in_queue = torch.ones(row_hi - row_lo, queue_rows, dtype=torch.bool, device=device)
    return torch.cat([in_z, in_queue], 1)


def column_rows(z: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    """The rows every anchor is compared with: Z, then the queue (detached: it gets no gradient)."""
    return z if queue is None else torch.cat([z, queue.detach().to(z.dtype)], 0)


def squared_distances(z_rows: torch.Tensor, z: torch.Tensor, unit_rows: bool = False) -> torch.Tensor:
    """d2 = ||z_i − z_j||² / 2 for rows of `z_rows` against rows of `z`, clamped at 0.

    Uses the Gram form (n_i + n_j)/2 − z_i·z_j, which is what the fused kernels compute,
    so that reference and kernels round the same way in low precision. For unit rows
    (`unit_rows=True`, what normalize=True produces) n_i = 1 by construction: d2 = 1 − cos.
    That is also the peers' convention for a zero row, whose normalised form is 0 (cosine 0).
    """
    if unit_rows:
        return (1 - z_rows @ z.T).clamp_min(0)
    n_rows = (z_rows * z_rows).sum(1)
    n_cols = (z * z).sum(1)
    d2 = (n_rows[:, None] + n_cols[None, :]) / 2 - z_rows @ z.T
    return d2.clamp_min(0)


def sparsemax_threshold(d2: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact μ_i with Σ_j [(μ_i − d2_ij)/τ]_+ = 1 over the masked entries (no gradient).

    Sorted ascending, s_1 ≤ s_2 ≤ …, the support size k_i is the largest k with
    τ + Σ_{l≤k} s_l > k·s_k (the valid k form a prefix), and μ_i = (τ + Σ_{l≤k_i} s_l) / k_i.
    Maximality of k_i gives s_{k_i+1} ≥ μ_i, so the support is exactly {j : d2_ij < μ_i}.
    """
    with torch.no_grad():
        s = torch.where(mask, d2, torch.full_like(d2, math.inf)).sort(dim=1).values
        finite = torch.isfinite(s)
        csum = torch.where(finite, s, torch.zeros_like(s)).cumsum(1)
        k = torch.arange(1, d2.shape[1] + 1, device=d2.device, dtype=d2.dtype)
        k_star = ((temperature + csum > k * s) & finite).sum(1)
        picked = csum.gather(1, (k_star - 1)[:, None])[:, 0]
        return (temperature + picked) / k_star.to(d2.dtype)


def alpha_from_distances(d2: torch.Tensor, d2_pos: torch.Tensor, mask: torch.Tensor, params: LossSpec) -> torch.Tensor:
    """α (R × M) over J_i for a block of rows; exactly 0 off the mask.

    `d2` is the (R, M) block of squared distances, `d2_pos` the (R,) positive distances and
    `mask` the J_i mask of the same rows. Differentiable in d2 (and d2_pos for infonce).
    """
    count = mask.sum(1, keepdim=True).to(d2.dtype)          # |J_i|
    rule, tau = params.rule, params.temperature
    zero = torch.zeros_like(d2)
    if rule == "quadratic":
        return torch.where(mask, 1.0 / count, zero)
    if rule == "square":
        support = mask & (d2.detach() < sparsemax_threshold(d2, mask, tau)[:, None])
        # μ rebuilt from the support, μ = (τ + Σ_S d2) / |S|, so autograd sees the sparsemax Jacobian.
        size = support.sum(1).to(d2.dtype)
        mu = (tau + torch.where(support, d2, zero).sum(1)) / size
        return torch.where(support, (mu[:, None] - d2) / tau, zero)
    if rule == "infonce":
        logits = torch.where(mask, (d2_pos[:, None] - d2) / tau, torch.full_like(d2, -math.inf))
        log_norm = torch.logaddexp(torch.logsumexp(logits, 1), _log_eps(params.eps, d2))
        return torch.exp(logits - log_norm[:, None])
    # Log-weight rules: α = e^{t} / (Σ e^{t} + ε(M−2)), evaluated with the row max for range.
    safe_d2 = torch.where(mask, d2, torch.ones_like(d2))
    t = torch.where(mask, params.log_weight(safe_d2), torch.full_like(d2, -math.inf))
    row_max = t.amax(1, keepdim=True)
    e = torch.exp(t - row_max)
    denom = e.sum(1, keepdim=True)
    if params.eps > 0:
        denom = denom + params.eps * count * torch.exp(-row_max)
    return e / denom


def _log_eps(eps: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(math.log(eps) if eps > 0 else -math.inf, dtype=like.dtype, device=like.device)


def loss_rows(z: torch.Tensor, params: LossSpec, row_lo: int = 0, row_hi: int | None = None,
              queue: torch.Tensor | None = None) -> torch.Tensor:
    """Per-anchor losses loss_i for the rows i in [row_lo, row_hi) of Z (Z and queue already normalised)."""
    m = z.shape[0]
    row_hi = m if row_hi is None else row_hi
    mask = negative_mask(m, row_lo, row_hi, z.device, params.negatives, 0 if queue is None else queue.shape[0])
    d2 = squared_distances(z[row_lo:row_hi], column_rows(z, queue), params.unit_rows)
    partners = partner_index(m, device=z.device)[row_lo:row_hi]
    d2_pos = d2.gather(1, partners[:, None])[:, 0]
    if params.rule == "infonce":
        # log(ε + ξ_i); its gradient is the α-form of Theorem 1 whatever detach_alpha says.
        logits = torch.where(mask, (d2_pos[:, None] - d2) / params.temperature, torch.full_like(d2, -math.inf))
        return torch.logaddexp(torch.logsumexp(logits, 1), _log_eps(params.eps, d2))
    if params.detach_alpha:
        alpha = alpha_from_distances(d2.detach(), d2_pos.detach(), mask, params)
    else:
        alpha = alpha_from_distances(d2, d2_pos, mask, params)
    return (alpha * (d2_pos[:, None] - d2)).sum(1)


def stack_views(z1: torch.Tensor, z2: torch.Tensor, normalize: bool) -> torch.Tensor:
    z = torch.cat([z1, z2], 0)
    return torch.nn.functional.normalize(z, dim=1) if normalize else z


def reduce_rows(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def prepare_queue(queue: torch.Tensor | None, normalize: bool) -> torch.Tensor | None:
    """The queue as the anchors see it: detached, and L2-normalised like Z when normalize=True."""
    if queue is None:
        return None
    queue = queue.detach()
    return torch.nn.functional.normalize(queue, dim=1) if normalize else queue


def alpha_cl_loss(z1, z2, params: LossSpec, reduction="mean", queue=None):
    """The loss by dense autograd (inputs assumed validated; see fastalpha.alpha_cl_loss)."""
    z = stack_views(z1, z2, params.unit_rows)
    return reduce_rows(loss_rows(z, params, queue=prepare_queue(queue, params.unit_rows)), reduction)


def pair_weights(z1, z2, params: LossSpec, queue=None) -> torch.Tensor:
    """Dense (M × (M + K)) α with zeros off J_i, detached (for inspection at small M)."""
    with torch.no_grad():
        z = stack_views(z1, z2, params.unit_rows)
        queue = prepare_queue(queue, params.unit_rows)
        m = z.shape[0]
        mask = negative_mask(m, 0, m, z.device, params.negatives, 0 if queue is None else queue.shape[0])
        d2 = squared_distances(z, column_rows(z, queue), params.unit_rows)
        d2_pos = d2.gather(1, partner_index(m, device=z.device)[:, None])[:, 0]
        return alpha_from_distances(d2, d2_pos, mask, params)


def _masked_alpha(alpha: torch.Tensor, m: int) -> torch.Tensor:
    if alpha.shape != (m, m):
        raise ValueError(f"alpha must have shape ({m}, {m}) for M = {m} stacked rows, got {tuple(alpha.shape)}")
    return alpha * negative_mask(m, device=alpha.device)


def energy(z1: torch.Tensor, z2: torch.Tensor, alpha: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """E_α(Z) = Σ_i Σ_{j∈J_i} α_ij d2_ij − Σ_i A_i d2_i, A_i = Σ_j α_ij (Theorem 1).

    Differentiable in z (and α). Entries of α outside J_i are ignored.
    """
    z = stack_views(z1, z2, normalize)
    m = z.shape[0]
    alpha = _masked_alpha(alpha, m)
    d2 = squared_distances(z, z, normalize)
    d2_pos = d2.gather(1, partner_index(m, device=z.device)[:, None])[:, 0]
    return (alpha * d2).sum() - (alpha.sum(1) * d2_pos).sum()


def contrastive_covariance(a1, a2, alpha, b1=None, b2=None) -> torch.Tensor:
    r"""C_α[a, b] = Σ_i Σ_{j∈J_i} α_ij (a_i−a_j)(b_i−b_j)ᵀ − Σ_i A_i (a_i−a_{p(i)})(b_i−b_{p(i)})ᵀ.

    a = [a1; a2] is (M × d_a); b defaults to a. Computed without the M×M×d tensor: the pair
    term is aᵀ (diag(A + C) − α − αᵀ) b with C_j = Σ_i α_ij, i.e. a graph Laplacian of
    W = α + αᵀ. E_α = ½ tr C_α[z, z].
    """
    a = torch.cat([a1, a2], 0)
    b = a if b1 is None else torch.cat([b1, b2], 0)
    m = a.shape[0]
    alpha = _masked_alpha(alpha, m)
    row_sum, col_sum = alpha.sum(1), alpha.sum(0)
    pair = a.T @ ((row_sum + col_sum)[:, None] * b) - a.T @ (alpha @ b) - a.T @ (alpha.T @ b)
    partners = partner_index(m, device=a.device)
    da, db = a - a[partners], b - b[partners]
    return pair - da.T @ (row_sum[:, None] * db)


def pair_term_weights(alpha: torch.Tensor, d2: torch.Tensor, d2_pos: torch.Tensor, mask: torch.Tensor,
                      params: LossSpec) -> torch.Tensor:
    r"""ω = −∂loss_i/∂d2_ij over J_i: α, or β when α is differentiated (`params.uses_beta`).

      * log-weight rules: β_ij = α_ij (1 − t'_ij (v_ij − c_i)), v_ij = d2_i − d2_ij, c_i = Σ_k α_ik v_ik;
      * square: β_ij = 2 α_ij − 1/k_i on the support (k_i its size), 0 elsewhere;
      * quadratic and infonce: β = α (α is constant / Theorem 1 is exact).
    """
    if not params.uses_beta:
        return alpha
    if params.is_log_weight:
        v = torch.where(mask, d2_pos[:, None] - d2, torch.zeros_like(d2))
        c = (alpha * v).sum(1, keepdim=True)
        slope = params.log_weight_slope(torch.where(mask, d2, torch.ones_like(d2)))
        return alpha * (1 - slope * (v - c))
    support = alpha > 0
    k = support.sum(1, keepdim=True).to(alpha.dtype)
    return torch.where(support, 2 * alpha - 1 / k, torch.zeros_like(alpha))


def closed_form_gradient(z: torch.Tensor, params: LossSpec, row_weight: torch.Tensor | None = None,
                         row_lo: int = 0, row_hi: int | None = None,
                         queue: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-row losses and ∂(Σ_i w_i loss_i)/∂Z by the formula the fused kernels implement.

    For the anchors i in [row_lo, row_hi) (all rows by default) and weights w (default 1):

        ∂/∂z_i     +=  w_i A_i (z_i − z_{p(i)}) − Σ_j ω_ij (z_i − z_j)      (row side)
        ∂/∂z_{p(i)} +=  w_i A_i (z_{p(i)} − z_i)                            (positive partner)
        ∂/∂z_j     += −Σ_i ω_ij (z_j − z_i)                                 (column side)

    with A_i = Σ_j α_ij and ω = w_i α_ij; over all rows this is
    G_k = (A_k + A_{p(k)})(z_k − z_{p(k)}) − Σ_j W_kj (z_k − z_j), W = ω + ωᵀ, i.e. it needs
    only A, the row and column sums of ω, ωZ and ωᵀZ. For `detach_alpha=False`, α in the
    pair term is replaced by β:
      * log-weight rules: β_ij = α_ij (1 − t'_ij (v_ij − c_i)), v_ij = d2_i − d2_ij, c_i = Σ_k α_ik v_ik;
      * square: β_ij = 2 α_ij − 1/k_i on the support (k_i its size), 0 elsewhere;
      * quadratic and infonce: β = α (α is constant / Theorem 1 is exact).
    For infonce every term is multiplied by 1/τ (and A_i = ξ_i / (ε + ξ_i)).
    For unit rows d2_ij = 1 − z_i·z_j, so ∂d2_ij/∂z_i = −z_j: the terms in z_i itself
    (A_i z_i, Σ_j ω_ij z_i and Σ_i ω_ij z_j) drop out; only the cross terms remain.
    With a queue the columns are [Z; queue] and the gradient has M + K rows: the queue's rows
    (which the API discards) are what a learnable temperature's gradient needs.
    Dense: O(R·M) memory; the eager backend of the fused op and the tests' specification.
    """
    m = z.shape[0]
    row_hi = m if row_hi is None else row_hi
    cols = column_rows(z, queue)
    mask = negative_mask(m, row_lo, row_hi, z.device, params.negatives, cols.shape[0] - m)
    partners = partner_index(m, device=z.device)[row_lo:row_hi]
    z_rows = z[row_lo:row_hi]
    d2 = squared_distances(z_rows, cols, params.unit_rows)
    d2_pos = d2.gather(1, partners[:, None])[:, 0]
    alpha = alpha_from_distances(d2, d2_pos, mask, params)
    if params.rule == "infonce":
        logits = torch.where(mask, (d2_pos[:, None] - d2) / params.temperature, torch.full_like(d2, -math.inf))
        rows = torch.logaddexp(torch.logsumexp(logits, 1), _log_eps(params.eps, d2))
    else:
        rows = (alpha * (d2_pos[:, None] - d2)).sum(1)
    omega = pair_term_weights(alpha, d2, d2_pos, mask, params)
    w = torch.ones(row_hi - row_lo, dtype=z.dtype, device=z.device) if row_weight is None else row_weight.to(z.dtype)
    wa = (w * alpha.sum(1))[:, None]
    omega = w[:, None] * omega
    grad = omega.T @ z_rows
    grad[row_lo:row_hi] += omega @ cols - wa * z[partners]
    grad.index_add_(0, partners, -wa * z_rows)
    if not params.unit_rows:
        grad -= omega.sum(0)[:, None] * cols
        grad[row_lo:row_hi] += (wa - omega.sum(1)[:, None]) * z_rows
        grad.index_add_(0, partners, wa * z[partners])
    return rows, grad * params.grad_scale


# Positive sets from groups (labels, or more than two views, with or without a queue):
# docs/design.md, "Positive sets". The columns are [Z; Q]; fastalpha.positives.Groups says which
# column is a positive (P_i) or a negative (J_i) of each anchor; d̄2_i = mean_{p∈P_i} d2_ip; an
# anchor without a positive or without a negative has loss 0 and no gradient term.


def _grouped_block(z: torch.Tensor, queue, params: LossSpec, groups, row_lo: int, row_hi: int):
    """The anchors of [row_lo, row_hi) that have a positive and a negative, and their pair block
    against the columns [Z; Q]: (index within the range, d2, P mask, J mask, d̄2)."""
    positives, negatives = groups.masks(row_lo, row_hi)
    active = torch.nonzero(positives.any(1) & negatives.any(1))[:, 0]
    positives, negatives = positives[active], negatives[active]
    d2 = squared_distances(z[row_lo + active], column_rows(z, queue), params.unit_rows)
    d2_pos = torch.where(positives, d2, torch.zeros_like(d2)).sum(1) / positives.sum(1).to(d2.dtype)
    return active, d2, positives, negatives, d2_pos


def _grouped_infonce_logits(d2, d2_pos, positives, negatives, params: LossSpec) -> torch.Tensor:
    """(d̄2_i − d2_ij)/τ over J_i, plus log ε over P_i (ε > 0): loss_i = logsumexp_j of these."""
    v = (d2_pos[:, None] - d2) / params.temperature
    logits = torch.where(negatives, v, torch.full_like(v, -math.inf))
    if params.eps > 0:
        logits = torch.where(positives, v + math.log(params.eps), logits)
    return logits


def grouped_loss_rows(z: torch.Tensor, params: LossSpec, groups, row_lo: int = 0, row_hi: int | None = None,
                      queue: torch.Tensor | None = None) -> torch.Tensor:
    r"""Per-anchor losses with positives and negatives from groups (Z and Q already normalised).

        loss_i = Σ_{j∈J_i} α_ij (d̄2_i − d2_ij)                                   (every rule but infonce)
        loss_i = log(ε Σ_{p∈P_i} e^{(d̄2_i − d2_ip)/τ} + Σ_{j∈J_i} e^{(d̄2_i − d2_ij)/τ})   (infonce)

    over the columns [Z; Q], with α from the rule over J_i (|J_i| per anchor), and 0 for an
    anchor without a positive or without a negative. Differentiable in Z (the queue is a
    constant; the oracle's gradient is autograd of this).
    """
    m = z.shape[0]
    row_hi = m if row_hi is None else row_hi
    groups = groups_of(groups, 0 if queue is None else queue.shape[0])
    active, d2, positives, negatives, d2_pos = _grouped_block(z, queue, params, groups, row_lo, row_hi)
    if params.rule == "infonce":
        values = torch.logsumexp(_grouped_infonce_logits(d2, d2_pos, positives, negatives, params), 1)
    else:
        source = (d2.detach(), d2_pos.detach()) if params.detach_alpha else (d2, d2_pos)
        alpha = alpha_from_distances(*source, negatives, params)
        values = (alpha * (d2_pos[:, None] - d2)).sum(1)
    # Zero rows attached to the graph of z, so that autograd sees every anchor (and a zero gradient).
    out = z[row_lo:row_hi, 0] * 0
    return out.index_put((active,), values, accumulate=True)


def grouped_closed_form_gradient(z: torch.Tensor, params: LossSpec, groups, row_weight: torch.Tensor | None = None,
                                 row_lo: int = 0, row_hi: int | None = None,
                                 queue: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-anchor losses and ∂(Σ_i w_i loss_i)/∂[Z; Q] with group-defined positives, in closed form.

    With c_ij = w_i ∂loss_i/∂d2_ij for every pair of an anchor in range and a column j,

        G_i += Σ_j c_ij ∂d2_ij/∂z_i,   G_j += Σ_i c_ij ∂d2_ij/∂c_j,

    ∂d2_ij/∂z_i = z_i − c_j (−c_j for unit rows). The coefficients:
      * every rule but infonce: c_ij = −w_i ω_ij on J_i (ω = α, or β with detach_alpha=False)
        and c_ip = w_i A_i / |P_i| on P_i (A_i = Σ_j α_ij, the weight of d̄2_i);
      * infonce: c_ij = −w_i α_ij / τ on J_i and c_ip = w_i (1/|P_i| − π_ip) / τ on P_i, where
        α_ij = e^{(d̄2_i − d2_ij)/τ} / (εη_i + ξ_i) and π_ip = ε e^{(d̄2_i − d2_ip)/τ} / (εη_i + ξ_i).
    The queue's rows get their column side too (as if Q were differentiable: the temperature's
    gradient uses it). Dense, O(R·(M + K)): the eager backend with groups, checked against
    autograd in the tests.
    """
    m = z.shape[0]
    row_hi = m if row_hi is None else row_hi
    groups = groups_of(groups, 0 if queue is None else queue.shape[0])
    cols = column_rows(z, queue)
    active, d2, positives, negatives, d2_pos = _grouped_block(z, queue, params, groups, row_lo, row_hi)
    count = positives.sum(1, keepdim=True).to(z.dtype)
    if params.rule == "infonce":
        logits = _grouped_infonce_logits(d2, d2_pos, positives, negatives, params)
        values = torch.logsumexp(logits, 1)
        pushed = torch.exp(logits - values[:, None])
        coef = (torch.where(positives, 1 / count, torch.zeros_like(d2)) - pushed) / params.temperature
    else:
        alpha = alpha_from_distances(d2, d2_pos, negatives, params)
        values = (alpha * (d2_pos[:, None] - d2)).sum(1)
        pull = alpha.sum(1, keepdim=True) / count
        coef = torch.where(positives, pull, torch.zeros_like(d2)) - pair_term_weights(alpha, d2, d2_pos, negatives, params)
    if row_weight is not None:
        coef = coef * row_weight.to(z.dtype)[active][:, None]
    rows = torch.zeros(row_hi - row_lo, dtype=z.dtype, device=z.device).index_put_((active,), values)
    z_rows = z[row_lo + active]
    row_side = -(coef @ cols)
    column_side = -(coef.T @ z_rows)
    if not params.unit_rows:
        row_side += coef.sum(1, keepdim=True) * z_rows
        column_side += coef.sum(0)[:, None] * cols
    grad = column_side.index_add_(0, row_lo + active, row_side)
    return rows, grad


def grouped_alpha_cl_loss(views: list[torch.Tensor], groups, params: LossSpec, reduction="mean", queue=None):
    """The loss of V stacked views with group-defined positives (and a prepared queue), by
    dense autograd. "mean" averages over the anchors that have a positive and a negative
    (SupCon's convention); 0 if none has.
    """
    z = torch.cat(views, 0)
    if params.unit_rows:
        z = torch.nn.functional.normalize(z, dim=1)
    groups = groups_of(groups, 0 if queue is None else queue.shape[0])
    rows = grouped_loss_rows(z, params, groups, queue=queue)
    if reduction == "mean":
        positives, negatives = groups.masks()
        anchors = (positives.any(1) & negatives.any(1)).sum()
        return rows.sum() / anchors.clamp_min(1).to(rows.dtype)
    return reduce_rows(rows, reduction)

r"""Row pass: per-anchor statistics, loss and the row side of the gradient.

One program owns BLOCK_M anchor rows i (of the range [row_lo, row_hi)) and one chunk of
BLOCK_DO output features, and loops over the columns in tiles of BLOCK_N, like the forward
of flash-attention with Q = K = V = Z. The columns are the M rows of Z, then the K rows of a
queue (C = M + K, one contiguous [Z; queue] tensor); the anchors and partners are rows of Z.
With NEGATIVES = all the loop covers all C columns; the other sets skip the tiles that hold no
negative of the block's anchors (tiles._column_range: the other view and the queue for cross,
the queue for none); inside the tiles kept the mask still gives every other pair weight 0.

ONLINE (log-weight rules with α as stop-gradient, and the statistics pass of the others):
running max m_i and, rescaled by e^{m_old − m_new} at every tile,

    l_i = Σ_j e^{t_ij − m_i},   s_i = Σ_j e^{t_ij − m_i} d2_ij,   acc_i = Σ_j e^{t_ij − m_i} z_j.

At the end lse_i = log(e^{m_i} l_i + E_i) with the ε-term E_i = ε(M − 2) (direct, entropy) or
ε e^{−d2_i/τ} (infonce), kept as the shift m_i and the normaliser λ_i = lse_i − m_i =
log(l_i + E_i e^{−m_i}) (`tiles._pair_weights` says why not as lse_i), so that
α_ij = e^{(t_ij − m_i) − λ_i}, A_i = Σ_j α_ij = l_i e^{−λ_i}, and

    loss_i = A_i d2_i − Σ_j α_ij d2_ij            (every log-weight rule),
    loss_i = log(ε + ξ_i) = logaddexp(log ξ_i, log ε),  log ξ_i = m_i + d2_i/τ + log l_i   (infonce),

the latter through log1p, so that a tiny NT-Xent loss (ξ_i ≪ ε) keeps float32's relative
precision. With UNIT (unit rows) d2 = 1 − z_i·z_j and no norm is loaded.

GROUPS (group-defined positives, fastalpha.positives, over the columns [Z; Q]): the pairs are
J_i = {c : g_c ≥ 0, g_c ≠ g_i} from the anchors' ids g_i (loaded once per row block) and the
columns' ids g_c (per column tile, −1 for an ignored column: `tiles._group_pairs`); d2_i is
the mean positive distance d̄2_i (`d2_pos`, from group sums), and the ε-term of direct/entropy
is the per-anchor log(ε|J_i|) (`log_eps_term_ptr`). infonce with ε > 0 keeps its positives
P_i = {c ≠ s(i) : g_c = g_i} (s(i) the anchor's own column, `self_col_ptr`) in the loop
instead of a final ε-term: t_ic + log ε (the scalar log_eps) for them, so that
log ξ_i = m_i + d̄2_i/τ + log l_i is already log(ε η_i + ξ_i) and A_i = 1. The positive side of
the gradient is the launcher's (positives.add_positive_pull_). With GROUPS off the four
group pointers are None, i.e. constexprs and not arguments: the other calls compile to the
code they had.

FIXED (statistics already known: m_i, λ_i and c_i, or μ_i and 1/k_i for sparsemax): α (and β)
are evaluated directly per tile (`tiles._pair_weights`), no rescaling.

Outputs per row: loss_i, m_i and λ_i (ONLINE, into the statistics a FIXED pass reads), w_i A_i, w_i Σ_j β_ij and, with ACCUMULATE, the row
of w_i (βZ)_i restricted to the program's feature chunk. Nothing of size M × M is formed.
"""
import triton
import triton.language as tl

from .tiles import (SIZE_ARGUMENTS, GROUPS_INFONCE, GROUPS_OFF, NEG_ALL, WEIGHT_SPARSEMAX, _anchor_groups, _batch_rows, _column_groups,
                    _column_range, _distances, _gram, _group_pairs, _join, _log_add_exp, _log_weight, _mma, _negatives,
                    _pair_weights, _parameters, _row_norms, _streamed)

EPS_NONE = tl.constexpr(0)
EPS_CONSTANT = tl.constexpr(1)
EPS_INFONCE = tl.constexpr(2)


# The sizes are not specialized (tiles.SIZE_ARGUMENTS says why).
@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def row_pass_kernel(
    z_ptr, norm_ptr, d2_pos_ptr, stat_a_ptr, log_norm_ptr, stat_b_ptr, weight_ptr,
    loss_ptr, row_a_ptr, row_sum_ptr, row_acc_ptr,
    stride_z, stride_acc, C, D, half, row_lo, row_hi,
    m_bucket,  # unused here: the coarse size class of M in the autotuning key (launch.py)
    tau_hi, tau_lo, k_hi, k_lo, inv_gamma_hi, inv_gamma_lo, log_eps_hi, log_eps_lo,
    # GROUPS only (else None): group ids of the M anchors and of the C columns (−1: ignored), the
    # anchors' own columns, and (direct/entropy with ε > 0) each anchor's log(ε|J_i|).
    row_group_ptr, col_group_ptr, self_col_ptr, log_eps_term_ptr,
    WEIGHT: tl.constexpr, POWER: tl.constexpr, EPS: tl.constexpr, LOG_LOSS: tl.constexpr,
    ONLINE: tl.constexpr, BETA: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, UNIT: tl.constexpr,
    NEGATIVES: tl.constexpr, QUEUE: tl.constexpr, GROUPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
):
    M = _batch_rows(C, half, QUEUE)
    pid_d = tl.program_id(1)
    rows = row_lo + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    local = rows - row_lo
    feats = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    feat_ok = feats < D

    tau, k, inv_gamma = _parameters(tau_hi, tau_lo, k_hi, k_lo, inv_gamma_hi, inv_gamma_lo, ACC)
    n_i = _row_norms(norm_ptr, rows, row_ok, UNIT, ACC)
    d2_pos = tl.load(d2_pos_ptr + local, mask=row_ok, other=0.0)
    if not ONLINE:
        stat_a = tl.load(stat_a_ptr + local, mask=row_ok, other=0.0)
        stat_b = tl.load(stat_b_ptr + local, mask=row_ok, other=0.0)
        if WEIGHT == WEIGHT_SPARSEMAX:
            log_norm = stat_a          # unused: sparsemax has no normaliser
        else:
            log_norm = tl.load(log_norm_ptr + local, mask=row_ok, other=0.0)
    if GROUPS != GROUPS_OFF:
        g_i, own_i = _anchor_groups(row_group_ptr, self_col_ptr, rows, row_ok, GROUPS)
        # infonce's positives replace its final ε-term and are shifted in the ONLINE statistics
        # only (it has no FIXED pass): by log ε, the scalar log_eps (the column pass adds the same).
        tl.static_assert(EPS != EPS_INFONCE and (ONLINE or GROUPS != GROUPS_INFONCE))
        if EPS == EPS_CONSTANT:
            log_eps_i = tl.load(log_eps_term_ptr + local, mask=row_ok, other=0.0)
        if GROUPS == GROUPS_INFONCE:
            log_eps_positive = _join(log_eps_hi, log_eps_lo, ACC)
    if SINGLE_CHUNK:
        # The whole (padded) row block stays in registers across the column loop.
        z_i = tl.load(z_ptr + rows.to(tl.int64)[:, None] * stride_z + feats[None, :],
                      mask=row_ok[:, None] & feat_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_i = tl.zeros((BLOCK_M,), ACC)          # ONLINE: Σ e^{t−m};  FIXED: Σ α
    s_i = tl.zeros((BLOCK_M,), ACC)          # ONLINE: Σ e^{t−m} d2;  FIXED: Σ α d2
    b_i = tl.zeros((BLOCK_M,), ACC)          # FIXED: Σ β
    acc = tl.zeros((BLOCK_M, BLOCK_DO), ACC)

    # Only the column tiles that can hold a negative of this block's anchors (tiles._column_range):
    # half of them for a two-tower call, the queue's for a queue-only one; every one for NEG_ALL.
    if NEGATIVES == NEG_ALL:
        j_lo = 0
        j_hi = C
    else:
        j_lo, j_hi = _column_range(row_lo + tl.program_id(0) * BLOCK_M, row_hi, half, M, C, BLOCK_M, NEGATIVES)
    for j0 in range(j_lo, j_hi, BLOCK_N):
        if NEGATIVES == NEG_ALL:
            # Written out, not through _streamed: so the SimCLR call's SASS stays what it was
            # (through the helper ptxas ordered the float64 row pass differently).
            cols = j0 + tl.arange(0, BLOCK_N)
            col_ok = cols < C
        else:
            cols, col_ok = _streamed(j0, j_hi, C, BLOCK_N, NEGATIVES)
        if SINGLE_CHUNK:
            z_j = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_z + feats[None, :],
                          mask=col_ok[:, None] & feat_ok[None, :], other=0.0)
            s = _mma(z_i, tl.trans(z_j), tl.zeros((BLOCK_M, BLOCK_N), ACC), PRECISION, UPCAST)
        else:
            s = _gram(z_ptr, stride_z, rows, row_ok, cols, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION, UPCAST, ACC)
            if ACCUMULATE:
                z_j = tl.load(z_ptr + cols.to(tl.int64)[:, None] * stride_z + feats[None, :],
                              mask=col_ok[:, None] & feat_ok[None, :], other=0.0)
        d2 = _distances(s, n_i, _row_norms(norm_ptr, cols, col_ok, UNIT, ACC), UNIT)
        if GROUPS != GROUPS_OFF:
            g_j = _column_groups(col_group_ptr, cols, col_ok)
            valid, same = _group_pairs(cols[None, :], row_ok[:, None], col_ok[None, :], g_i[:, None], own_i[:, None],
                                       g_j[None, :], GROUPS)
        else:
            valid = _negatives(rows[:, None], cols[None, :], row_ok[:, None], col_ok[None, :], half, M, NEGATIVES)

        if ONLINE:
            t = _log_weight(d2, tau, k, inv_gamma, WEIGHT, POWER)
            if GROUPS == GROUPS_INFONCE:
                t += tl.where(same, log_eps_positive, 0.0)
            t = tl.where(valid, t, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(t, 1))
            # A row with no valid entry yet keeps m = −inf; shift by 0 there to avoid inf − inf.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = tl.exp(m_i - m_use)
            p = tl.exp(t - m_use[:, None])
            l_i = l_i * rescale + tl.sum(p, 1)
            s_i = s_i * rescale + tl.sum(p * d2, 1)
            if ACCUMULATE:
                acc = _mma(p.to(z_ptr.dtype.element_ty), z_j, acc * rescale[:, None], PRECISION, UPCAST)
            m_i = m_new
        else:
            alpha, beta = _pair_weights(d2, valid, d2_pos[:, None], stat_a[:, None], log_norm[:, None], stat_b[:, None],
                                        tau, k, inv_gamma, WEIGHT, POWER, BETA)
            l_i += tl.sum(alpha, 1)
            s_i += tl.sum(alpha * d2, 1)
            b_i += tl.sum(beta, 1)
            if ACCUMULATE:
                acc = _mma(beta.to(z_ptr.dtype.element_ty), z_j, acc, PRECISION, UPCAST)

    if HAS_WEIGHT:
        w_i = tl.load(weight_ptr + local, mask=row_ok, other=0.0).to(ACC)
    else:
        w_i = tl.full((BLOCK_M,), 1.0, ACC)

    if ONLINE:
        m_use = tl.where(m_i == float("-inf"), 0.0, m_i)
        log_l = tl.log(tl.where(l_i > 0, l_i, 1.0))
        if EPS != EPS_NONE:
            if GROUPS != GROUPS_OFF:
                log_eps = log_eps_i
            else:
                log_eps = _join(log_eps_hi, log_eps_lo, ACC)
        # m_i + d2_i/τ = (d2_i − min_j d2_ij)/τ: the infonce logit gap, formed once.
        gap = m_use + d2_pos / tau
        # λ_i = lse_i − m_i, never through lse_i itself (its rounding is an ulp of |m_i|).
        if EPS == EPS_NONE:
            log_norm = log_l
        elif EPS == EPS_INFONCE:
            log_norm = _log_add_exp(log_l, log_eps - gap)
        else:
            log_norm = _log_add_exp(log_l, log_eps - m_use)
        to_alpha = tl.exp(-log_norm)            # e^{t−m} · to_alpha = α
        a_i = l_i * to_alpha
        if LOG_LOSS:
            # loss_i = log(ε + ξ_i) from log ξ_i = (m_i + d2_i/τ) + log l_i, where m_i + d2_i/τ =
            # (d2_i − min_j d2_ij)/τ is O(1): a tiny loss (ξ_i ≪ ε) keeps its relative precision
            # through log1p, where lse_i + d2_i/τ would cancel two O(1/τ) numbers.
            log_xi = gap + log_l
            if EPS == EPS_NONE:
                loss = log_xi
            else:
                loss = _log_add_exp(log_xi, log_eps)
        else:
            loss = a_i * d2_pos - s_i * to_alpha
        beta_sum = a_i
        acc_scale = w_i * to_alpha
    else:
        a_i = l_i
        loss = a_i * d2_pos - s_i
        beta_sum = b_i
        acc_scale = w_i

    if pid_d == 0:
        tl.store(loss_ptr + local, loss, mask=row_ok)
        tl.store(row_a_ptr + local, w_i * a_i, mask=row_ok)
        tl.store(row_sum_ptr + local, w_i * beta_sum, mask=row_ok)
        if ONLINE:
            tl.store(stat_a_ptr + local, m_use, mask=row_ok)
            tl.store(log_norm_ptr + local, log_norm, mask=row_ok)
    if ACCUMULATE:
        tl.store(row_acc_ptr + local.to(tl.int64)[:, None] * stride_acc + feats[None, :],
                 acc * acc_scale[:, None], mask=row_ok[:, None] & feat_ok[None, :])

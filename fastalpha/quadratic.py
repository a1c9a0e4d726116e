r"""`quadratic` in closed form: α_ij = 1/(M − 2) is constant, so no pair loop is needed.

With s = Σ_j z_j, n_j = ||z_j||², Σn = Σ_j n_j and p = p(i), the sums over the negatives
J_i = all rows but i and p are totals minus two terms:

    Σ_{j∈J_i} d2_ij = ((M − 2) n_i + Σn − n_i − n_p)/2 − z_i·(s − z_i − z_p),
    loss_i = d2_i − Σ_{j∈J_i} d2_ij / (M − 2),                        (A_i = 1)

and, with row weights w (zero outside [row_lo, row_hi)), W = Σ w and T = Σ_i w_i z_i,

    row side     ∂/∂z_i      += w_i [(z_i − z_p) − z_i + (s − z_i − z_p)/(M − 2)]
    partner      ∂/∂z_p      −= w_i (z_i − z_p)
    column side  ∂/∂z_j      += [T − w_j z_j − w_{p(j)} z_{p(j)} − (W − w_j − w_{p(j)}) z_j] / (M − 2).

For unit rows (normalize=True) d2_ij = 1 − z_i·z_j (n_i = 1 by construction) and
∂d2_ij/∂z_i = −z_j, so the partner term is −w_i z_i and the column side loses its
(W − w_j − w_{p(j)}) z_j term; the row side is the same.

Other negative sets (`negatives=`, a queue of K rows appended as columns M..M+K−1) change
only which totals are subtracted: with |J_i| = c and S_i = Σ_{j∈J_i} z_j the row side is
w_i (S_i/c − z_p) and the loss d2_i − (c n_i + Σ_{J_i} n_j)/(2c) + z_i·S_i/c, where S_i is
s − z_i − z_p ("all"), the other view's total minus z_p ("cross"), or nothing ("none"), plus
the queue's total; the column side of column j sums w_i z_i over the anchors i with j ∈ J_i
(for a queue row: every anchor). If c = 0 every loss is an empty sum: 0, zero gradient.

Everything is O((M + K)·D), computed in float32 (float64 for float64 inputs). Unlike the pair
kernels, the distances are not clamped at 0 one by one; they differ from the clamped ones only
for rounding-level negative distances (duplicated rows).
"""
from __future__ import annotations

import torch


def quadratic_loss_and_grad(z_acc: torch.Tensor, row_lo: int, row_hi: int, weight: torch.Tensor | None, need_grad: bool,
                            unit_rows: bool = False, m: int | None = None, negatives: str = "all"):
    """(loss_rows, grad) in the dtype of `z_acc` (already float32/float64, contiguous).

    `z_acc` holds the C columns [Z; queue]; its first `m` rows (default: all) are Z. grad has C rows.
    """
    c, d = z_acc.shape
    m = c if m is None else m
    half = m // 2
    count = {"all": m - 2, "cross": half - 1, "none": 0}[negatives] + c - m
    index = torch.arange(row_lo, row_hi, device=z_acc.device)
    partners = (index + half) % m
    z = z_acc[:m]
    z_rows, z_partners = z[row_lo:row_hi], z[partners]
    norms = torch.ones_like(z_acc[:, 0]) if unit_rows else (z_acc * z_acc).sum(1)
    n_z = norms[:m]
    n_rows, n_partners = n_z[row_lo:row_hi], n_z[partners]
    d2_pos = ((n_rows + n_partners) / 2 - (z_rows * z_partners).sum(1)).clamp_min(0)
    if count == 0:
        return z_acc.new_zeros((row_hi - row_lo,)), (torch.zeros_like(z_acc) if need_grad else z_acc.new_empty((0, d)))
    # S_i = Σ_{j∈J_i} z_j and Σ_{j∈J_i} n_j.
    if negatives == "all":
        others = z.sum(0) - z_rows - z_partners
        other_norms = n_z.sum() - n_rows - n_partners
    elif negatives == "cross":
        other_view = (index < half).long()            # view 0 anchors see view 1, and back
        view_totals = torch.stack([z[:half].sum(0), z[half:].sum(0)])
        view_norms = torch.stack([n_z[:half].sum(), n_z[half:].sum()])
        others = view_totals[other_view] - z_partners
        other_norms = view_norms[other_view] - n_partners
    else:
        others = torch.zeros_like(z_rows)
        other_norms = torch.zeros_like(n_rows)
    others = others + z_acc[m:].sum(0)
    other_norms = other_norms + norms[m:].sum()
    negatives_d2 = (count * n_rows + other_norms) / 2 - (z_rows * others).sum(1)
    loss = d2_pos - negatives_d2 / count
    if not need_grad:
        return loss, z_acc.new_empty((0, d))

    w = torch.ones_like(loss) if weight is None else weight.to(z_acc.dtype)
    w_full = torch.zeros(m, dtype=z_acc.dtype, device=z_acc.device)
    w_full[row_lo:row_hi] = w
    w_partner = w_full.roll(-half)                 # w_full[p(j)] for every j
    wz = w_full[:, None] * z
    # Column j: Σ w_i z_i and Σ w_i over the anchors i with j ∈ J_i.
    column = torch.zeros_like(z_acc)
    column_w = torch.zeros_like(norms)
    if negatives == "all":
        column[:m] = wz.sum(0) - wz - w_partner[:, None] * z.roll(-half, 0)
        column_w[:m] = w.sum() - w_full - w_partner
    elif negatives == "cross":
        col_other = (torch.arange(m, device=z_acc.device) < half).long()
        view_wz = torch.stack([wz[:half].sum(0), wz[half:].sum(0)])
        view_w = torch.stack([w_full[:half].sum(), w_full[half:].sum()])
        column[:m] = view_wz[col_other] - w_partner[:, None] * z.roll(-half, 0)
        column_w[:m] = view_w[col_other] - w_partner
    column[m:] = wz.sum(0)
    column_w[m:] = w.sum()
    if not unit_rows:
        column -= column_w[:, None] * z_acc
    grad = column / count
    grad[row_lo:row_hi] += w[:, None] * (others / count - z_partners)
    grad.index_add_(0, partners, -w[:, None] * (z_rows if unit_rows else z_rows - z_partners))
    return loss, grad


def grouped_quadratic_loss_and_grad(cols: torch.Tensor, groups, d2_pos: torch.Tensor, row_lo: int, row_hi: int,
                                    weight: torch.Tensor | None, need_grad: bool, unit_rows: bool = False):
    r"""`quadratic` with group-defined sets over the columns [Z; Q] (fastalpha.positives.Groups):
    α_ic = 1/c_i on J_i = {c : g_c ≥ 0, g_c ≠ g_i}, c_i = |J_i|.

    `cols` holds the C = M + K columns (the anchors are its first M rows), in the accumulation
    dtype. With S_g and N_g the sums of z and of n over the columns of group g, and s, Σn their
    totals over the columns that are not ignored (g_c ≥ 0), the negatives' sums are those
    totals minus the anchor's group:

        Σ_{c∈J_i} z_c = s − S_{g_i},      Σ_{c∈J_i} n_c = Σn − N_{g_i},
        loss_i = d̄2_i − [(c_i n_i + Σ_{c∈J_i} n_c)/2 − z_i·Σ_{c∈J_i} z_c] / c_i,   (A_i = 1)

    and, with v_i = w_i / c_i over the anchors (0 elsewhere), T = Σ_i v_i z_i, V = Σ_i v_i and
    T_g, V_g their sums over the anchors of group g,

        row side     ∂/∂z_i += w_i (Σ_{c∈J_i} z_c / c_i − z_i)
        column side  ∂/∂c   += (T − T_{g_c}) − (V − V_{g_c}) c      (0 for an ignored column),

    without the −w_i z_i and V terms for unit rows (∂d2_ic/∂z_i = −c). The column side covers the
    queue's rows too (the gradient has C rows). `d2_pos` holds d̄2_i and `weight` w_i (R,) (None:
    ones); an anchor without negatives must have weight 0 (its c_i is taken as 1). The positive
    side, A_i = 1 spread over P_i, is the caller's (positives.add_positive_pull_). Every group
    sum is O((M + K)·D): no M × K matrix.
    """
    c, d = cols.shape
    m = groups.rows
    dtype = cols.dtype
    ids = groups.row_ids
    count = groups.negative_count[row_lo:row_hi].to(dtype).clamp_min(1)
    norms = torch.ones_like(cols[:, 0]) if unit_rows else (cols * cols).sum(1)
    z_rows, row_ids = cols[row_lo:row_hi], ids[row_lo:row_hi]
    column_sums, norm_sums = groups.sums(cols), groups.sums(norms)    # the last slot: ignored columns
    others = column_sums[:-1].sum(0) - column_sums[row_ids]
    other_norms = norm_sums[:-1].sum() - norm_sums[row_ids]
    negatives_d2 = (count * norms[row_lo:row_hi] + other_norms) / 2 - (z_rows * others).sum(1)
    loss = d2_pos - negatives_d2 / count
    if not need_grad:
        return loss, cols.new_empty((0, d))

    w = torch.ones_like(loss) if weight is None else weight.to(dtype)
    v = torch.zeros(m, dtype=dtype, device=cols.device)
    v[row_lo:row_hi] = w / count
    slot = torch.where(groups.col_ids >= 0, groups.col_ids, torch.full_like(groups.col_ids, c))
    counted = (groups.col_ids >= 0).to(dtype)[:, None]
    vz = v[:, None] * cols[:m]
    grad = counted * (vz.sum(0) - groups.anchor_sums(vz)[slot])
    if not unit_rows:
        grad -= counted * (v.sum() - groups.anchor_sums(v)[slot])[:, None] * cols
    grad[row_lo:row_hi] += w[:, None] * (others / count[:, None] - (0 if unit_rows else z_rows))
    return loss, grad

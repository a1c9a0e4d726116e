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

Everything is O(M·D), computed in float32 (float64 for float64 inputs). Unlike the pair
kernels, the distances are not clamped at 0 one by one; they differ from the clamped ones only
for rounding-level negative distances (duplicated rows).
"""
from __future__ import annotations

import torch


def quadratic_loss_and_grad(z_acc: torch.Tensor, row_lo: int, row_hi: int, weight: torch.Tensor | None, need_grad: bool,
                            unit_rows: bool = False):
    """(loss_rows, grad) in the dtype of `z_acc` (already float32/float64, contiguous)."""
    m = z_acc.shape[0]
    half = m // 2
    index = torch.arange(row_lo, row_hi, device=z_acc.device)
    partners = (index + half) % m
    z_rows, z_partners = z_acc[row_lo:row_hi], z_acc[partners]
    norms = torch.ones_like(z_acc[:, 0]) if unit_rows else (z_acc * z_acc).sum(1)
    total = z_acc.sum(0)
    n_rows, n_partners = norms[row_lo:row_hi], norms[partners]
    d2_pos = ((n_rows + n_partners) / 2 - (z_rows * z_partners).sum(1)).clamp_min(0)
    others = total - z_rows - z_partners
    negatives_d2 = ((m - 2) * n_rows + norms.sum() - n_rows - n_partners) / 2 - (z_rows * others).sum(1)
    loss = d2_pos - negatives_d2 / (m - 2)
    if not need_grad:
        return loss, z_acc.new_empty((0, z_acc.shape[1]))

    w = torch.ones_like(loss) if weight is None else weight.to(z_acc.dtype)
    w_full = torch.zeros(m, dtype=z_acc.dtype, device=z_acc.device)
    w_full[row_lo:row_hi] = w
    w_partner = w_full.roll(-half)                 # w_full[p(j)] for every j
    weighted_total = w_full @ z_acc
    column = weighted_total - w_full[:, None] * z_acc - w_partner[:, None] * z_acc.roll(-half, 0)
    if not unit_rows:
        column -= (w.sum() - w_full - w_partner)[:, None] * z_acc
    grad = column / (m - 2)
    grad[row_lo:row_hi] += w[:, None] * (others / (m - 2) - z_partners)
    grad.index_add_(0, partners, -w[:, None] * (z_rows if unit_rows else z_rows - z_partners))
    return loss, grad

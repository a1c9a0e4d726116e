r"""Pair geometry of a batch, in the paper's notation (Sec. 2, Eqn. 1 and 5).

Two views z1, z2 (N × D) are stacked into Z = [z1; z2] with M = 2N rows; the partner of row i
is p(i) = (i + N) mod M and its negatives are J_i = {j : j ≠ i, j ≠ p(i)}. Eqn. 1 sums over the
j ≠ i of one view's N samples; fastalpha (as the authors' code, facebookresearch/luckmatters)
anchors every one of the M rows and uses the 2N − 2 other rows of both views as negatives.
Distances carry the paper's factor ½:

    d2_ij = ||z_i − z_j||² / 2,      d2_i = d2_{i, p(i)},      v_ij = d2_i − d2_ij.

Energy and contrastive covariance (Theorem 1, Eqn. 5) of a pair-weight matrix α (M × M, used
on J_i only), with A_i = Σ_{j∈J_i} α_ij:

    E_α(Z)   = Σ_i Σ_{j∈J_i} α_ij d2_ij − Σ_i A_i d2_i = ½ tr C_α[z, z],
    C_α[a,b] = Σ_i Σ_{j∈J_i} α_ij (a_i − a_j)(b_i − b_j)ᵀ − Σ_i A_i (a_i − a_{p(i)})(b_i − b_{p(i)})ᵀ.

`energy` and `contrastive_covariance` are the library's public ones (fastalpha.energy,
fastalpha.contrastive_covariance), re-exported so that the theory code has one definition.
Everything here is dense, O(M²) memory, for small exact (float64) experiments.
"""
from __future__ import annotations

import torch

from ..functional import contrastive_covariance, energy

Tensor = torch.Tensor

__all__ = ["partner_index", "negative_mask", "stack_views", "pair_sq_distances", "pair_margins", "energy",
           "contrastive_covariance"]


def partner_index(m: int, device=None) -> Tensor:
    """p(i) = (i + M/2) mod M: the other view of the same sample."""
    return (torch.arange(m, device=device) + m // 2) % m


def negative_mask(m: int, device=None) -> Tensor:
    """Boolean (M, M) mask of J_i: every row but i and p(i)."""
    rows = torch.arange(m, device=device)[:, None]
    cols = torch.arange(m, device=device)[None, :]
    return (cols != rows) & (cols != (rows + m // 2) % m)


def stack_views(z1: Tensor, z2: Tensor, normalize: bool = False) -> Tensor:
    """Z = [z1; z2], rows L2-normalised when `normalize` (autograd flows through it)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D) with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"need N >= 2 rows per view (so that J_i is not empty), got N = {z1.shape[0]}")
    z = torch.cat([z1, z2], 0)
    return torch.nn.functional.normalize(z, dim=1) if normalize else z


def pair_sq_distances(z: Tensor) -> Tensor:
    """d2_ij = ||z_i − z_j||² / 2 for all pairs of rows, from explicit differences.

    The difference form (not the Gram form) keeps d2 exact to rounding, which the 1e-10
    gradient comparisons of the tests need; nothing here takes a power or log of d2.
    """
    diff = z[:, None, :] - z[None, :, :]
    return 0.5 * (diff * diff).sum(-1)


def pair_margins(z: Tensor) -> tuple[Tensor, Tensor]:
    """(v, mask) for stacked rows Z: v_ij = d2_i − d2_ij for all pairs (meaningful on J_i only)
    and the boolean J_i mask. v_ij > 0 means negative j is closer to i than i's partner."""
    m = z.shape[0]
    d2 = pair_sq_distances(z)
    d2_pos = d2.gather(1, partner_index(m, z.device)[:, None])
    return d2_pos - d2, negative_mask(m, device=z.device)

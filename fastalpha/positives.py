r"""Positive sets defined by groups: labels (SupCon) and more than two views.

Every row k of the stacked Z (M × D) belongs to a group g_k. The positives of anchor i are the
other rows of its group and its negatives the rows of every other group (docs/design.md,
"Positive sets"):

    P_i = {j ≠ i : g_j = g_i},      J_i = {j : g_j ≠ g_i}.

Without labels the group of a row is its sample: V views of N samples stacked view after view
(M = V·N) have g_k = k mod N, so two views give P_i = {p(i)} and J_i = every row but i and
p(i), the SimCLR sets. With labels, g_k is the label of row k (labels of length N are shared
by the V views of a sample).

The positive distance of anchor i is the mean over its positives,

    d̄2_i = (1/|P_i|) Σ_{p∈P_i} d2_ip,

and an anchor's loss depends on its positives only through d̄2_i, except that `infonce` with
ε > 0 also has them in its denominator (docs/design.md). So the positive side of every loss
and gradient reduces to sums over groups, O(M·D + G·D) memory and no pair loop:

    Σ_{p∈P_i} z_p = S_{g_i} − z_i,      S_g = Σ_{k: g_k = g} z_k,

which is what this module computes for every fused backend: the mean positive distances
before the pair loop, and the gradient of the uniform pull Σ_i u_i Σ_{p∈P_i} d2_ip after it.
The pair loops themselves only need each row's group id, to tell J_i (and, for `infonce`,
P_i) apart from i itself, on the fly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Groups:
    """The groups of the M rows of Z, as dense ids 0 … G−1 (`ids`, int64, on Z's device).

    `size[k]` is the size of row k's group, so |P_k| = size − 1 and |J_k| = M − size.
    """

    ids: torch.Tensor
    count: int
    size: torch.Tensor

    @classmethod
    def of(cls, ids: torch.Tensor) -> "Groups":
        """Groups from any integer ids (relabelled densely; equal ids share a group)."""
        unique, dense = torch.unique(ids, return_inverse=True)
        size = torch.bincount(dense, minlength=unique.numel())[dense]
        return cls(ids=dense.to(torch.int64), count=int(unique.numel()), size=size)

    @property
    def positive_count(self) -> torch.Tensor:
        """|P_k| per row (int64)."""
        return self.size - 1

    @property
    def negative_count(self) -> torch.Tensor:
        """|J_k| per row (int64): the rows of the other groups."""
        return self.ids.numel() - self.size

    def has_negatives(self) -> bool:
        """Whether any anchor has a negative, i.e. there are two groups or more."""
        return self.count > 1

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over the rows of each group of `values` (M, ...) → (G, ...)."""
        out = values.new_zeros((self.count,) + tuple(values.shape[1:]))
        return out.index_add_(0, self.ids, values)


def view_groups(n: int, views: int, device=None) -> torch.Tensor:
    """g_k = k mod N for V views of N samples stacked view after view (M = V·N rows)."""
    return torch.arange(n, device=device).repeat(views)


def label_groups(labels: torch.Tensor, n: int, views: int) -> torch.Tensor:
    """Group ids of the M = V·N rows from per-sample (length N) or per-row (length M) labels."""
    return labels.repeat(views) if labels.shape[0] == n and views > 1 else labels


def mean_positive_distance(z: torch.Tensor, groups: Groups, row_lo: int, row_hi: int, unit_rows: bool,
                           dtype: torch.dtype) -> torch.Tensor:
    r"""d̄2_i for the anchors [row_lo, row_hi), in `dtype`; 0 for an anchor without positives.

    From group sums: Σ_{p∈P_i} z_i·z_p = z_i·(S_{g_i} − z_i) and, with norms n_k = ||z_k||²,
    Σ_{p∈P_i} (n_i + n_p)/2 = (|P_i| n_i + N_{g_i} − n_i)/2, N_g = Σ_{k∈g} n_k. For unit rows
    n = 1, so d̄2_i = 1 − z_i·(S_{g_i} − z_i)/|P_i|. Clamped at 0 like every distance.
    """
    zs = z.to(dtype)
    rows = zs[row_lo:row_hi]
    ids = groups.ids[row_lo:row_hi]
    count = groups.positive_count[row_lo:row_hi].to(dtype)
    safe = count.clamp_min(1)
    partner_sum = groups.sums(zs)[ids] - rows
    dots = (rows * partner_sum).sum(1)
    if unit_rows:
        d2 = 1 - dots / safe
    else:
        norms = zs.square().sum(1)
        norm_sums = groups.sums(norms)[ids] - norms[row_lo:row_hi]
        d2 = norms[row_lo:row_hi] / 2 + norm_sums / (2 * safe) - dots / safe
    return torch.where(count > 0, d2.clamp_min(0), torch.zeros_like(d2))


def add_positive_pull_(grad: torch.Tensor, z: torch.Tensor, groups: Groups, pull: torch.Tensor, row_lo: int,
                       unit_rows: bool) -> torch.Tensor:
    r"""In place: grad[:M] += ∂/∂Z of Σ_i a_i d̄2_i over the anchors i ∈ [row_lo, row_lo + R).

    `pull` (R,) holds a_i (w_i A_i, the weight of d̄2_i in the weighted loss); each positive pair
    then carries u_i = a_i / |P_i| (0 without positives). With ∂d2_ip/∂z_i = z_i − z_p
    (−z_p for unit rows, whose terms in z_i itself drop out) and U_g = Σ_{i∈g} u_i z_i,
    Ū_g = Σ_{i∈g} u_i over the anchors:

        unit rows:  G_k −= u_k (S_{g_k} − z_k) + (U_{g_k} − u_k z_k)
        otherwise:  G_k += u_k (|P_k| z_k − (S_{g_k} − z_k)) + (Ū_{g_k} − u_k) z_k − (U_{g_k} − u_k z_k)

    With two views (groups of two) this is the partner term of the SimCLR gradient.
    """
    m = groups.ids.numel()
    stat = grad.dtype
    zs = z[:m].to(stat)
    rows = slice(row_lo, row_lo + pull.shape[0])
    count = groups.positive_count.to(stat)
    u = torch.zeros(m, dtype=stat, device=z.device)
    u[rows] = torch.where(count[rows] > 0, pull.to(stat) / count[rows].clamp_min(1), torch.zeros_like(pull, dtype=stat))
    ids = groups.ids
    uz = u[:, None] * zs
    others = groups.sums(zs)[ids] - zs              # Σ_{p∈P_k} z_p
    pulled = groups.sums(uz)[ids] - uz              # Σ_{i: k∈P_i} u_i z_i
    if unit_rows:
        grad[:m] -= u[:, None] * others + pulled
    else:
        pulled_weight = groups.sums(u)[ids] - u     # Σ_{i: k∈P_i} u_i
        grad[:m] += u[:, None] * (count[:, None] * zs - others) + pulled_weight[:, None] * zs - pulled
    return grad

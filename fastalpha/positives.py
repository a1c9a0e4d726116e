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
    r"""The positive and negative sets of the anchors of Z over the columns [Z; Q].

    Every anchor row i of Z (M rows) has a group id `row_ids[i]` ≥ 0 and every column c of
    [Z; Q] (M + K columns: the batch, then the queue or memory) an id `col_ids[c]`, with −1 for
    a column that is nobody's positive or negative (an empty memory slot, or the batch rows when
    they are anchors only). `self_col[i]` is the column that holds anchor i itself (i in every
    public call; its copy in the memory for CrossBatchMemory; −1 for none). Then

        P_i = {c : col_ids[c] = row_ids[i], c ≠ self_col[i]},    J_i = {c : col_ids[c] ≥ 0, col_ids[c] ≠ row_ids[i]}.

    Ids are dense (0 … M + K − 1), so per-group sums are `index_add` into M + K + 1 slots, the
    last one collecting the ignored columns. Everything here has static shapes and no host
    synchronisation, so it traces under torch.compile. An anchor takes part in the loss only
    if it has a positive and a negative (`has_loss`): that rule is decided here and nowhere
    else, and "mean" divides by `has_loss.sum()`.
    """

    row_ids: torch.Tensor
    col_ids: torch.Tensor
    self_col: torch.Tensor
    positive_count: torch.Tensor
    negative_count: torch.Tensor

    @classmethod
    def of(cls, labels: torch.Tensor, queue_rows: int = 0, queue_labels: torch.Tensor | None = None,
           queue_valid: torch.Tensor | None = None, batch_columns: bool = True,
           self_col: torch.Tensor | None = None) -> "Groups":
        """Groups from any integer ids of the M batch rows (equal ids share a group).

        `queue_labels` (K,) puts queue rows into the batch's groups; without them every queue
        row is a group of its own (a negative of every anchor). `queue_valid` (K, bool) marks
        the memory slots that hold a row (the others are ignored). `batch_columns=False` makes
        the batch rows anchors only; `self_col` overrides the anchors' own columns.
        """
        m = labels.shape[0]
        device = labels.device
        if queue_labels is None:
            dense = dense_ids(labels)
            queue_ids = m + torch.arange(queue_rows, device=device)
        else:
            both = dense_ids(torch.cat([labels, queue_labels.to(labels.dtype)]))
            dense, queue_ids = both[:m], both[m:]
        if queue_valid is not None:
            queue_ids = torch.where(queue_valid, queue_ids, torch.full_like(queue_ids, -1))
        batch_ids = dense if batch_columns else torch.full_like(dense, -1)
        col_ids = torch.cat([batch_ids, queue_ids])
        own = torch.arange(m, device=device) if self_col is None else self_col.to(device=device, dtype=torch.int64)
        return cls.from_ids(dense, col_ids, own)

    @classmethod
    def from_ids(cls, row_ids: torch.Tensor, col_ids: torch.Tensor, self_col: torch.Tensor) -> "Groups":
        """Groups of dense ids (as built by `of`), with the sizes of the sets counted."""
        columns = col_ids.shape[0]
        slots = torch.zeros(columns + 1, dtype=torch.int64, device=col_ids.device)
        slots.index_add_(0, _slot(col_ids, columns), torch.ones_like(col_ids))
        same = slots[row_ids]
        valid_columns = columns - slots[columns]
        positive = same - _self_in_group(row_ids, col_ids, self_col).to(torch.int64)
        return cls(row_ids, col_ids, self_col, positive, valid_columns - same)

    @property
    def rows(self) -> int:
        return self.row_ids.shape[0]

    @property
    def columns(self) -> int:
        return self.col_ids.shape[0]

    @property
    def has_loss(self) -> torch.Tensor:
        """(M,) bool: the anchors with a positive and a negative, the only ones with a loss term."""
        return (self.positive_count > 0) & (self.negative_count > 0)

    def anchor_count(self) -> torch.Tensor:
        """The number of anchors with a loss term (0-dim int64 tensor): the divisor of "mean"."""
        return self.has_loss.sum()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields, in order (what the custom op carries)."""
        return self.row_ids, self.col_ids, self.self_col, self.positive_count, self.negative_count

    def masks(self, row_lo: int = 0, row_hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense boolean (R, M + K) masks (P_i, J_i) of the anchors [row_lo, row_hi): O(R·(M + K)),
        for the dense reference and the chunked loop."""
        row_hi = self.rows if row_hi is None else row_hi
        ids = self.row_ids[row_lo:row_hi, None]
        cols = torch.arange(self.columns, device=self.col_ids.device)[None, :]
        same = self.col_ids[None, :] == ids
        positives = same & (cols != self.self_col[row_lo:row_hi, None])
        negatives = (self.col_ids[None, :] >= 0) & ~same
        return positives, negatives

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over the columns of each group of `values` ((M + K), ...) → (M + K + 1, ...); the
        last slot collects the ignored columns."""
        out = values.new_zeros((self.columns + 1,) + tuple(values.shape[1:]))
        return out.index_add_(0, _slot(self.col_ids, self.columns), values)

    def anchor_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Σ over the anchors of each group of `values` (M, ...) → (M + K + 1, ...)."""
        out = values.new_zeros((self.columns + 1,) + tuple(values.shape[1:]))
        return out.index_add_(0, self.row_ids, values)

    def own_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, counted): each anchor's self column (clamped to a valid index) and whether it
        lies in the anchor's group, i.e. is taken out of the group's sums for P_i."""
        counted = _self_in_group(self.row_ids, self.col_ids, self.self_col)
        return self.self_col.clamp_min(0), counted


def _slot(col_ids: torch.Tensor, columns: int) -> torch.Tensor:
    """Sum slot of each column: its id, or the last slot for an ignored column."""
    return torch.where(col_ids >= 0, col_ids, torch.full_like(col_ids, columns))


def _self_in_group(row_ids: torch.Tensor, col_ids: torch.Tensor, self_col: torch.Tensor) -> torch.Tensor:
    """(M,) bool: anchor i's self column exists and carries its group id."""
    own = col_ids[self_col.clamp_min(0)]
    return (self_col >= 0) & (own == row_ids)


def dense_ids(ids: torch.Tensor) -> torch.Tensor:
    """Ids relabelled 0 … G − 1 (in sorted order), equal ids equal: a sort and a cumulative sum,
    static shapes and no host synchronisation (unlike torch.unique)."""
    ids = ids.to(torch.int64)
    if ids.numel() == 0:
        return ids
    ordered, order = torch.sort(ids)
    starts = torch.ones_like(ordered)
    starts[1:] = (ordered[1:] != ordered[:-1]).to(torch.int64)
    return torch.empty_like(ids).scatter_(0, order, starts.cumsum(0) - 1)


def groups_of(groups, queue_rows: int = 0) -> Groups:
    """`groups` as Groups: a Groups passes through; a tensor of the M rows' ids becomes their
    groups, with `queue_rows` unlabelled queue rows (negatives of every anchor)."""
    if isinstance(groups, Groups):
        return groups
    return Groups.of(groups, queue_rows)


def view_groups(n: int, views: int, device=None) -> torch.Tensor:
    """g_k = k mod N for V views of N samples stacked view after view (M = V·N rows)."""
    return torch.arange(n, device=device).repeat(views)


def label_groups(labels: torch.Tensor, n: int, views: int) -> torch.Tensor:
    """Group ids of the M = V·N rows from per-sample (length N) or per-row (length M) labels."""
    return labels.repeat(views) if labels.shape[0] == n and views > 1 else labels


#: Rows per gather of group sums: bounds this module's temporaries at ROW_BLOCK × D beside the
#: one (G + 1) × D sum buffer, so that the positive side adds no M × D working set of its own.
ROW_BLOCK = 2048


def _blocks(lo: int, hi: int):
    """Slices of [lo, hi) of ROW_BLOCK rows."""
    return (slice(start, min(start + ROW_BLOCK, hi)) for start in range(lo, hi, ROW_BLOCK))


def mean_positive_distance(cols: torch.Tensor, groups: Groups, row_lo: int, row_hi: int, unit_rows: bool,
                           dtype: torch.dtype) -> torch.Tensor:
    r"""d̄2_i for the anchors [row_lo, row_hi), in `dtype`; 0 for an anchor without positives.

    `cols` is [Z; Q] ((M + K) × D; the anchors are its first M rows). From group sums over the
    columns, minus the anchor's own column where it is in the group:
    Σ_{p∈P_i} z_i·c_p = z_i·(S_{g_i} − c_{s(i)}) and, with norms n_c = ||c||²,
    Σ_{p∈P_i} (n_i + n_p)/2 = (|P_i| n_i + N_{g_i} − n_{s(i)})/2. For unit rows n = 1, so
    d̄2_i = 1 − z_i·(S_{g_i} − c_{s(i)})/|P_i|. Clamped at 0 like every distance.
    """
    cs = cols.to(dtype)
    own, counted = groups.own_columns()
    column_sums = groups.sums(cs)
    dots = cs.new_empty(row_hi - row_lo)
    for rows in _blocks(row_lo, row_hi):
        z = cs[rows]
        out = slice(rows.start - row_lo, rows.stop - row_lo)
        dots[out] = (torch.linalg.vecdot(z, column_sums[groups.row_ids[rows]])
                     - counted[rows].to(dtype) * torch.linalg.vecdot(z, cs[own[rows]]))
    count = groups.positive_count[row_lo:row_hi].to(dtype)
    safe = count.clamp_min(1)
    if unit_rows:
        d2 = 1 - dots / safe
    else:
        own, counted = own[row_lo:row_hi], counted[row_lo:row_hi].to(dtype)
        norms = cs.square().sum(1)
        norm_sums = groups.sums(norms)[groups.row_ids[row_lo:row_hi]] - counted * norms[own]
        d2 = norms[row_lo:row_hi] / 2 + norm_sums / (2 * safe) - dots / safe
    return torch.where(count > 0, d2.clamp_min(0), torch.zeros_like(d2))


def add_positive_pull_(grad: torch.Tensor, cols: torch.Tensor, groups: Groups, pull: torch.Tensor, row_lo: int,
                       unit_rows: bool) -> torch.Tensor:
    r"""In place: grad ((M + K) × D, over [Z; Q]) += ∂/∂[Z; Q] of Σ_i a_i d̄2_i over the anchors
    i ∈ [row_lo, row_lo + R).

    `pull` (R,) holds a_i (w_i A_i, the weight of d̄2_i in the weighted loss); each positive pair
    then carries u_i = a_i / |P_i| (0 without positives). With ∂d2_ip/∂z_i = z_i − c_p,
    ∂d2_ip/∂c_p = c_p − z_i (the terms in a row's own norm drop out for unit rows), the anchor
    side and the column side are group sums over the anchors (U_g = Σ_{i∈g} u_i z_i,
    Ū_g = Σ_{i∈g} u_i) and over the columns (S_g), less each anchor's own column s(i):

        anchor i:  −u_i (S_{g_i} − c_{s(i)})          (+ u_i |P_i| z_i without unit rows)
        column c:  −(U_{g_c} − u_{o(c)} z_{o(c)})     (+ (Ū_{g_c} − u_{o(c)}) c without unit rows)

    where o(c) is the anchor whose own column c is. With two views (groups of two) this is the
    partner term of the SimCLR gradient. The two sides run one after the other, each with one
    group-sum buffer and ROW_BLOCK-row gathers.
    """
    stat = grad.dtype
    cs = cols.to(stat)
    anchors = (row_lo, row_lo + pull.shape[0])
    count = groups.positive_count.to(stat)
    u = torch.zeros(groups.rows, dtype=stat, device=cols.device)
    lo, hi = anchors
    u[lo:hi] = torch.where(count[lo:hi] > 0, pull.to(stat) / count[lo:hi].clamp_min(1),
                           torch.zeros_like(pull, dtype=stat))
    own, counted = groups.own_columns()
    owner_u = torch.where(counted, u, torch.zeros_like(u))
    column_sums = groups.sums(cs)
    for rows in _blocks(*anchors):
        grad[rows].addcmul_(u[rows, None], column_sums[groups.row_ids[rows]], value=-1)
        grad[rows].addcmul_(owner_u[rows, None], cs[own[rows]])
        if not unit_rows:
            grad[rows].addcmul_((u[rows] * count[rows])[:, None], cs[rows])
    del column_sums
    pulled = cs.new_zeros((groups.columns + 1, cs.shape[1]))               # U_g
    for rows in _blocks(*anchors):
        pulled.index_add_(0, groups.row_ids[rows], u[rows, None] * cs[rows])
    slot = _slot(groups.col_ids, groups.columns)
    for columns in _blocks(0, groups.columns):
        grad[columns] -= pulled[slot[columns]]
    for rows in _blocks(*anchors):
        grad.index_add_(0, own[rows], owner_u[rows, None] * cs[rows])
    if not unit_rows:
        pulled_weight = groups.anchor_sums(u)[slot].index_add_(0, own, -owner_u)   # Σ_{i: c∈P_i} u_i
        grad.addcmul_(pulled_weight[:, None], cs)
    return grad

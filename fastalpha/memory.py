r"""A cross-batch memory (XBM, Wang et al. 2020): SupCon against the last K labelled embeddings.

    xbm = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(temperature=0.1), embedding_size=128,
                                     memory_size=65536)
    loss = xbm(embeddings, labels)          # (B, D), (B,): pytorch-metric-learning's call

A drop-in for pytorch-metric-learning's `CrossBatchMemory(SupConLoss(τ), D, K)`, with its
semantics: every call first writes the batch (detached) into a ring of K slots, then compares
each anchor i of the batch with the filled slots of the memory, less the slot that holds i's
own copy. With the memory's rows as the columns and the batch rows as anchors only, that is
the loss of fastalpha's group-defined positive sets (docs/design.md, "Positive sets with a
queue"):

    P_i = {filled slots c with label y_c = y_i, c ≠ slot(i)},   J_i = {filled slots c : y_c ≠ y_i},

    loss_i = log Σ_{c∈P_i∪J_i} e^{cos_ic/τ} − (1/|P_i|) Σ_{p∈P_i} cos_ip/τ      (SupCon, ε = 1),

averaged over the anchors with a positive and a negative. The memory is a constant (no
gradient), and the call is the fused op with the whole fixed-size memory as the queue and the
empty slots ignored, so shapes never depend on the fill level (nothing recompiles under
torch.compile while the memory fills), and no B × K matrix exists: the backends take the
anchors in row chunks. Any `AlphaCLLoss` rule works the same way.

The memory (rows, labels, the write position and the fill level) is a set of buffers: saved
in `state_dict`, moved by `.to(...)`. The position is a tensor, never read back to the host.

MoCo-style partial enqueue (`enqueue_mask`, pml's name): the rows with True go to the memory
and are not anchors; the others are anchors and are not written (they have no copy to leave
out).

Where pml's conventions are kept and where they differ: docs/migrating.md.
"""
from __future__ import annotations

import torch

from . import dispatch, positives
from .functional import grouped_loss_of_spec
from .losses import AlphaCLLoss, SupConLoss
from .rules import LossSpec, check_reduction, make_spec


def loss_settings(loss) -> tuple[LossSpec, str, str]:
    """(spec, reduction, backend) of a fastalpha loss module (SupConLoss or an AlphaCLLoss)."""
    if isinstance(loss, SupConLoss):
        temperature, reduction, backend = loss.temperature, loss.reduction, loss.backend
        spec = make_spec("infonce", temperature, eps=1.0)
    elif isinstance(loss, AlphaCLLoss):
        if loss.gather_distributed:
            raise ValueError("CrossBatchMemory takes a loss without gather_distributed=True (the memory is local)")
        kwargs = dict(loss.kwargs)
        reduction, backend = kwargs.pop("reduction"), kwargs.pop("backend")
        temperature = kwargs["temperature"]
        spec = make_spec(**kwargs)
        if spec.negatives != "all":
            raise ValueError(f"CrossBatchMemory's negatives are the memory rows of other labels: the loss must have "
                             f"negatives='all', got negatives={spec.negatives!r}")
    else:
        raise TypeError("CrossBatchMemory takes a fastalpha loss module (fastalpha.SupConLoss or fastalpha.AlphaCLLoss), "
                        f"got {type(loss).__name__}")
    if isinstance(temperature, torch.Tensor) and temperature.requires_grad:
        raise ValueError("CrossBatchMemory takes a constant temperature (a learnable one is not supported here)")
    check_reduction(reduction)
    return spec, reduction, backend


class CrossBatchMemory(torch.nn.Module):
    """`xbm(embeddings, labels, enqueue_mask=None)`: the loss of the batch against a labelled
    memory of the last `memory_size` embeddings (this batch's included), see the module doc.

    Args:
        loss: fastalpha.SupConLoss(temperature) (pml's SupConLoss), or any fastalpha.AlphaCLLoss
            with negatives="all"; its rule, parameters, reduction and backend are used.
        embedding_size: D, the width of the embeddings.
        memory_size: K, the number of slots.
        dtype, device: of the stored rows (float32 and the default device, as pml starts);
            rows are stored in this dtype whatever the batch's, and the loss is computed in the
            batch's dtype.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("memory_size", memory_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.spec, self.reduction, self.backend = loss_settings(loss)
        self.loss = loss
        self.embedding_size, self.memory_size = embedding_size, memory_size
        self.register_buffer("embedding_memory", torch.zeros(memory_size, embedding_size, dtype=dtype, device=device))
        self.register_buffer("label_memory", torch.zeros(memory_size, dtype=torch.long, device=device))
        self.register_buffer("queue_idx", torch.zeros((), dtype=torch.long, device=device))    # next slot written
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))       # slots holding a row

    @property
    def has_been_filled(self) -> bool:
        """pml's flag: every slot holds a row (reads the fill level back to the host)."""
        return bool(self.filled == self.memory_size)

    def reset_queue(self) -> None:
        """Empty the memory (pml's name)."""
        with torch.no_grad():
            self.embedding_memory.zero_()
            self.label_memory.zero_()
            self.queue_idx.zero_()
            self.filled.zero_()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                enqueue_mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check(embeddings, labels, enqueue_mask)
        backend = dispatch.resolve_backend(self.backend, embeddings.device, self.spec, True, True)
        batch = embeddings.shape[0]
        enqueued = torch.ones(batch, dtype=torch.bool, device=embeddings.device) if enqueue_mask is None else enqueue_mask
        slots = self._enqueue(embeddings, labels, enqueued)
        groups = self._groups(labels, slots, enqueued, own_copies=enqueue_mask is None)
        memory = self.embedding_memory.to(embeddings.dtype)
        loss = grouped_loss_of_spec([embeddings], groups, self.spec, self.reduction, backend, None, memory)
        anchors = ~enqueued if enqueue_mask is not None else enqueued
        return torch.where(_at_most_one_pair_each(groups, anchors), torch.zeros_like(loss), loss)

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, enqueued: torch.Tensor) -> torch.Tensor:
        r"""Write the rows with `enqueued` True into the ring, in batch order from `queue_idx` on,
        and return every batch row's slot.

        Static shapes, no host synchronisation: all B rows are written to B distinct slots
        (B ≤ K), the enqueued rows to queue_idx, queue_idx + 1, … and the others to the slots
        after those, with the values those slots already hold, so a mask changes no shape.
        """
        count = enqueued.sum()
        order = torch.where(enqueued, enqueued.cumsum(0) - 1, count + (~enqueued).cumsum(0) - 1)
        slots = (self.queue_idx + order) % self.memory_size
        rows = torch.where(enqueued[:, None], embeddings.detach().to(self.embedding_memory.dtype),
                           self.embedding_memory[slots])
        row_labels = torch.where(enqueued, labels.to(torch.long), self.label_memory[slots])
        self.embedding_memory.index_copy_(0, slots, rows)
        self.label_memory.index_copy_(0, slots, row_labels)
        self.queue_idx.copy_((self.queue_idx + count) % self.memory_size)
        self.filled.copy_((self.filled + count).clamp_max(self.memory_size))
        return slots

    def _groups(self, labels: torch.Tensor, slots: torch.Tensor, enqueued: torch.Tensor,
                own_copies: bool) -> positives.Groups:
        """The batch rows as anchors only and the K slots as the columns (empty ones ignored),
        each anchor's own copy left out of its positives; rows that only enqueue have no loss."""
        batch, size = labels.shape[0], self.memory_size
        valid = torch.arange(size, device=labels.device) < self.filled
        own = batch + slots if own_copies else torch.full_like(slots, -1)
        groups = positives.Groups.of(labels, size, self.label_memory, queue_valid=valid, batch_columns=False,
                                     self_col=own)
        if own_copies:
            return groups
        # An enqueue-only row gets an id that no column has, so it has no positive and no loss.
        # B + K − 1 is free: the ids are dense over the B + K labels of batch and memory, and
        # such a row's label occurs twice among them (it was just written to its slot), so
        # there are at most B + K − 1 distinct ids, 0 … B + K − 2.
        row_ids = torch.where(enqueued, torch.full_like(groups.row_ids, batch + size - 1), groups.row_ids)
        return positives.Groups.from_ids(row_ids, groups.col_ids, groups.self_col)

    def _check(self, embeddings, labels, enqueue_mask) -> None:
        """Every input checked before the memory is touched: on bad input it is unchanged."""
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        if not embeddings.is_floating_point():
            raise TypeError(f"embeddings must have a floating dtype, got {embeddings.dtype}")
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D (B, D), got shape {tuple(embeddings.shape)}")
        batch, width = embeddings.shape
        if width != self.embedding_size:
            raise ValueError(f"embeddings must have D = embedding_size = {self.embedding_size} columns, got {width}")
        if batch == 0:
            raise ValueError("embeddings need B >= 1 rows, got B = 0")
        if batch > self.memory_size:
            raise ValueError(f"a batch of B = {batch} rows is larger than the memory (memory_size = "
                             f"{self.memory_size}): the memory must hold at least one batch")
        if embeddings.device != self.embedding_memory.device:
            raise ValueError(f"embeddings are on {embeddings.device} but the memory is on "
                             f"{self.embedding_memory.device}: move the module with .to(device)")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != batch:
            raise ValueError(f"labels must be 1-D with one label per row (length B = {batch}), got shape "
                             f"{tuple(labels.shape)}")
        if labels.device != embeddings.device:
            raise ValueError(f"labels must be on the device of the embeddings ({embeddings.device}), got {labels.device}")
        if enqueue_mask is None:
            return
        if not isinstance(enqueue_mask, torch.Tensor) or enqueue_mask.dtype != torch.bool:
            raise TypeError(f"enqueue_mask must be a bool tensor, got "
                            f"{getattr(enqueue_mask, 'dtype', type(enqueue_mask).__name__)}")
        if enqueue_mask.shape != (batch,):
            raise ValueError(f"enqueue_mask must have shape (B,) = ({batch},), got {tuple(enqueue_mask.shape)}")
        if enqueue_mask.device != embeddings.device:
            raise ValueError(f"enqueue_mask must be on the device of the embeddings ({embeddings.device}), got "
                             f"{enqueue_mask.device}")

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, memory_size={self.memory_size}, "
                f"dtype={self.embedding_memory.dtype}")


def _at_most_one_pair_each(groups: positives.Groups, anchors: torch.Tensor) -> torch.Tensor:
    """pml's rule for a pair loss: with at most one positive pair and at most one negative pair
    over all anchors (`anchors`: (B,) bool, the rows that are anchors), the loss is 0, with a
    zero gradient."""
    zero = torch.zeros_like(groups.positive_count)
    positive_pairs = torch.where(anchors, groups.positive_count, zero).sum()
    negative_pairs = torch.where(anchors, groups.negative_count, zero).sum()
    return (positive_pairs <= 1) & (negative_pairs <= 1)

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
import torch.distributed as dist

from . import dispatch, positives
from .checks import check_embedding, check_flag
from .distributed import RANK_DTYPES, all_gather_single
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
            raise ValueError("CrossBatchMemory takes a loss without gather_distributed=True: pass "
                             "gather_distributed=True to CrossBatchMemory itself (it gathers the batch into the memory)")
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
        gather_distributed: under an initialised torch.distributed group (`group`, default the
            world), every rank enqueues the global batch (the ranks' batches in rank order,
            any sizes), so the memory is the same on every rank, and compares its own rows with
            it. With DDP's convention (per-rank loss, gradients averaged over the W ranks) the
            gradient is the single-process gradient of the global batch: "mean" returns W × this
            rank's anchors' sum / the global number of anchors with a loss term, "sum" W × this
            rank's sum, "none" this rank's B_r losses.
    """

    def __init__(self, loss, embedding_size: int, memory_size: int = 1024, dtype: torch.dtype = torch.float32,
                 device=None, gather_distributed: bool = False, group=None):
        super().__init__()
        self.gather_distributed = check_flag("gather_distributed", gather_distributed)
        if self.gather_distributed and not dist.is_available():
            raise ValueError("gather_distributed=True needs torch.distributed, which this torch build does not have")
        self.group = group
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
        distributed = self.gather_distributed and dist.is_available() and dist.is_initialized()
        if distributed:
            world, (written, written_labels, written_mask, offset) = self._gather(embeddings, labels, enqueue_mask)
        else:
            self._check(embeddings, labels, enqueue_mask)
        backend = dispatch.resolve_backend(self.backend, embeddings.device, self.spec, True, True)
        batch = embeddings.shape[0]
        enqueued = torch.ones(batch, dtype=torch.bool, device=embeddings.device) if enqueue_mask is None else enqueue_mask
        if distributed:
            slots = self._enqueue(written, written_labels, written_mask)[offset:offset + batch]
        else:
            slots = self._enqueue(embeddings, labels, enqueued)
        groups = self._groups(labels, slots, enqueued, own_copies=enqueue_mask is None)
        memory = self.embedding_memory.to(embeddings.dtype)
        anchors = ~enqueued if enqueue_mask is not None else enqueued
        if not distributed:
            loss = grouped_loss_of_spec([embeddings], groups, self.spec, self.reduction, backend, None, memory)
            return torch.where(_at_most_one_pair_each(*_pair_counts(groups, anchors)), torch.zeros_like(loss), loss)
        local = "none" if self.reduction == "none" else "sum"
        loss = grouped_loss_of_spec([embeddings], groups, self.spec, local, backend, None, memory)
        counts = torch.stack([groups.anchor_count(), *_pair_counts(groups, anchors)])
        gathered = counts.new_empty(world * 3)
        all_gather_single(gathered, counts, group=self.group)
        anchor_count, positive_pairs, negative_pairs = gathered.view(world, 3).sum(0)
        if self.reduction == "mean":
            loss = loss * (world / anchor_count.clamp_min(1).to(loss.dtype))
        elif self.reduction == "sum":
            loss = loss * world
        return torch.where(_at_most_one_pair_each(positive_pairs, negative_pairs), torch.zeros_like(loss), loss)

    def _gather(self, embeddings, labels, enqueue_mask):
        """(W, (rows, labels, enqueue mask, offset)): the global batch, every rank's rows in rank
        order, and where this rank's rows start in it. Every rank takes part even when its own
        input is invalid, and then every rank raises (no rank is left waiting in a collective)."""
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        try:
            self._check(embeddings, labels, enqueue_mask)
            problem = None
        except (TypeError, ValueError) as err:
            problem = err
        valid = problem is None
        device = embeddings.device if isinstance(embeddings, torch.Tensor) else self.embedding_memory.device
        header = torch.tensor([embeddings.shape[0] if valid else -1,
                               RANK_DTYPES.index(embeddings.dtype) if valid and embeddings.dtype in RANK_DTYPES else -1,
                               int(enqueue_mask is not None), int(not valid)], dtype=torch.int64, device=device)
        headers = header.new_empty(world * header.numel())
        all_gather_single(headers, header, group=self.group)
        sizes, dtypes, masked, bad = (tuple(int(v) for v in column) for column in headers.view(world, -1).cpu().T)
        if problem is not None:
            raise type(problem)(f"{problem} (rank {rank} of {world})")
        if any(bad):
            raise ValueError(f"rank(s) {[r for r in range(world) if bad[r]]} of the process group got invalid input; "
                             "see the error raised there")
        if len(set(dtypes)) > 1 or -1 in dtypes:
            raise TypeError(f"embeddings must have one dtype of {RANK_DTYPES} on every rank, got "
                            f"{[str(RANK_DTYPES[c]) if c >= 0 else '?' for c in dtypes]} by rank")
        if len(set(masked)) > 1:
            raise ValueError("every rank must pass enqueue_mask, or none: got it on ranks "
                             f"{[r for r in range(world) if masked[r]]} only")
        if sum(sizes) > self.memory_size:
            raise ValueError(f"the global batch of B = {sum(sizes)} rows (B_r = {list(sizes)} by rank) is larger than "
                             f"the memory (memory_size = {self.memory_size}): the memory must hold one global batch")
        batch, most = embeddings.shape[0], max(sizes)
        mask = torch.ones(batch, dtype=torch.bool, device=device) if enqueue_mask is None else enqueue_mask
        # One padded block per rank (B_max rows: the rows and the mask as a last column, exact
        # in any float dtype), the padding dropped after.
        block = torch.zeros(most, self.embedding_size + 1, dtype=embeddings.dtype, device=device)
        block[:batch, :-1] = embeddings.detach()
        block[:batch, -1] = mask.to(embeddings.dtype)
        received = block.new_empty(world * most, block.shape[1])
        all_gather_single(received, block, group=self.group)
        keep = torch.cat([torch.arange(size, device=device) + r * most for r, size in enumerate(sizes)])
        rows = received.index_select(0, keep)
        gathered_labels = _gathered_labels(labels, sizes, most, world, self.group, keep)
        return world, (rows[:, :-1], gathered_labels, rows[:, -1] > 0.5, sum(sizes[:rank]))

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
        check_embedding("embeddings", embeddings, sizes=False, rows="B")
        batch, width = embeddings.shape
        if width != self.embedding_size:
            raise ValueError(f"embeddings must have D = embedding_size = {self.embedding_size} columns, got {width}")
        check_embedding("embeddings", embeddings, rows="B")
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


def _pair_counts(groups: positives.Groups, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive pairs, negative pairs) of the anchors (`anchors`: (B,) bool, the rows that are
    anchors), as 0-dim tensors."""
    zero = torch.zeros_like(groups.positive_count)
    return (torch.where(anchors, groups.positive_count, zero).sum(),
            torch.where(anchors, groups.negative_count, zero).sum())


def _at_most_one_pair_each(positive_pairs: torch.Tensor, negative_pairs: torch.Tensor) -> torch.Tensor:
    """pml's rule for a pair loss: with at most one positive pair and at most one negative pair
    over all anchors, the loss is 0, with a zero gradient."""
    return (positive_pairs <= 1) & (negative_pairs <= 1)


def _gathered_labels(labels, sizes, most: int, world: int, group, keep) -> torch.Tensor:
    """Every rank's labels in rank order, gathered as int64 (a float column would round large ids)."""
    block = torch.zeros(most, dtype=torch.int64, device=labels.device)
    block[: labels.shape[0]] = labels.to(torch.int64)
    received = block.new_empty(world * most)
    all_gather_single(received, block, group=group)
    return received.index_select(0, keep)

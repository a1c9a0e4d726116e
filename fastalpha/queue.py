"""A FIFO memory bank of detached embeddings: the queue of MoCo-style training.

    queue = fastalpha.Queue(size=65536, dim=128)
    for x1, x2 in loader:
        z1, z2 = model(x1), model_ema(x2)
        loss = fastalpha.alpha_cl_loss(z1, z2, rule="infonce", negatives="none", queue=queue.rows())
        ...
        queue.enqueue(z2)            # after the loss: this batch's rows are next batch's negatives

The rows are stored detached, in the queue's own dtype and device (whatever the dtype and
device of the rows handed to `enqueue`), as a buffer, so the bank is saved with the model's
state_dict and moves with `.to(...)`.

With labels (SupCon with a memory), `enqueue(rows, labels)` keeps each row's integer label
beside it, in a buffer saved with the rows:

    loss = fastalpha.alpha_cl_loss(z, labels=y, rule="infonce", queue=queue.rows(),
                                   queue_labels=queue.labels())
    queue.enqueue(z, y)

A queue is labelled from its first labelled `enqueue` on and then takes labels with every
batch (a row without a label could be neither a positive nor a negative of a labelled anchor);
a queue that holds unlabelled rows takes no labels.
"""
from __future__ import annotations

import torch


class Queue(torch.nn.Module):
    """The last `size` rows passed to `enqueue` (and their labels, when given), oldest
    overwritten first."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))   # rows written
        # None until the first labelled enqueue: an unlabelled queue's state_dict keeps the
        # two entries it always had.
        self.register_buffer("label_bank", None)

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    @property
    def labelled(self) -> bool:
        return self.label_bank is not None

    def __len__(self) -> int:
        return min(int(self.count), self.size)

    def rows(self) -> torch.Tensor:
        """The stored rows, (len(self), dim): all of the bank once it has filled up."""
        return self.bank[: len(self)]

    def labels(self) -> torch.Tensor | None:
        """The stored rows' labels, (len(self),) int64 in the order of `rows()`; None for an
        unlabelled queue (so that `queue_labels=queue.labels()` works for both)."""
        return None if self.label_bank is None else self.label_bank[: len(self)]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Append the rows of z (detached), and their labels, overwriting the oldest ones when full.

        Everything is checked before anything is written: on bad input the queue is unchanged.
        """
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.bank.shape[1]:
            raise ValueError(f"enqueue takes a (B, {self.bank.shape[1]}) tensor, got {getattr(z, 'shape', type(z))}")
        self._check_labels(z, labels)
        keep = min(z.shape[0], self.size)
        start = int(self.count) % self.size
        first = min(keep, self.size - start)
        self._write(self.bank, z.detach()[z.shape[0] - keep:], start, first)
        if labels is not None:
            if self.label_bank is None:
                self.label_bank = torch.zeros(self.size, dtype=torch.long, device=self.bank.device)
            self._write(self.label_bank, labels.detach()[labels.shape[0] - keep:], start, first)
        # The ring advances by the rows kept, so that the next write starts at the oldest row.
        self.count += keep

    @staticmethod
    def _write(buffer: torch.Tensor, values: torch.Tensor, start: int, first: int) -> None:
        """buffer[start:start + first] = values[:first], the rest at the front (ring order)."""
        values = values.to(device=buffer.device, dtype=buffer.dtype)
        buffer[start:start + first] = values[:first]
        buffer[: values.shape[0] - first] = values[first:]

    def _check_labels(self, z: torch.Tensor, labels) -> None:
        if labels is None:
            if self.label_bank is not None:
                raise ValueError("this queue is labelled (an earlier enqueue gave labels): enqueue(rows, labels) "
                                 "needs the labels of these rows too")
            return
        if self.label_bank is None and int(self.count) > 0:
            raise ValueError("this queue holds unlabelled rows: it cannot take labels now (start a labelled queue "
                             "with a labelled first enqueue)")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.dim() != 1 or labels.shape[0] != z.shape[0]:
            raise ValueError(f"labels must be 1-D with one label per row (length {z.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
        if labels.device != z.device:
            raise ValueError(f"labels must be on the device of the rows ({z.device}), got {labels.device}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The state says whether the queue is labelled: a labelled state makes room for its labels
        # (the buffer is created by the first labelled enqueue), an unlabelled one (also every
        # state saved before queues had labels) drops them.
        saved = state_dict.get(prefix + "label_bank")
        if saved is None:
            self.label_bank = None
        elif self.label_bank is None:
            self.label_bank = torch.zeros(saved.shape, dtype=torch.long, device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.bank.shape[1]}, dtype={self.bank.dtype}, filled={len(self)}"
                f"{', labelled' if self.labelled else ''}")


class MemoryBank(torch.nn.Module):
    r"""lightly's memory bank of `size` rows: the negatives of `NTXentLoss(memory_bank_size=(K, D))`.

    Written as lightly writes it: a batch goes to the slots from the write position on; one that
    reaches the end fills the last slots, the rest of it is dropped, and the position goes back
    to 0 (so the bank always holds whole runs of consecutive rows). Unlike lightly's bank, which
    starts as K random unit rows, this one starts empty: the slots [0, filled) hold rows, and
    only they are negatives. The rows, the position and the fill level are buffers (saved in
    state_dict).
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        # Once every slot holds a row the fill level never changes again: remembered on the host
        # so that a full bank is used without reading the fill level back.
        self._full = False

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def rows(self) -> torch.Tensor:
        """The slots that hold a row, (filled, dim): the whole bank once it has been filled."""
        if not self._full:
            filled = int(self.filled)
            self._full = filled == self.size
            if not self._full:
                return self.bank[:filled]
        return self.bank

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write `rows` (detached) from the write position on, lightly's way (see the class)."""
        batch, size = rows.shape[0], self.size
        source = torch.arange(size, device=self.bank.device) - self.bank_ptr     # batch row of each slot
        written = (source >= 0) & (source < batch)
        values = rows.detach().to(device=self.bank.device, dtype=self.bank.dtype)[source.clamp(0, batch - 1)]
        self.bank.copy_(torch.where(written[:, None], values, self.bank))
        end = self.bank_ptr + batch
        self.filled.copy_(torch.maximum(self.filled, end.clamp_max(size)))
        self.bank_ptr.copy_(torch.where(end >= size, torch.zeros_like(end), end))

    def _load_from_state_dict(self, *args, **kwargs):
        self._full = False
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.bank.shape[1]}, dtype={self.bank.dtype}"

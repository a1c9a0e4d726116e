"""The memory bank of `--supervised --queue-size K`: fastalpha.Queue with the label of every row.

A labelled anchor needs to know which queue rows are its positives (same label) and which its
negatives, so the bank keeps the labels at the same FIFO positions as the rows:

    bank  = LabelledQueue(K, D)
    loss  = alpha_cl_loss(views, labels=y, queue=bank.rows(), queue_labels=bank.labels())
    bank.enqueue(z2.detach(), y)        # after the step: the rows and their labels, oldest out first

Both buffers (rows, labels) and the fill count are in `state_dict`, so a checkpoint restores
the bank exactly. The harness keeps this holder until fastalpha.Queue itself stores labels.
"""
from __future__ import annotations

import torch

import fastalpha


class LabelledQueue(fastalpha.Queue):
    """The last `size` rows passed to `enqueue` and their integer labels, oldest overwritten first."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(size, dim, dtype=dtype, device=device)
        self.register_buffer("label_bank", torch.zeros(size, dtype=torch.long, device=device))

    def labels(self) -> torch.Tensor:
        """The labels of `rows()`, (len(self),), row for row."""
        return self.label_bank[: len(self)]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor, labels: torch.Tensor) -> None:
        """Append the rows of z (detached) with their labels, overwriting the oldest ones when full."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.dtype.is_floating_point \
                or labels.dtype == torch.bool or labels.dtype.is_complex:
            raise TypeError(f"enqueue needs a 1-D integer tensor of labels, got {getattr(labels, 'dtype', type(labels))} "
                            f"of shape {getattr(labels, 'shape', None)}")
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or labels.shape[0] != z.shape[0]:
            raise ValueError(f"enqueue takes one label per row: {labels.shape[0]} labels for rows of shape "
                             f"{getattr(z, 'shape', type(z))}")
        # The parent writes row r of the (truncated) batch at (count + r) mod size; the labels go
        # to the same slots, computed from the count before it advances.
        start = int(self.count) % self.size
        super().enqueue(z)
        labels = labels[-self.size:].to(device=self.label_bank.device, dtype=torch.long)
        first = min(labels.shape[0], self.size - start)
        self.label_bank[start:start + first] = labels[:first]
        self.label_bank[: labels.shape[0] - first] = labels[first:]

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
"""
from __future__ import annotations

import torch


class Queue(torch.nn.Module):
    """The last `size` rows passed to `enqueue`, oldest overwritten first."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        self.register_buffer("bank", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("count", torch.zeros((), dtype=torch.long, device=device))   # rows ever enqueued

    @property
    def size(self) -> int:
        return self.bank.shape[0]

    def __len__(self) -> int:
        return min(int(self.count), self.size)

    def rows(self) -> torch.Tensor:
        """The stored rows, (len(self), dim): all of the bank once it has filled up."""
        return self.bank[: len(self)]

    @torch.no_grad()
    def enqueue(self, z: torch.Tensor) -> None:
        """Append the rows of z (detached), overwriting the oldest ones when full."""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.bank.shape[1]:
            raise ValueError(f"enqueue takes a (B, {self.bank.shape[1]}) tensor, got {getattr(z, 'shape', type(z))}")
        z = z.detach()[-self.size:].to(device=self.bank.device, dtype=self.bank.dtype)
        start = int(self.count) % self.size
        first = min(z.shape[0], self.size - start)
        self.bank[start:start + first] = z[:first]
        self.bank[: z.shape[0] - first] = z[first:]
        self.count += z.shape[0]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.bank.shape[1]}, dtype={self.bank.dtype}, filled={len(self)}"

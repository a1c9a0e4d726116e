"""The memory bank of `--supervised --queue-size K`: fastalpha.Queue with the label of every row.

A labelled anchor needs to know which queue rows are its positives (same label) and which its
negatives, so the bank keeps the labels at the same FIFO positions as the rows:

    bank  = LabelledQueue(K, D)
    loss  = alpha_cl_loss(views, labels=y, queue=bank.rows(), queue_labels=bank.labels())
    bank.enqueue(z2.detach(), y)        # after the step: the rows and their labels, oldest out first

Both buffers (rows, labels) and the fill count are in `state_dict`, so a checkpoint restores
the bank exactly.
"""
from __future__ import annotations

import torch

import fastalpha


class LabelledQueue(fastalpha.Queue):
    """fastalpha.Queue labelled from the start: the label buffer exists before the first
    enqueue, so every checkpoint of the harness has it (and resumes into it), filled or not."""

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__(size, dim, dtype=dtype, device=device)
        self.label_bank = torch.zeros(size, dtype=torch.long, device=device)

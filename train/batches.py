"""Epoch order and per-rank batch slices: a DistributedSampler for data that lives in one tensor.

Each epoch draws one permutation of the N pre-training images from a seeded CPU generator (the
"data-order generator", identical on every rank) and cuts it into ⌊N / B⌋ global batches of B
images (the last partial batch is dropped, as the paper's loader does). Rank r of W takes rows
[r·B/W, (r+1)·B/W) of every global batch, so the ranks' rows, stacked in rank order, are the
global batch of a single-process run, which is the order fastalpha.distributed gathers them in.
"""
from __future__ import annotations

import torch


class BatchPlan:
    def __init__(self, num_images: int, global_batch: int, seed: int, world_size: int = 1, rank: int = 0):
        if global_batch < 2:
            raise ValueError(f"the batch must hold at least 2 images (each anchor needs a negative), got {global_batch}")
        if global_batch % world_size:
            raise ValueError(f"--batch {global_batch} must be divisible by the number of processes ({world_size})")
        if global_batch // world_size < 2:
            raise ValueError(f"--batch {global_batch} over {world_size} processes leaves fewer than 2 images per process")
        if num_images < global_batch:
            raise ValueError(f"--batch {global_batch} is larger than the dataset ({num_images} images)")
        self.num_images = num_images
        self.global_batch = global_batch
        self.world_size = world_size
        self.rank = rank
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = num_images // global_batch
        self.order_generator = torch.Generator().manual_seed(seed)

    def epoch_order(self) -> torch.Tensor:
        """The next epoch's permutation (advances the data-order generator)."""
        return torch.randperm(self.num_images, generator=self.order_generator)

    def local_indices(self, order: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """(indices of this rank's images at `step`, offset of the first one in the global batch)."""
        offset = self.rank * self.local_batch
        start = step * self.global_batch + offset
        return order[start: start + self.local_batch], offset

"""Process-group helpers for `torchrun --nproc_per_node K train/run.py ...`.

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with WORLD_SIZE > 1 the run initialises a
process group (NCCL on CUDA, Gloo on CPU), puts rank r on cuda:LOCAL_RANK, wraps the model in
DDP (BatchNorm converted to SyncBatchNorm on CUDA, so that batch statistics are those of the
global batch, as in the single-process run) and uses AlphaCLLoss(gather_distributed=True): every
anchor sees the negatives of all ranks. Only rank 0 prints and writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> Topology:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Topology(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def init(topology: Topology, device: torch.device) -> None:
    if topology.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def shutdown(topology: Topology) -> None:
    if topology.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(topology: Topology) -> None:
    if topology.enabled:
        dist.barrier()


def all_reduce_sum(values: torch.Tensor, topology: Topology) -> torch.Tensor:
    if topology.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_rows(rows: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Every rank's (B/W, D) rows stacked in rank order (the global batch's order); equal shares."""
    if not topology.enabled:
        return rows
    out = rows.new_empty((topology.world_size * rows.shape[0], rows.shape[1]))
    # torch >= 2.14 names it all_gather_single; older releases only all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, rows.contiguous())
    return out


def broadcast_object(obj, topology: Topology):
    """Rank 0's `obj` on every rank."""
    if not topology.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

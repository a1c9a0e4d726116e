"""fastalpha.CrossBatchMemory(gather_distributed=True) equals one process on the global batch.

The ranks run as threads of this process (tests/test_distributed.py's ThreadWorld standing in
for torch.distributed), with unequal batch shares. The oracle is the single-process
CrossBatchMemory on the global batch (itself checked against pml in tests/test_memory.py):
after every step each rank's memory equals it, the mean over ranks of the returned losses is
its loss, and each rank's gradient is W × its rows' share of the global gradient (DDP averages
gradients over the W ranks), for "mean" with a global count of anchors, "sum" and "none".
"""
from __future__ import annotations

import pytest
import torch

import fastalpha
import fastalpha.distributed as distributed
import fastalpha.memory as memory_module
from fastalpha.testing import assert_close

from test_distributed import ThreadWorld

F64 = torch.float64


@pytest.mark.parametrize("sizes", [(3, 5), (2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_global_batch_with_ranks_as_threads(monkeypatch, gen, sizes, reduction, masked):
    world = ThreadWorld(len(sizes))
    monkeypatch.setattr(distributed, "dist", world)
    monkeypatch.setattr(memory_module, "dist", world)
    dim, size, w = 4, 19, len(sizes)
    total = sum(sizes)
    offsets = [sum(sizes[:r]) for r in range(w)]

    def make(gather):
        loss = fastalpha.SupConLoss(0.1, reduction=reduction, backend="chunked")
        return fastalpha.CrossBatchMemory(loss, dim, size, dtype=F64, gather_distributed=gather)

    ranks = [make(True) for _ in sizes]
    single = make(False)
    for step in range(5):
        x = torch.randn(total, dim, generator=gen, dtype=F64)
        labels = torch.randint(0, 3, (total,), generator=gen)
        mask = torch.rand(total, generator=gen) < 0.5 if masked else None
        weights = torch.randn(total, generator=gen, dtype=F64)

        def rank_fn(rank):
            lo, hi = offsets[rank], offsets[rank] + sizes[rank]
            mine = x[lo:hi].clone().requires_grad_()
            loss = ranks[rank](mine, labels[lo:hi], enqueue_mask=None if mask is None else mask[lo:hi])
            loss.backward(weights[lo:hi] if reduction == "none" else None)
            return loss.detach(), mine.grad

        got = world.run(rank_fn)
        leaf = x.clone().requires_grad_()
        want = single(leaf, labels, enqueue_mask=mask)
        want.backward(weights if reduction == "none" else None)
        what = f"step {step} {reduction} {sizes}{' masked' if masked else ''}"
        for rank, (value, grad) in enumerate(got):
            lo, hi = offsets[rank], offsets[rank] + sizes[rank]
            assert all(torch.equal(a, b) for a, b in zip(ranks[rank].state_dict().values(),
                                                          single.state_dict().values())), f"{what}: memory of {rank}"
            scale = 1.0 if reduction == "none" else w
            assert_close(grad, scale * leaf.grad[lo:hi], "float64", f"{what}: gradient of rank {rank}")
            if reduction == "none":
                assert_close(value, want.detach()[lo:hi], "float64", f"{what}: losses of rank {rank}")
        if reduction != "none":
            assert_close(torch.stack([v for v, _ in got]).mean(), want, "float64", f"{what}: mean of the ranks' losses")


def test_bad_input_on_one_rank_raises_on_every_rank(monkeypatch, gen):
    world = ThreadWorld(2)
    monkeypatch.setattr(distributed, "dist", world)
    monkeypatch.setattr(memory_module, "dist", world)
    ranks = [fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1), 4, 8, dtype=F64, gather_distributed=True)
             for _ in range(2)]
    errors = []

    def rank_fn(rank):
        width = 5 if rank == 1 else 4                                  # rank 1 has the wrong D
        try:
            ranks[rank](torch.randn(3, width, dtype=F64), torch.zeros(3, dtype=torch.long))
        except ValueError as err:
            errors.append((rank, str(err)))
        return None

    world.run(rank_fn)
    assert sorted(r for r, _ in errors) == [0, 1]
    assert all(int(m.filled) == 0 for m in ranks)

    def too_large(rank):
        try:
            ranks[rank](torch.randn(5, 4, dtype=F64), torch.zeros(5, dtype=torch.long))
        except ValueError as err:
            return str(err)

    messages = world.run(too_large)
    assert all("global batch of B = 10" in m for m in messages) and all(int(m.filled) == 0 for m in ranks)

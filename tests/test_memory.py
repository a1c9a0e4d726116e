"""fastalpha.CrossBatchMemory against pytorch-metric-learning's CrossBatchMemory(SupConLoss).

pml itself is the oracle (it is in the `[test]` extra; the comparisons skip without it): step
after step, with the memory filling, filling exactly and wrapping around, the loss value, the
embeddings' gradient and the memory's contents (rows, labels, write position) equal pml's, with
and without pml's MoCo-style `enqueue_mask`. A rule other than SupCon is checked against the
loops of tests/naive.py over the memory that pml's ring would hold. Then: the memory in
state_dict, no B × K matrix at K = 65536, pml's edge conventions, and bad input (a clear error
and the memory unchanged).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastalpha
from fastalpha.rules import make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

import naive
from test_labelled_queue import queue_backend  # noqa: F401  (fixture: backends that take a labelled queue)

F64 = torch.float64


def pml_losses():
    return pytest.importorskip("pytorch_metric_learning.losses")


def random_batch(gen, batch, dim, dtype, classes):
    x = torch.randn(batch, dim, generator=gen, dtype=F64).to(dtype)
    return x, torch.randint(0, classes, (batch,), generator=gen)


def step_both(ours, theirs, x, labels, mask=None):
    """One call of each on copies of x: (our loss, our grad, their loss, their grad)."""
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    mine, pml = ours(a, labels, enqueue_mask=mask), theirs(b, labels, enqueue_mask=mask)
    mine.backward()
    pml.backward() if pml.requires_grad else None
    return mine, a.grad, pml, torch.zeros_like(b) if b.grad is None else b.grad


def assert_same_memory(ours, theirs):
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory.to(ours.embedding_memory.dtype))
    assert torch.equal(ours.label_memory, theirs.label_memory.to(torch.long))
    assert int(ours.queue_idx) == theirs.queue_idx
    assert ours.has_been_filled == theirs.has_been_filled


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("temperature", [0.07, 0.1])
@pytest.mark.parametrize("batch, size", [(12, 40), (8, 40)])   # wraps mid-batch / fills exactly at step 5
@pytest.mark.parametrize("masked", [False, True])
def test_matches_pml_step_after_step(gen, queue_backend, dtype, temperature, batch, size, masked):  # noqa: F811
    losses = pml_losses()
    name, device = queue_backend
    dim = 6
    ours = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(temperature, backend=name), dim, size, dtype=dtype)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(temperature), dim, size)
    precision = precision_of(dtype)
    spec = make_spec("infonce", temperature, eps=1.0)
    # Masked, 60% of the rows enqueue: twelve steps fill and wrap the memory too.
    for step in range(12 if masked else 7):
        x, labels = random_batch(gen, batch, dim, dtype, classes=4)
        mask = torch.rand(batch, generator=gen) < 0.6 if masked else None
        # A first memory of one label gives anchors positives but no negatives, where pml and
        # fastalpha differ by design (test_anchor_with_positives_and_no_negative_is_left_out): draw again.
        # And a call that enqueues no row makes pml 2.9 mark an unfilled memory as filled
        # (queue_idx <= prev_queue_idx in add_to_memory), so that its empty zero slots become
        # label-0 columns, where fastalpha keeps ignoring them (docs/migrating.md): draw again.
        while masked and ((step == 0 and labels[mask].unique().numel() < 2) or not mask.any()):
            mask = torch.rand(batch, generator=gen) < 0.6
        mine, grad, pml, pml_grad = step_both(ours, theirs, x, labels, mask)
        what = f"{name} step {step} τ={temperature} B={batch} K={size}{' masked' if masked else ''}"
        assert mine.dtype == dtype
        assert_close(mine, pml, precision, f"{what}: value", scale=loss_scale(x, spec))
        assert_close(grad, pml_grad, precision, f"{what}: gradient", scale=grad_scale(x, spec) / batch)
        assert_same_memory(ours, theirs)
    assert ours.has_been_filled


def pml_ring(size, dim):
    """The memory pml's ring holds, tracked independently of both libraries: (rows, labels, filled)."""
    return {"rows": torch.zeros(size, dim, dtype=F64), "labels": torch.zeros(size, dtype=torch.long), "next": 0,
            "filled": 0}


def ring_write(ring, rows, labels):
    """Write rows at next, next + 1, … (mod K); return their slots."""
    size = ring["rows"].shape[0]
    slots = [(ring["next"] + k) % size for k in range(rows.shape[0])]
    for slot, row, label in zip(slots, rows, labels):
        ring["rows"][slot], ring["labels"][slot] = row, label
    ring["next"] = (ring["next"] + rows.shape[0]) % size
    ring["filled"] = min(ring["filled"] + rows.shape[0], size)
    return slots


@pytest.mark.parametrize("rule", ["direct", "entropy", "square", "quadratic", "inverse", "infonce"])
@pytest.mark.parametrize("masked", [False, True])
def test_any_rule_against_the_loops(gen, queue_backend, rule, masked):  # noqa: F811
    """An AlphaCLLoss in the memory is the grouped loss of the batch against the filled slots
    (tests/naive.py loops), its own copy left out; "mean" over the anchors with a loss term."""
    name, device = queue_backend
    batch, size, dim = 7, 17, 5
    loss = fastalpha.AlphaCLLoss(rule=rule, eps=0.3 if rule == "infonce" else None, backend=name)
    ours = fastalpha.CrossBatchMemory(loss, dim, size, dtype=F64)
    ring = pml_ring(size, dim)
    spec = make_spec(rule, eps=0.3 if rule == "infonce" else None)
    for step in range(4):
        x, labels = random_batch(gen, batch, dim, F64, classes=3)
        mask = torch.rand(batch, generator=gen) < 0.4 if masked else torch.zeros(batch, dtype=torch.bool)
        slots = ring_write(ring, x[mask] if masked else x, labels[mask] if masked else labels)
        anchors = (~mask).nonzero().flatten().tolist()
        queue_groups = [int(ring["labels"][k]) if k < ring["filled"] else None for k in range(size)]
        own = [None] * len(anchors) if masked else [len(anchors) + s for s in slots]
        leaf = x.clone().requires_grad_()
        rows = naive.grouped_loss_rows(x[anchors].numpy(), labels[anchors].tolist(), rule, spec.temperature, spec.p,
                                       spec.gamma, spec.eps, queue=ring["rows"].numpy(), queue_groups=queue_groups,
                                       batch_columns=False, self_columns=own)
        rows = torch.tensor(rows, dtype=F64)
        active = (rows != 0).sum()
        want = rows.sum() / active if active else rows.sum()
        got = ours(leaf, labels, enqueue_mask=mask if masked else None)
        assert_close(got, want, "float64", f"{name} {rule} step {step}", scale=loss_scale(x, spec))
        got.backward()
        assert torch.isfinite(leaf.grad).all() and (not masked or not leaf.grad[mask].any())
        assert torch.equal(ours.embedding_memory, ring["rows"])


def test_the_gradient_of_a_non_supcon_rule_is_autograd_of_the_reference(gen):
    """The fused gradient of a memory call equals autograd of the float64 dense reference over the
    same groups (checks the anchor-only, ignored-slot and own-copy columns end to end)."""
    from fastalpha import positives, reference
    batch, size, dim = 6, 11, 4
    ours = fastalpha.CrossBatchMemory(fastalpha.AlphaCLLoss(rule="direct", backend="chunked"), dim, size, dtype=F64)
    ours(*random_batch(gen, batch, dim, F64, 3))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x, labels = random_batch(gen, batch, dim, F64, 3)
    leaf = x.clone().requires_grad_()
    ours(leaf, labels).backward()
    slots = (before["queue_idx"] + torch.arange(batch)) % size
    memory = before["embedding_memory"].index_copy(0, slots, x)
    memory_labels = before["label_memory"].index_copy(0, slots, labels)
    valid = torch.arange(size) < min(int(before["filled"]) + batch, size)
    groups = positives.Groups.of(labels, size, memory_labels, queue_valid=valid, batch_columns=False,
                                 self_col=batch + slots)
    oracle = x.clone().requires_grad_()
    reference.grouped_alpha_cl_loss([oracle], groups, make_spec("direct"), "mean",
                                    reference.prepare_queue(memory, True)).backward()
    assert_close(leaf.grad, oracle.grad, "float64", "gradient")


def test_memory_is_saved_in_the_state_dict(gen):
    dim, size = 5, 13
    first = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1), dim, size, dtype=F64)
    for _ in range(3):
        first(*random_batch(gen, 6, dim, F64, 3))
    state = first.state_dict()
    assert {"embedding_memory", "label_memory", "queue_idx", "filled"} <= set(state)
    second = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1), dim, size, dtype=F64)
    second.load_state_dict(state)
    for _ in range(2):
        x, labels = random_batch(gen, 6, dim, F64, 3)
        assert torch.equal(first(x, labels), second(x, labels))
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    second.reset_queue()
    assert int(second.filled) == 0 and int(second.queue_idx) == 0 and not second.embedding_memory.any()


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_batch_by_memory_matrix_at_65536(gen):
    """At K = 65536 the chunked backend takes the anchors in row chunks: no tensor of B × K
    elements exists in forward or backward; the value and gradient are pml's on a full memory."""
    losses = pml_losses()
    batch, size, dim = 128, 65536, 8
    ours = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1, backend="chunked"), dim, size)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(0.1), dim, size)
    with torch.no_grad():
        rows = torch.randn(size, dim, generator=gen)
        labels = torch.randint(0, 100, (size,), generator=gen)
        ours.embedding_memory.copy_(rows)
        ours.label_memory.copy_(labels)
        ours.filled.fill_(size)
        ours.queue_idx.fill_(size - batch // 2)                  # this batch wraps around
        theirs.embedding_memory, theirs.label_memory = rows.clone(), labels.clone()
        theirs.queue_idx, theirs.has_been_filled = size - batch // 2, True
    x, y = random_batch(gen, batch, dim, torch.float32, 100)
    a = x.clone().requires_grad_()
    with LargestTensor() as seen:
        loss = ours(a, y)
        loss.backward()
    assert seen.largest < batch * size // 2, f"a tensor of {seen.largest} elements (B × K = {batch * size})"
    b = x.clone().requires_grad_()
    pml = theirs(b, y)
    pml.backward()
    spec = make_spec("infonce", 0.1, eps=1.0)
    assert_close(loss, pml, "float32", "value", scale=loss_scale(x, spec))
    assert_close(a.grad, b.grad, "float32", "gradient", scale=grad_scale(x, spec) / batch)
    assert_same_memory(ours, theirs)


@pytest.mark.parametrize("labels, mask", [
    ([3, 3, 3, 3, 3], None),                                    # one label: no negatives anywhere
    ([0, 1, 2, 3, 4], None),                                    # all singletons: no positives
    ([0, 1], None),                                             # one negative pair per anchor
    ([0, 1, 0], [True, True, False]),                           # one positive pair and one negative pair
    ([5, 5, 6, 6, 7], [True, False, False, True, False]),       # anchors not in memory
    ([1, 2, 1, 2], [True, True, True, True]),                   # every row only enqueues
])
def test_pml_edge_cases(gen, labels, mask):
    """pml's conventions where the sets are degenerate: 0 with a zero gradient when there is no
    positive or no negative pair, or at most one pair of each (GenericPairLoss)."""
    losses = pml_losses()
    dim, size = 4, 9
    ours = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1, backend="chunked"), dim, size, dtype=F64)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(0.1), dim, size)
    labels = torch.tensor(labels)
    mask = None if mask is None else torch.tensor(mask)
    x = torch.randn(len(labels), dim, generator=gen, dtype=F64)
    mine, grad, pml, pml_grad = step_both(ours, theirs, x, labels, mask)
    spec = make_spec("infonce", 0.1, eps=1.0)
    # Tolerances from the problem's scale (a near-cancelling gradient is not its own scale).
    assert_close(mine, torch.as_tensor(pml, dtype=F64), "float64", "value", scale=loss_scale(x, spec))
    assert_close(grad, pml_grad, "float64", "gradient", scale=grad_scale(x, spec) / len(labels))
    assert_same_memory(ours, theirs)


def test_anchor_with_positives_and_no_negative_is_left_out(gen):
    """Documented difference (docs/migrating.md): with enqueue_mask and a memory of one label, an
    anchor of that label has positives but no negative; fastalpha gives it no loss term (the
    rule of every fastalpha loss), pml counts log Σ_p e^{cos_ip/τ} − mean_p cos_ip/τ for it."""
    dim = 3
    ours = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1, backend="chunked"), dim, 8, dtype=F64)
    x = torch.randn(4, dim, generator=gen, dtype=F64, requires_grad=True)
    loss = ours(x, torch.tensor([0, 0, 0, 1]), enqueue_mask=torch.tensor([True, True, False, False]))
    loss.backward()
    assert loss.item() == 0.0 and not x.grad.any()


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


BAD_CALLS = [
    (lambda g: (torch.randn(10, 4, generator=g, dtype=F64), torch.zeros(10, dtype=torch.long)), ValueError,
     "larger than the memory"),
    (lambda g: (torch.randn(3, 5, generator=g, dtype=F64), torch.zeros(3, dtype=torch.long)), ValueError,
     "embedding_size = 4"),
    (lambda g: (torch.randn(2, 3, 4, generator=g, dtype=F64), torch.zeros(3, dtype=torch.long)), ValueError, "2-D"),
    (lambda g: (torch.randn(3, 4, generator=g, dtype=F64), torch.zeros(2, dtype=torch.long)), ValueError,
     "length B = 3"),
    (lambda g: (torch.randn(3, 4, generator=g, dtype=F64), torch.zeros(3)), TypeError, "integer dtype"),
    (lambda g: (torch.randn(3, 4, generator=g, dtype=F64), [0, 1, 2]), TypeError, "torch.Tensor"),
    (lambda g: (torch.randint(0, 3, (3, 4), generator=g), torch.zeros(3, dtype=torch.long)), TypeError, "floating"),
    (lambda g: (torch.randn(3, 4, generator=g, dtype=F64), torch.zeros(3, dtype=torch.long, device="meta")),
     ValueError, "device"),
    (lambda g: (torch.randn(0, 4, dtype=F64), torch.zeros(0, dtype=torch.long)), ValueError, "B >= 1"),
]
BAD_MASKS = [
    (torch.tensor([1, 0, 1]), TypeError, "bool"),
    (torch.tensor([True, False]), ValueError, r"shape \(B,\)"),
    (torch.tensor([True, False, True], device="meta"), ValueError, "device"),
]


def assert_bad_call_leaves_the_memory_unchanged(gen, call, error, message):
    """`call(xbm)` on a memory that has seen one batch raises `error` and changes no buffer."""
    xbm = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1), 4, 8, dtype=F64)
    xbm(torch.randn(5, 4, generator=gen, dtype=F64), torch.randint(0, 2, (5,), generator=gen))
    before = snapshot(xbm)
    with pytest.raises(error, match=message):
        call(xbm)
    assert all(torch.equal(v, before[k]) for k, v in xbm.state_dict().items())


@pytest.mark.parametrize("make, error, message", BAD_CALLS)
def test_bad_input_leaves_the_memory_unchanged(gen, make, error, message):
    assert_bad_call_leaves_the_memory_unchanged(gen, lambda xbm: xbm(*make(gen)), error, message)


@pytest.mark.parametrize("mask, error, message", BAD_MASKS)
def test_bad_enqueue_mask_leaves_the_memory_unchanged(gen, mask, error, message):
    def call(xbm):
        xbm(torch.randn(3, 4, generator=gen, dtype=F64), torch.zeros(3, dtype=torch.long), enqueue_mask=mask)
    assert_bad_call_leaves_the_memory_unchanged(gen, call, error, message)


def test_bad_construction():
    with pytest.raises(TypeError, match="fastalpha loss module"):
        fastalpha.CrossBatchMemory(torch.nn.MSELoss(), 4, 8)
    with pytest.raises(ValueError, match="negatives='all'"):
        fastalpha.CrossBatchMemory(fastalpha.AlphaCLLoss(negatives="cross"), 4, 8)
    with pytest.raises(ValueError, match="memory_size"):
        fastalpha.CrossBatchMemory(fastalpha.SupConLoss(), 4, 0)
    with pytest.raises(ValueError, match="embedding_size"):
        fastalpha.CrossBatchMemory(fastalpha.SupConLoss(), True, 8)
    with pytest.raises(TypeError, match="dtype"):
        fastalpha.CrossBatchMemory(fastalpha.SupConLoss(), 4, 8, dtype=torch.int64)
    learnable = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="constant temperature"):
        fastalpha.CrossBatchMemory(fastalpha.AlphaCLLoss(rule="infonce", temperature=learnable), 4, 8)


@pytest.mark.parametrize("masked", [False, True])
def test_compiles_into_one_graph_that_never_recompiles_while_filling(gen, masked):
    """torch.compile(fullgraph=True) traces the call (enqueue included), compiles once for the
    filling, full and wrapped memory and any label values, and equals eager step after step."""
    torch._dynamo.reset()
    batch, size, dim = 6, 20, 4
    compiled_memory, eager_memory = (
        fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1, backend="chunked"), dim, size, dtype=F64) for _ in range(2))

    def step(memory, x, labels, mask):
        return memory(x, labels, enqueue_mask=mask)

    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(8):
            x, labels = random_batch(gen, batch, dim, F64, classes=3)
            mask = torch.rand(batch, generator=gen) < 0.7 if masked else None
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            got, want = compiled(compiled_memory, a, labels, mask), step(eager_memory, b, labels, mask)
            got.backward()
            want.backward()
            assert_close(got, want, "float64", "compiled value")
            assert_close(a.grad, b.grad, "float64", "compiled gradient")
            assert all(torch.equal(u, v) for u, v in zip(compiled_memory.state_dict().values(),
                                                          eager_memory.state_dict().values()))
    assert compiled_memory.has_been_filled
    assert counter.frame_count == 1 and counter.op_count > 0, (counter.frame_count, counter.op_count)
    torch._dynamo.reset()


def test_a_batch_of_one_leaves_its_own_copy_out(gen):
    """Documented difference (docs/migrating.md): pml 2.9 does not remove the self-comparison
    for a batch of one row (its single anchor keeps its own copy as a positive); fastalpha
    leaves the own copy out for every batch size, as for B > 1 (the naive loops' sets)."""
    dim, size = 4, 10
    ours = fastalpha.CrossBatchMemory(fastalpha.SupConLoss(0.1, backend="chunked"), dim, size, dtype=F64)
    ours(*random_batch(gen, 5, dim, F64, classes=2))
    x = torch.randn(1, dim, generator=gen, dtype=F64)
    label = ours.label_memory[:1].clone()                      # a label the memory holds: a positive exists
    slot = int(ours.queue_idx)
    got = ours(x, label)
    memory, labels = ours.embedding_memory.clone(), ours.label_memory.clone()
    queue_groups = [int(labels[k]) if k < 6 else None for k in range(size)]
    rows = naive.grouped_loss_rows(x.numpy(), label.tolist(), "infonce", 0.1, eps=1.0, queue=memory.numpy(),
                                   queue_groups=queue_groups, batch_columns=False, self_columns=[1 + slot])
    assert_close(got, torch.tensor(rows[0], dtype=F64), "float64", "B = 1")

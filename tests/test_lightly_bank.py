"""fastalpha.NTXentLoss(temperature, memory_bank_size=(K, D)) against lightly's NTXentLoss with a
memory bank.

lightly itself is the oracle where it is installed (the `[peers]` extra; those comparisons skip
without it): once lightly's bank holds only real rows (it starts from random ones, fastalpha
from an empty bank), the value, both views' gradients and the bank's contents equal lightly's
step after step. Before that, and without lightly, the oracle is a dense float64 torch
reference of lightly's documented semantics (`lightly_reference`): anchors out0, positive
out1[i], negatives the bank's rows from before the call, cross-entropy with the positive in the
denominator, mean over the N anchors. Also: the bank's writes (lightly's: a batch that reaches
the end fills it and the rest is dropped), no update without grad, one-directional anchors cost
N anchor rows, state_dict, lightly's errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastalpha
from fastalpha import dispatch, ops
from fastalpha.rules import make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

from test_backends import _backend as available_backend

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def bank_backend(request):
    """(name, device) of an available backend that takes negatives='none' with a queue."""
    name, device = available_backend(request.param)
    ok, reason = dispatch.supports(name, "none", True)
    if not ok:
        pytest.skip(reason)
    return name, device


def lightly_reference(out0, out1, bank_rows, temperature):
    """lightly's loss with the given (real) bank rows, dense, by autograd: the test's oracle."""
    a, p = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(a * p).sum(1, keepdim=True), a @ F.normalize(bank_rows, dim=1).T], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


def lightly_ring_write(ring, rows):
    """lightly's _dequeue_and_enqueue, tracked here: (bank, ptr, filled)."""
    bank, ptr = ring["bank"], ring["ptr"]
    size, batch = bank.shape[0], rows.shape[0]
    if ptr + batch >= size:
        bank[ptr:] = rows[: size - ptr]
        ring["ptr"] = 0
    else:
        bank[ptr:ptr + batch] = rows
        ring["ptr"] = ptr + batch
    ring["filled"] = max(ring["filled"], min(ptr + batch, size))


def grads_of(loss, out0, out1):
    if not loss.requires_grad:
        return torch.zeros_like(out0), torch.zeros_like(out1)
    return torch.autograd.grad(loss, (out0, out1))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("batch, size", [(12, 40), (7, 21), (12, 10)])   # drops a tail / fills exactly / B > K
def test_matches_lightly_semantics_step_after_step(gen, bank_backend, dtype, temperature, batch, size):
    """Against the dense reference of lightly's semantics from the first step, and against
    lightly itself (value, both gradients, bank) from the step its bank holds only real rows."""
    name, device = bank_backend
    dim = 5
    ours = fastalpha.NTXentLoss(temperature, memory_bank_size=(size, dim), backend=name).to(dtype)
    try:
        from lightly.loss import NTXentLoss as LightlyNTXent
        theirs = LightlyNTXent(temperature, memory_bank_size=(size, dim)).to(dtype)
    except ImportError:
        theirs = None
    ring = {"bank": torch.zeros(size, dim, dtype=F64), "ptr": 0, "filled": 0}
    precision = precision_of(dtype)
    spec = make_spec("infonce", temperature, eps=1.0)
    lightly_real = False
    for step in range(8):
        x0 = torch.randn(batch, dim, generator=gen, dtype=F64)
        x1 = x0 + 0.5 * torch.randn(batch, dim, generator=gen, dtype=F64)
        out0, out1 = x0.to(dtype).requires_grad_(), x1.to(dtype).requires_grad_()
        loss = ours(out0, out1)
        grad0, grad1 = grads_of(loss, out0, out1)
        what = f"{name} step {step} τ={temperature} B={batch} K={size}"
        scale, gscale = loss_scale(x0, spec), grad_scale(x0, spec) / batch
        r0, r1 = x0.clone().requires_grad_(), x1.clone().requires_grad_()
        if ring["filled"]:
            want = lightly_reference(r0, r1, ring["bank"][: ring["filled"]], temperature)
            want_grads = torch.autograd.grad(want, (r0, r1))
        else:                   # an empty bank: no negatives, 0 with a zero gradient
            want, want_grads = torch.zeros((), dtype=F64), (torch.zeros_like(r0), torch.zeros_like(r1))
        assert loss.dtype == dtype
        assert_close(loss, want, precision, f"{what}: value", scale=scale)
        assert_close(grad0, want_grads[0], precision, f"{what}: out0 gradient", scale=gscale)
        assert_close(grad1, want_grads[1], precision, f"{what}: out1 gradient", scale=gscale)
        if theirs is not None:
            t0, t1 = out0.detach().clone().requires_grad_(), out1.detach().clone().requires_grad_()
            pml = theirs(t0, t1)
            if lightly_real:
                their_grads = torch.autograd.grad(pml, (t0, t1))
                assert_close(loss, pml, precision, f"{what}: value vs lightly", scale=scale)
                assert_close(grad0, their_grads[0], precision, f"{what}: out0 gradient vs lightly", scale=gscale)
                assert_close(grad1, their_grads[1], precision, f"{what}: out1 gradient vs lightly", scale=gscale)
        lightly_ring_write(ring, F.normalize(x1, dim=1))
        bank = ours.memory_bank
        assert int(bank.filled) == ring["filled"] and int(bank.bank_ptr) == ring["ptr"]
        assert_close(bank.bank[: ring["filled"]], ring["bank"][: ring["filled"]], precision, f"{what}: bank")
        if theirs is not None:
            filled = ring["filled"]
            assert torch.equal(bank.bank[:filled], theirs.memory_bank.bank[:filled])
            assert int(theirs.memory_bank.bank_ptr) == int(bank.bank_ptr)
            lightly_real = lightly_real or ring["ptr"] == 0    # the first wrap: every slot written
    assert lightly_real or theirs is None


def test_lightly_is_installed_where_the_peers_extra_is():
    """Reports (as a skip) whether the lightly comparisons above ran."""
    pytest.importorskip("lightly.loss")


def test_no_update_without_grad(gen):
    """lightly updates the bank only when out0 requires grad (an evaluation call leaves it)."""
    loss = fastalpha.NTXentLoss(0.2, memory_bank_size=(9, 3))
    loss(torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(4, 3, generator=gen))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with torch.no_grad():
        first = loss(torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen))
    out1 = torch.randn(4, 3, generator=gen, requires_grad=True)
    second = loss(torch.randn(4, 3, generator=gen), out1)        # out1 requires grad, out0 does not
    assert first.item() > 0 and second.requires_grad
    assert all(torch.equal(v, before[k]) for k, v in loss.state_dict().items())


def test_one_directional_anchors_cost_n_rows(gen, monkeypatch, bank_backend):
    """The fused op runs over the N anchor rows [0, N) of Z = [out0; out1], not 2N."""
    name, device = bank_backend
    seen = []
    real = ops.call_fused

    def spy(z, spec, backend, row_lo, row_hi, *args, **kwargs):
        seen.append((z.shape[0], row_lo, row_hi))
        return real(z, spec, backend, row_lo, row_hi, *args, **kwargs)

    monkeypatch.setattr(ops, "call_fused", spy)
    loss = fastalpha.NTXentLoss(0.3, memory_bank_size=(16, 4), backend=name)
    for _ in range(2):
        out0 = torch.randn(5, 4, generator=gen, requires_grad=True)
        loss(out0, torch.randn(5, 4, generator=gen)).backward()
    if name != "eager":
        assert seen and all(rows == (10, 0, 5) for rows in seen), seen


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_second_derivatives(gen, reduction):
    """"none" gives the N anchors' losses; a create_graph backward is exact (the dense reference
    over the same N anchors)."""
    bank_rows = torch.randn(6, 3, generator=gen, dtype=F64)
    out0 = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    out1 = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
    results = []
    for backend in ("chunked", "eager"):
        loss = fastalpha.NTXentLoss(0.4, memory_bank_size=(6, 3), reduction=reduction, backend=backend).double()
        loss.memory_bank.enqueue(F.normalize(bank_rows, dim=1))
        value = loss(out0, out1)
        assert value.shape == ((4,) if reduction == "none" else ())
        weights = torch.arange(1.0, 5.0, dtype=F64) if reduction == "none" else torch.ones((), dtype=F64)
        g0, = torch.autograd.grad((value * weights).sum(), out0, create_graph=True)
        hvp, = torch.autograd.grad(g0.square().sum(), out1)
        results.append((value.detach(), g0.detach(), hvp))
    want = lightly_reference(out0, out1, bank_rows, 0.4) * 4 if reduction == "sum" else None
    if want is not None:
        assert_close(results[0][0], want, "float64", "sum")
    for got, expected, what in zip(results[0], results[1], ("value", "gradient", "second derivative")):
        assert_close(got, expected, "float64", what)


def test_learnable_temperature(gen, bank_backend):
    """A learnable τ (a 0-dim tensor with requires_grad) gets lightly's gradient with a bank."""
    name, device = bank_backend
    bank_rows = torch.randn(7, 3, generator=gen, dtype=F64)
    out0 = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    out1 = torch.randn(5, 3, generator=gen, dtype=F64, requires_grad=True)
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    loss = fastalpha.NTXentLoss(tau, memory_bank_size=(7, 3), backend=name).double()
    loss.memory_bank.enqueue(F.normalize(bank_rows, dim=1))
    got = torch.autograd.grad(loss(out0, out1), (out0, out1, tau))
    want = torch.autograd.grad(lightly_reference(out0, out1, bank_rows, tau), (out0, out1, tau))
    for g, w, what in zip(got, want, ("out0", "out1", "τ")):
        assert_close(g, w, "float64", f"{name}: {what} gradient")


def test_bank_in_state_dict(gen):
    first = fastalpha.NTXentLoss(0.2, memory_bank_size=(10, 3)).double()
    for _ in range(3):
        first(torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True), torch.randn(4, 3, generator=gen, dtype=F64))
    second = fastalpha.NTXentLoss(0.2, memory_bank_size=(10, 3)).double()
    second.load_state_dict(first.state_dict())
    for _ in range(3):
        out0 = torch.randn(4, 3, generator=gen, dtype=F64, requires_grad=True)
        out1 = torch.randn(4, 3, generator=gen, dtype=F64)
        assert torch.equal(first(out0, out1), second(out0, out1))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert fastalpha.NTXentLoss(0.2).state_dict() == {}          # no bank: the module has no state, as before


def test_without_a_bank_it_is_the_symmetric_loss(gen):
    z1, z2 = (torch.randn(5, 4, generator=gen, dtype=F64) for _ in range(2))
    for size in (0, (0, 4)):
        loss = fastalpha.NTXentLoss(0.3, memory_bank_size=size)
        assert loss.memory_bank is None
        assert torch.equal(loss(z1, z2), fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=0.3, eps=1.0))


LIGHTLY_INT_ERROR = ("Memory bank size 'size=128' does not specify the feature dimension. Set it with "
                     "'size=(128, dim)', or pass 'size=0' to disable the memory bank.")


def test_lightly_errors():
    with pytest.raises(ValueError) as ours:
        fastalpha.NTXentLoss(memory_bank_size=128)
    assert str(ours.value) == LIGHTLY_INT_ERROR
    try:
        from lightly.loss import NTXentLoss as LightlyNTXent
    except ImportError:
        pass
    else:
        with pytest.raises(ValueError) as theirs:
            LightlyNTXent(memory_bank_size=128)
        assert str(theirs.value) == str(ours.value)
    with pytest.raises(ValueError, match="non-negative"):
        fastalpha.NTXentLoss(memory_bank_size=(-1, 4))
    with pytest.raises(ValueError, match="num_features, dim"):
        fastalpha.NTXentLoss(memory_bank_size=(4, 4, 4))
    for bad in ("8", 1.5, (8, 4.0), True):
        with pytest.raises(TypeError, match="memory_bank_size"):
            fastalpha.NTXentLoss(memory_bank_size=bad)
    assert fastalpha.NTXentLoss(memory_bank_size=[np.int64(8), 4]).memory_bank.bank.shape == (8, 4)


def test_bad_input_leaves_the_bank_unchanged(gen):
    loss = fastalpha.NTXentLoss(0.2, memory_bank_size=(8, 3))
    loss(torch.randn(3, 3, generator=gen, requires_grad=True), torch.randn(3, 3, generator=gen))
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    z = torch.randn(3, 3, generator=gen, requires_grad=True)
    cases = [
        ((torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)), {}, ValueError, "D = 3"),
        ((z, torch.randn(2, 3)), {}, ValueError, "same shape"),
        ((z, torch.randn(3, 3, dtype=F64)), {}, TypeError, "dtype"),
        ((z, torch.randn(3, 3)), {"queue": torch.randn(4, 3)}, ValueError, "no queue"),
        ((z, torch.randn(3, 3)), {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, "labels"),
        ((torch.randn(3, 3, 1), torch.randn(3, 3, 1)), {}, ValueError, "2-D"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            loss(*args, **kwargs)
        assert all(torch.equal(v, before[k]) for k, v in loss.state_dict().items())


@pytest.mark.parametrize("sizes", [(3, 5), (2, 4, 1)], ids=lambda s: "x".join(map(str, s)))
def test_gather_distributed_banks_stay_equal(monkeypatch, gen, sizes):
    """lightly's gather_distributed with a bank: every rank's out1 enters every rank's bank
    (any shares), so the banks stay equal; each rank's loss is its own batch's against the bank
    (ranks as threads: tests/test_distributed.py's ThreadWorld)."""
    import fastalpha.distributed as distributed
    from test_distributed import ThreadWorld

    world = ThreadWorld(len(sizes))
    monkeypatch.setattr(distributed, "dist", world)
    dim, size, total = 3, 17, sum(sizes)
    offsets = [sum(sizes[:r]) for r in range(len(sizes))]
    ranks = [fastalpha.NTXentLoss(0.2, memory_bank_size=(size, dim), gather_distributed=True,
                                  backend="chunked").double() for _ in sizes]
    ring = {"bank": torch.zeros(size, dim, dtype=F64), "ptr": 0, "filled": 0}
    for step in range(4):
        x0 = torch.randn(total, dim, generator=gen, dtype=F64)
        x1 = torch.randn(total, dim, generator=gen, dtype=F64)

        def rank_fn(rank):
            lo, hi = offsets[rank], offsets[rank] + sizes[rank]
            out0, out1 = x0[lo:hi].clone().requires_grad_(), x1[lo:hi].clone().requires_grad_()
            loss = ranks[rank](out0, out1)
            return loss.detach(), torch.autograd.grad(loss, (out0, out1)) if loss.requires_grad else None

        got = world.run(rank_fn)
        for rank, (value, grads) in enumerate(got):
            lo, hi = offsets[rank], offsets[rank] + sizes[rank]
            if ring["filled"]:
                r0, r1 = x0[lo:hi].clone().requires_grad_(), x1[lo:hi].clone().requires_grad_()
                want = lightly_reference(r0, r1, ring["bank"][: ring["filled"]], 0.2)
                assert_close(value, want, "float64", f"step {step} rank {rank}")
                for g, w in zip(grads, torch.autograd.grad(want, (r0, r1))):
                    assert_close(g, w, "float64", f"step {step} rank {rank} gradient")
            else:
                assert value.item() == 0.0
        lightly_ring_write(ring, F.normalize(x1, dim=1))
        for rank in ranks:
            assert int(rank.memory_bank.filled) == ring["filled"]
            assert_close(rank.memory_bank.bank[: ring["filled"]], ring["bank"][: ring["filled"]], "float64", "bank")
            assert torch.equal(rank.memory_bank.bank, ranks[0].memory_bank.bank)

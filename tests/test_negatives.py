"""Negative sets beyond SimCLR: two towers ("cross"), queues (MoCo), a learnable temperature.

The oracle for values is an independent loop over explicit index sets J_i (tests/naive.py's
per-row α formulas, given |J_i|); gradients are compared with float64 autograd of the dense
reference, whose values the loops pin down. Every backend that declares support for a mode
is checked; the others must refuse it by name.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import background
import fastalpha
import naive
from fastalpha import dispatch, reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close

MODES = [("all", 0), ("all", 3), ("cross", 0), ("cross", 3), ("none", 3)]


def backends_supporting(negatives: str, has_queue: bool) -> list:
    """Backends to check here; the SimCLR set on the fused kernels is tests/test_backends.py's."""
    if negatives == "all" and not has_queue:
        return ["eager", "chunked"]
    names = []
    for name, (ok, _) in fastalpha.available_backends().items():
        if ok and dispatch.backend_status(name, torch.device("cpu"))[0] and dispatch.supports(name, negatives, has_queue)[0]:
            names.append(name)
    return names


def loop_negatives(i: int, n: int, negatives: str, k: int) -> list:
    """J_i written out: row indices of Z (0..M-1), then queue rows as M..M+K-1."""
    m = 2 * n
    partner = (i + n) % m
    if negatives == "all":
        in_z = [j for j in range(m) if j not in (i, partner)]
    elif negatives == "cross":
        other = range(n, m) if i < n else range(n)
        in_z = [j for j in other if j != partner]
    else:
        in_z = []
    return in_z + [m + q for q in range(k)]


def loop_losses(z1, z2, queue, rule, tau, p, gamma, eps, normalize, negatives):
    """Per-anchor losses by explicit loops (numpy float64)."""
    z = naive.stacked(z1, z2)
    n, m = len(z1), len(z)
    rows = z if queue is None else np.concatenate([z, np.asarray(queue, dtype=np.float64)], 0)
    d2 = naive.distances(rows, normalize)
    out = []
    for i in range(m):
        neg = loop_negatives(i, n, negatives, len(rows) - m)
        d2_pos = d2[i, (i + n) % m]
        if rule == "infonce":
            out.append(math.log(eps + sum(math.exp((d2_pos - d2[i, j]) / tau) for j in neg)))
            continue
        # naive.alpha_row counts |J_i| as (its m) − 2.
        alpha = naive.alpha_row(d2[i], d2_pos, neg, len(neg) + 2, rule, tau, p, gamma, eps)
        out.append(sum(alpha[j] * (d2_pos - d2[i, j]) for j in neg))
    return np.array(out)


def _inputs(gen, n, d, k, dtype=torch.float64):
    z1 = torch.randn(n, d, generator=gen, dtype=dtype)
    z2 = z1 + 0.7 * torch.randn(n, d, generator=gen, dtype=dtype)
    queue = torch.randn(k, d, generator=gen, dtype=dtype) if k else None
    return z1, z2, queue


RULE_PARAMS = {"quadratic": {}, "entropy": dict(eps=0.5), "direct": dict(eps=0.3), "inverse": {},
               "square": dict(temperature=1.0), "infonce": dict(eps=1.0)}


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
def test_values_match_explicit_loops(gen, rule, negatives, k, normalize):
    z1, z2, queue = _inputs(gen, 5, 4, k)
    spec = make_spec(rule, normalize=normalize, negatives=negatives, **RULE_PARAMS[rule])
    expected = loop_losses(z1.numpy(), z2.numpy(), None if queue is None else queue.numpy(), rule, spec.temperature,
                           spec.p, spec.gamma, spec.eps, normalize, negatives)
    for backend in backends_supporting(negatives, queue is not None):
        got = fastalpha.alpha_cl_loss(z1, z2, rule, normalize=normalize, reduction="none", backend=backend,
                                      negatives=negatives, queue=queue, **RULE_PARAMS[rule])
        assert_close(got, torch.from_numpy(expected), "float64", f"{backend} {rule} {negatives} K={k}")


@pytest.mark.parametrize("negatives,k", MODES)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("detach_alpha", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_match_reference_autograd(gen, rule, negatives, k, detach_alpha, reduction):
    n = 7
    z1, z2, queue = _inputs(gen, n, 5, k)
    weights = torch.rand(2 * n, generator=gen, dtype=torch.float64)
    kwargs = dict(rule=rule, detach_alpha=detach_alpha, negatives=negatives, **RULE_PARAMS[rule])

    def loss_and_grads(backend):
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        q = None if queue is None else queue.clone().requires_grad_()
        out = fastalpha.alpha_cl_loss(a, b, reduction=reduction, backend=backend, queue=q, **kwargs)
        total = out if reduction == "mean" else (out * weights).sum()
        grads = torch.autograd.grad(total, (a, b) + ((q,) if q is not None else ()), allow_unused=True)
        return total, grads

    ref_total, ref_grads = loss_and_grads("eager")
    for backend in backends_supporting(negatives, queue is not None):
        total, grads = loss_and_grads(backend)
        assert_close(total, ref_total, "float64", f"{backend} loss")
        assert_close(grads[0], ref_grads[0], "float64", f"{backend} grad z1")
        assert_close(grads[1], ref_grads[1], "float64", f"{backend} grad z2")
        if queue is not None:
            assert grads[2] is None, f"{backend}: the queue received a gradient"


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_cross_infonce_is_clip_loss(gen, tau):
    """With ε = 1 and unit rows, negatives='cross' is ½[CE(z1 z2ᵀ/τ) + CE(z2 z1ᵀ/τ)] (two encoders)."""
    n = 9
    z1 = torch.randn(n, 6, generator=gen, dtype=torch.float64)
    z2 = torch.randn(n, 6, generator=gen, dtype=torch.float64) * 3 + 1     # another tower: other scale
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    labels = torch.arange(n)
    logits = a @ b.T / tau
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    for backend in backends_supporting("cross", False):
        got = fastalpha.InfoNCELoss(temperature=tau, negatives="cross", backend=backend)(z1, z2)
        assert_close(got, clip, "float64", f"{backend} CLIP")


def test_queue_matches_lightly_memory_bank_convention(gen):
    """lightly's NTXentLoss(memory_bank_size=K)(out0, out1) takes out0's rows as anchors, out1's
    as positives and the bank as the only negatives, with the positive in the denominator:
    that is the mean of fastalpha's first N per-anchor losses with negatives='none', ε = 1.
    (fastalpha also averages the N anchors of the second view; lightly does not.)"""
    n, k, tau = 6, 11, 0.2
    out0, out1, bank = (torch.randn(r, 8, generator=gen, dtype=torch.float64) for r in (n, n, k))
    a, b, q = F.normalize(out0, dim=1), F.normalize(out1, dim=1), F.normalize(bank, dim=1)
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ q.T], 1) / tau
    lightly_style = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
    rows = fastalpha.alpha_cl_loss(out0, out1, rule="infonce", temperature=tau, eps=1.0, negatives="none", queue=bank,
                                   reduction="none")
    assert_close(rows[:n].mean(), lightly_style, "float64", "first-view anchors")


@pytest.mark.parametrize("k", [0, 4])
def test_learnable_temperature_for_infonce_on_every_backend(gen, k):
    z1, z2, queue = _inputs(gen, 6, 5, k)
    for negatives in ("all", "cross"):
        tau_ref = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        spec = make_spec("infonce", negatives=negatives).with_(temperature=tau_ref)
        ref = reference.alpha_cl_loss(z1, z2, spec, "mean", queue)
        (expected,) = torch.autograd.grad(ref, tau_ref)
        for backend in backends_supporting(negatives, queue is not None):
            tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
            loss = fastalpha.alpha_cl_loss(z1, z2, "infonce", temperature=tau, negatives=negatives, queue=queue, backend=backend)
            (got,) = torch.autograd.grad(loss, tau)
            assert_close(loss, ref, "float64", f"{backend} loss")
            assert_close(got, expected, "float64", f"{backend} dL/dtau")


def test_learnable_temperature_gradient_by_finite_differences(gen):
    z1, z2, _ = _inputs(gen, 5, 4, 0)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: fastalpha.alpha_cl_loss(z1, z2, "infonce", temperature=t, backend="chunked"),
                                    (tau,))
    assert torch.autograd.gradcheck(
        lambda t: fastalpha.alpha_cl_loss(z1, z2, "entropy", temperature=t, detach_alpha=False, backend="eager"), (tau,))


def test_learnable_temperature_errors(gen):
    z1, z2, _ = _inputs(gen, 4, 3, 0)
    tau = torch.tensor(0.5, requires_grad=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="detach_alpha=True"):
        fastalpha.alpha_cl_loss(z1, z2, "direct", temperature=tau)
    with pytest.raises(ValueError, match="backend='eager'"):
        fastalpha.alpha_cl_loss(z1, z2, "direct", temperature=tau, detach_alpha=False, backend="chunked")


def test_bad_negatives_and_queue_arguments(gen):
    z1, z2, queue = _inputs(gen, 4, 3, 2)
    with pytest.raises(ValueError, match="queue"):
        fastalpha.alpha_cl_loss(z1, z2, negatives="none")
    with pytest.raises(ValueError, match="negatives"):
        fastalpha.alpha_cl_loss(z1, z2, negatives="others")
    with pytest.raises(ValueError, match=r"\(K, D\)"):
        fastalpha.alpha_cl_loss(z1, z2, queue=torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="queue"):
        fastalpha.alpha_cl_loss(z1, z2, queue=torch.ones(5, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="queue"):
        fastalpha.alpha_cl_loss(z1, z2, queue=np.ones((5, 3)))
    with pytest.raises(ValueError, match="negatives"):
        fastalpha.AlphaCLLoss(negatives="both")
    for name in ("cpp", "cuda", "triton"):
        ok = dispatch.backend_status(name, torch.device("cpu"))[0]
        if ok and not dispatch.supports(name, "cross", False)[0]:
            with pytest.raises(ValueError, match="does not support negatives='cross'"):
                fastalpha.alpha_cl_loss(z1, z2, negatives="cross", backend=name)


def test_no_negatives_gives_zero(gen):
    """N = 1 with "cross" has no negatives (nor has an empty queue with "none"): loss 0, zero gradient."""
    z1, z2, _ = _inputs(gen, 1, 3, 0)
    z1.requires_grad_()
    loss = fastalpha.alpha_cl_loss(z1, z2, "infonce", negatives="cross")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z1.grad, torch.zeros_like(z1))
    z1, z2, _ = _inputs(gen, 3, 3, 0)
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert fastalpha.alpha_cl_loss(z1, z2, negatives="none", queue=empty).item() == 0.0
    # One pair plus a queue does have negatives.
    z1, z2, queue = _inputs(gen, 1, 3, 4)
    assert fastalpha.alpha_cl_loss(z1, z2, "infonce", negatives="none", queue=queue).item() > 0.0


def test_queue_is_a_fifo_of_detached_rows(gen):
    bank = fastalpha.Queue(size=5, dim=3, dtype=torch.float64)
    assert len(bank) == 0 and bank.rows().shape == (0, 3)
    expected = []
    for batch in (2, 2, 4, 7, 1):
        z = torch.randn(batch, 3, generator=gen, requires_grad=True)       # float32 in, float64 stored
        bank.enqueue(z)
        expected = (expected + [row for row in z.detach().double()])[-5:]
        rows = bank.rows()
        assert not rows.requires_grad and rows.dtype == torch.float64
        assert len(bank) == len(expected)
        # FIFO: the stored set is the last `size` rows (order in the bank is ring order).
        stored = sorted(tuple(r.tolist()) for r in rows)
        assert stored == sorted(tuple(r.tolist()) for r in expected)
    state = bank.state_dict()
    again = fastalpha.Queue(size=5, dim=3, dtype=torch.float64)
    again.load_state_dict(state)
    assert torch.equal(again.rows(), bank.rows())
    with pytest.raises(ValueError, match="enqueue"):
        bank.enqueue(torch.randn(2, 4))
    with pytest.raises(ValueError, match="size"):
        fastalpha.Queue(size=0, dim=3)


_DISTRIBUTED_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    import fastalpha
    rank, world, rendezvous, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    data = torch.load(sys.argv[5])
    sizes = data["sizes"]
    lo = sum(sizes[:rank]); hi = lo + sizes[rank]
    results = {}
    for name, kwargs in data["cases"]:
        a = data["z1"][lo:hi].clone().requires_grad_()
        b = data["z2"][lo:hi].clone().requires_grad_()
        loss = fastalpha.alpha_cl_loss_distributed(a, b, queue=data["queue"] if kwargs.pop("queue") else None, **kwargs)
        loss.backward()
        results[name] = (loss.detach(), a.grad, b.grad)
    torch.save(results, f"{out}.{rank}")
    # Every rank past its last collective, then out without tearing the process group down:
    # gloo's teardown (destroy_process_group, then the interpreter's exit) aborted a rank now
    # and then ("terminate called without an active exception", SIGABRT), with or without a
    # barrier in front of it (seeds 826536612 and 901009802). The results are on disk.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")


TWO_RANK_TEST = "test_distributed_cross_and_queue_match_the_global_batch"


def start_in_background(tmp_path_factory, items) -> None:
    """Start the two gloo ranks beside the other tests (tests/background.py)."""
    if any(item.name == TWO_RANK_TEST for item in items):
        background.start(TWO_RANK_TEST, _two_ranks, tmp_path_factory.mktemp("two-ranks"))


def _two_ranks(tmp_path):
    """Inputs of the run seed, and the two ranks' results over every case."""
    from conftest import RUN_SEED

    gen = torch.Generator().manual_seed(RUN_SEED ^ zlib.crc32(TWO_RANK_TEST.encode()))
    sizes, d = [3, 2], 4
    z1, z2, queue = _inputs(gen, sum(sizes), d, 6)
    cases = [(f"{rule}-{neg}-{'q' if q else 'noq'}", dict(rule=rule, negatives=neg, queue=q, backend="chunked"))
             for rule in ("infonce", "direct", "square") for neg, q in (("cross", False), ("cross", True), ("none", True))]
    data_path = tmp_path / "data.pt"
    torch.save(dict(sizes=sizes, z1=z1, z2=z2, queue=queue, cases=cases), data_path)
    worker = tmp_path / "worker.py"
    worker.write_text(_DISTRIBUTED_WORKER)
    # A rendezvous file of this test's own, not a TCP port: a port picked here could be taken
    # by another process (another test run on this machine) before rank 0 binds it.
    rendezvous, out = str(tmp_path / "rendezvous"), str(tmp_path / "out")
    env = dict(background.environment(), PYTHONPATH=os.pathsep.join(sys.path))
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(worker), str(r), "2", rendezvous, out, str(data_path)],
                                          env=env, stdout=f, stderr=subprocess.STDOUT))
    codes = background.wait_for_ranks(procs, 300)
    failed = {r: logs[r].read_text()[-2000:] for r in range(2) if codes[r] != 0}
    parts = None if failed else [torch.load(f"{out}.{r}") for r in range(2)]
    return (z1, z2, queue), cases, (codes, failed), parts


@pytest.mark.background
def test_distributed_cross_and_queue_match_the_global_batch(tmp_path):
    """gloo, world 2, unequal shares: "cross" uses the other view's rows of every rank; the
    queue is the same on every rank, not gathered, and gets no gradient."""
    (z1, z2, queue), cases, (codes, failed), parts = background.result(TWO_RANK_TEST, _two_ranks, tmp_path)
    assert not failed, f"workers exited with {codes}; output of the failed ranks: {failed}"
    for name, kwargs in cases:
        kwargs = dict(kwargs)
        use_queue = kwargs.pop("queue")
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        expected = fastalpha.alpha_cl_loss(a, b, queue=queue if use_queue else None, **kwargs)
        expected.backward()
        # "mean": each rank returns W × its share; their mean is the global loss, and DDP's
        # averaged gradient is the global one: each rank's input gradient is W × its rows' share.
        mean_loss = sum(p[name][0] for p in parts) / 2
        assert_close(mean_loss, expected, "float64", f"{name} loss")
        got1 = torch.cat([p[name][1] for p in parts]) / 2
        got2 = torch.cat([p[name][2] for p in parts]) / 2
        assert_close(got1, a.grad, "float64", f"{name} grad z1")
        assert_close(got2, b.grad, "float64", f"{name} grad z2")

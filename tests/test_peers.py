"""Side by side with the peers' own losses, when they are installed (optional: `peers` extra).

pytorch-metric-learning's `NTXentLoss` (embeddings of both views with one label per pair) and
lightly's `NTXentLoss` / `DCLLoss` (two views) against fastalpha's `NTXentLoss` / `DCLLoss`:
value and the gradients of both views, on fresh random inputs, on every backend. Each test
is skipped when its peer is not importable.
"""
from __future__ import annotations

import pytest
import torch

import fastalpha
from fastalpha import dispatch
from fastalpha.rules import make_spec
from fastalpha.testing import assert_close, grad_scale, loss_scale, precision_of

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    device = torch.device("cuda" if name == "cuda" or (name == "triton" and torch.cuda.is_available()) else "cpu")
    ok, reason = dispatch.backend_status(name, device)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name, device


def views(gen, n, d, dtype, device):
    z1 = torch.randn(n, d, generator=gen, dtype=F64)
    z2 = z1 + torch.randn(n, d, generator=gen, dtype=F64)
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def compare(ours, theirs, z1, z2, what):
    """Value and both gradients of ours(z1, z2) and theirs(z1, z2), at the inputs' precision.

    Both sides round (in float32 the peer too), so the tolerance follows the size of the terms
    the loss and its gradient are summed from (fastalpha.testing), not the result alone.
    """
    spec = make_spec("infonce", temperature=ours.kwargs["temperature"], eps=ours.kwargs["eps"])
    stacked = torch.cat([z1, z2]).cpu()
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    pa, pb = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    got, expected = ours(a, b), theirs(pa, pb)
    precision = precision_of(z1.dtype)
    assert got.dtype == expected.dtype == z1.dtype, (got.dtype, expected.dtype)
    assert_close(got, expected, precision, f"{what} value", scale=loss_scale(stacked, spec))
    g_scale = grad_scale(stacked, spec, 1.0 / stacked.shape[0])
    for g, e, view in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(expected, (pa, pb)), ("z1", "z2")):
        assert_close(g, e, precision, f"{what} grad {view}", scale=g_scale)


DTYPES = [F64, torch.float32]
SIZES = [(2, 3), (9, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_pytorch_metric_learning_ntxent(backend, gen, dtype, n, d, temperature):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    name, device = backend
    z1, z2 = views(gen, n, d, dtype, device)
    theirs_module = losses.NTXentLoss(temperature=temperature)
    labels = torch.arange(n, device=device).repeat(2)   # row k of z1 and row k of z2 are the positive pair

    def theirs(a, b):
        return theirs_module(torch.cat([a, b]), labels)

    ours = fastalpha.NTXentLoss(temperature=temperature, backend=name)
    compare(ours, theirs, z1, z2, f"{name} vs pytorch-metric-learning NTXentLoss τ={temperature}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("n,d", SIZES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("loss_name", ["NTXentLoss", "DCLLoss"])
def test_lightly(backend, gen, dtype, n, d, temperature, loss_name):
    """fastalpha.NTXentLoss / DCLLoss against lightly's classes of the same name."""
    lightly_loss = pytest.importorskip("lightly.loss")
    name, device = backend
    z1, z2 = views(gen, n, d, dtype, device)
    ours = getattr(fastalpha, loss_name)(temperature=temperature, backend=name)
    compare(ours, getattr(lightly_loss, loss_name)(temperature=temperature), z1, z2,
            f"{name} vs lightly {loss_name} τ={temperature}")


def test_single_pair_like_the_peers():
    """A batch of one pair: the peers return 0, and so does fastalpha."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    z1, z2 = torch.randn(1, 4), torch.randn(1, 4)
    theirs = losses.NTXentLoss()(torch.cat([z1, z2]), torch.zeros(2, dtype=torch.long))
    assert theirs.item() == 0.0 == fastalpha.NTXentLoss()(z1, z2).item()

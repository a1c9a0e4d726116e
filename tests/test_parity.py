"""What users of lightly / pytorch-metric-learning expect, on every backend.

Exact second derivatives (`create_graph=True`), a batch of one pair (loss 0, zero gradient),
the loss in the input dtype, a zero embedding row with cosine 0, any real scalar as the
temperature, tiny InfoNCE losses kept to float precision, and `DCLLoss` / `NTXentLoss`
against their defining formulas. Oracles: float64 dense autograd, the naive loops of
tests/naive.py, and closed forms written here.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fastalpha
from fastalpha import dispatch, reference
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close, grad_scale, precision_of

import naive

F64 = torch.float64
BACKENDS = ["eager", "chunked", "cpp", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(name: str) -> torch.device:
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    device = _device(name)
    ok, reason = dispatch.backend_status(name, device)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    return name, device


def views(gen, n, d, dtype=F64, device="cpu", correlated=1.5):
    z1 = torch.randn(n, d, generator=gen, dtype=F64)
    z2 = z1 + torch.randn(n, d, generator=gen, dtype=F64) / correlated
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- double backward

def _grad_and_hvp(z1, z2, vectors, **kwargs):
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fastalpha.alpha_cl_loss(a, b, **kwargs)
    g1, g2 = torch.autograd.grad(loss, (a, b), create_graph=True)
    h1, h2 = torch.autograd.grad((g1 * vectors[0]).sum() + (g2 * vectors[1]).sum(), (a, b))
    return (g1.detach(), g2.detach()), (h1, h2)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("detach_alpha", [True, False])
def test_double_backward_matches_dense_autograd(backend, gen, rule, normalize, detach_alpha):
    """A Hessian-vector product through `create_graph=True` equals the one of dense float64
    autograd (the eager backend, itself checked by gradgradcheck below). A backend whose
    gradient were a constant to autograd would keep only the normalisation's term."""
    name, device = backend
    z1, z2 = views(gen, 4, 3, device=device)
    vectors = [torch.randn(z1.shape, generator=gen, dtype=F64).to(device) for _ in range(2)]
    kwargs = dict(rule=rule, normalize=normalize, detach_alpha=detach_alpha)
    grads, hvp = _grad_and_hvp(z1, z2, vectors, backend=name, **kwargs)
    exp_grads, exp_hvp = _grad_and_hvp(z1.cpu(), z2.cpu(), [v.cpu() for v in vectors], backend="eager", **kwargs)
    for got, expected, what in zip(grads + hvp, exp_grads + exp_hvp, ("grad z1", "grad z2", "Hv z1", "Hv z2")):
        assert_close(got, expected, "float64", f"{name} {rule} {what}")
    assert max(h.abs().max().item() for h in exp_hvp) > 1e-6, "the Hessian-vector product should not vanish"


@pytest.mark.parametrize("name", ["eager", "chunked", "cpp"])
@pytest.mark.parametrize("rule", ["entropy", "direct", "inverse", "infonce", "quadratic"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradgradcheck(name, rule, normalize):
    """Second derivatives against finite differences (torch.autograd.gradgradcheck), float64."""
    ok, reason = dispatch.backend_status(name, torch.device("cpu"))
    if not ok:
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(0)
    z1, z2 = views(gen, 3, 2)
    # `square` is piecewise linear in d2: finite differences may straddle a kink; its double
    # backward is covered by the Hessian-vector test above.
    def loss(a, b):
        return fastalpha.alpha_cl_loss(a, b, rule=rule, normalize=normalize, detach_alpha=False, backend=name)
    assert torch.autograd.gradgradcheck(loss, (z1.requires_grad_(), z2.requires_grad_()))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_double_backward_other_reductions(backend, gen, reduction):
    name, device = backend
    z1, z2 = views(gen, 3, 4, device=device)
    outs = {}
    for which, dev in ((name, device), ("eager", torch.device("cpu"))):
        a, b = z1.to(dev).clone().requires_grad_(), z2.to(dev).clone().requires_grad_()
        loss = fastalpha.alpha_cl_loss(a, b, rule="direct", reduction=reduction, backend=which)
        weight = torch.linspace(-1, 2, loss.numel(), dtype=F64).to(dev).reshape(loss.shape)
        (g1,) = torch.autograd.grad((loss * weight).sum(), a, create_graph=True)
        outs[which] = torch.autograd.grad(g1.square().sum(), (a, b))
    for got, expected in zip(outs[name], outs["eager"]):
        assert_close(got, expected, "float64", f"{name} {reduction} second derivative")


# ----------------------------------------------------------------------------- one pair: no negatives

@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_single_pair_gives_zero_and_zero_gradient(backend, gen, rule, reduction):
    """N = 1: no anchor has a negative, the loss is an empty sum: 0, with a zero gradient."""
    name, device = backend
    for dtype in (torch.float32, torch.bfloat16):
        z1, z2 = [v.requires_grad_() for v in views(gen, 1, 5, dtype, device)]
        loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, reduction=reduction, backend=name)
        assert loss.dtype == dtype and loss.shape == ((2,) if reduction == "none" else ())
        assert torch.equal(loss.detach().cpu().float(), torch.zeros(loss.shape)), loss
        loss.sum().backward()
        assert z1.grad is not None and z2.grad is not None
        assert torch.equal(z1.grad, torch.zeros_like(z1)) and torch.equal(z2.grad, torch.zeros_like(z2))


def test_single_pair_modules_and_zero_rows_error():
    z = torch.randn(1, 4)
    for module in (fastalpha.AlphaCLLoss(rule="square"), fastalpha.NTXentLoss(), fastalpha.DCLLoss()):
        assert module(z, z.clone()).item() == 0.0
    with pytest.raises(ValueError, match="N >= 1"):
        fastalpha.alpha_cl_loss(z[:0], z[:0])


# ----------------------------------------------------------------------------- dtype of the loss

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=lambda t: str(t).replace("torch.", ""))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_has_input_dtype(backend, gen, dtype, reduction):
    name, device = backend
    z1, z2 = [v.requires_grad_() for v in views(gen, 5, 8, dtype, device)]
    for rule in ("infonce", "square"):
        loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, reduction=reduction, backend=name)
        assert loss.dtype == dtype, f"{name} {rule} {reduction}: loss {loss.dtype} for {dtype} input"
        g1, g2 = torch.autograd.grad(loss.sum(), (z1, z2))
        assert g1.dtype == dtype and g2.dtype == dtype
        expected = reference.alpha_cl_loss(z1.detach().cpu().double(), z2.detach().cpu().double(), make_spec(rule),
                                           reduction)
        # Scale: the per-anchor losses are O(1) (unit rows, τ = 0.5 / 5): the format's absolute error.
        assert_close(loss, expected, precision_of(dtype), f"{name} {rule} value", scale=2.0 / 0.5)


# ----------------------------------------------------------------------------- a zero row

@pytest.mark.parametrize("rule", RULES)
def test_zero_row_has_cosine_zero(backend, gen, rule):
    """With normalize=True an all-zero row has cosine 0 with every row (d2 = 1), as in lightly
    and pytorch-metric-learning; compared with the naive loops, which compute the cosine from
    the raw rows. The other rows' gradients match float64 autograd."""
    name, device = backend
    z1, z2 = views(gen, 4, 5, device=device)
    z1[1] = 0.0
    z2[3] = 0.0
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    rows = fastalpha.alpha_cl_loss(a, b, rule=rule, reduction="none", backend=name)
    spec = make_spec(rule)
    expected = naive.loss_rows(z1.cpu().numpy(), z2.cpu().numpy(), rule, spec.temperature, spec.p, spec.gamma, spec.eps)
    assert_close(rows, torch.from_numpy(expected), "float64", f"{name} {rule} rows with zero rows")
    g1, g2 = torch.autograd.grad(rows.sum(), (a, b))
    _, e1, e2 = _reference_grads(z1, z2, spec)
    live = torch.ones(4, dtype=torch.bool)
    live[1] = False
    assert_close(g1[live], e1[live], "float64", f"{name} {rule} grad z1, live rows")
    live = torch.ones(4, dtype=torch.bool)
    live[3] = False
    assert_close(g2[live], e2[live], "float64", f"{name} {rule} grad z2, live rows")


def _reference_grads(z1, z2, spec):
    a, b = z1.detach().cpu().double().requires_grad_(), z2.detach().cpu().double().requires_grad_()
    rows = reference.alpha_cl_loss(a, b, spec, "none")
    return (rows.detach(), *torch.autograd.grad(rows.sum(), (a, b)))


# ----------------------------------------------------------------------------- temperature types

GOOD_TEMPERATURES = [np.float32(0.25), np.float64(0.25), np.float16(0.25), torch.tensor(0.25),
                     torch.tensor(0.25, dtype=F64), torch.tensor(0.25, dtype=torch.bfloat16), 0.25]
BAD_TEMPERATURES = [  # (value, error type)
    (np.float32(0.0), ValueError), (np.float64(-1.0), ValueError), (torch.tensor(-0.5), ValueError),
    (torch.tensor(0.0), ValueError), (np.nan, ValueError), (np.float32("nan"), ValueError),
    (torch.tensor(float("nan")), ValueError), (np.inf, ValueError), (-np.inf, ValueError),
    (torch.tensor(float("inf")), ValueError), (np.float64("-inf"), ValueError),
    (torch.tensor([0.5]), TypeError), ("0.5", TypeError), (True, TypeError), (torch.tensor(True), TypeError),
    (1 + 0j, TypeError), (torch.tensor(0.5 + 0j), TypeError),
]


@pytest.mark.parametrize("temperature", GOOD_TEMPERATURES, ids=lambda t: f"{type(t).__name__}-{getattr(t, 'dtype', '')}")
def test_temperature_accepts_any_real_scalar(backend, gen, temperature):
    name, device = backend
    z1, z2 = views(gen, 3, 4, device=device)
    for rule in ("infonce", "entropy"):
        got = fastalpha.alpha_cl_loss(z1, z2, rule=rule, temperature=temperature, backend=name)
        expected = fastalpha.alpha_cl_loss(z1, z2, rule=rule, temperature=0.25, backend=name)
        assert got.item() == expected.item(), (rule, temperature)
    module = fastalpha.InfoNCELoss(temperature=temperature, backend=name)
    assert module(z1, z2).item() == fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=0.25, backend=name).item()


@pytest.mark.parametrize("value,error", BAD_TEMPERATURES, ids=lambda v: repr(v)[:24])
def test_temperature_rejects_non_positive_non_finite_and_non_real(value, error):
    z1, z2 = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(error, match="temperature"):
        fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=value)
    with pytest.raises(error, match="temperature"):
        fastalpha.DCLLoss(temperature=value)


def test_other_parameters_accept_real_scalars():
    z1, z2 = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    assert fastalpha.alpha_cl_loss(z1, z2, rule="direct", p=np.float32(3.0), eps=torch.tensor(0.5)).item() == \
        fastalpha.alpha_cl_loss(z1, z2, rule="direct", p=3.0, eps=0.5).item()
    assert fastalpha.alpha_cl_loss(z1, z2, rule="inverse", gamma=np.int64(3)).item() == \
        fastalpha.alpha_cl_loss(z1, z2, rule="inverse", gamma=3.0).item()


# ----------------------------------------------------------------------------- tiny InfoNCE losses

def tiny_loss_views(gen, n, tau, dtype, device):
    """Each positive pair at cosine 0.5 (d2_i = 0.5) in its own plane, orthogonal to every other
    pair (d2_ij ≈ 1), rotated at random and slightly perturbed: every logit difference
    (d2_i − d2_ij)/τ ≈ −0.5/τ, so ξ_i ≈ (M − 2) e^{−0.5/τ} and loss_i = log(1 + ξ_i) ≈ ξ_i is
    tiny, while d2_i/τ = 0.5/τ is not: forming the loss as (a log-sum-exp) + d2_i/τ, a
    difference of two O(1/τ) numbers, loses the digits of ξ_i."""
    d = 2 * n + 3
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    eye = torch.eye(d, dtype=F64)
    z1 = eye[0:2 * n:2]
    z2 = 0.5 * eye[0:2 * n:2] + math.sqrt(0.75) * eye[1:2 * n:2]
    z1 = (z1 + 0.01 * torch.randn(z1.shape, generator=gen, dtype=F64)) @ rotation
    z2 = (z2 + 0.01 * torch.randn(z2.shape, generator=gen, dtype=F64)) @ rotation
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def log1p_infonce_rows(z1, z2, tau):
    """loss_i = log1p(Σ_j exp((d2_i − d2_ij)/τ)) (ε = 1) in float64 from the given values."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).cpu().double(), dim=1)
    m = z.shape[0]
    d2 = 1 - z @ z.T
    pos = d2[torch.arange(m), (torch.arange(m) + m // 2) % m]
    mask = reference.negative_mask(m)
    xi = torch.where(mask, torch.exp((pos[:, None] - d2) / tau), torch.zeros_like(d2)).sum(1)
    return torch.log1p(xi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_tiny_infonce_losses_keep_their_digits(backend, gen, dtype):
    name, device = backend
    tau, n = 0.05, 4
    z1, z2 = tiny_loss_views(gen, n, tau, dtype, device)
    rows = fastalpha.alpha_cl_loss(z1, z2, rule="infonce", temperature=tau, eps=1.0, reduction="none", backend=name)
    expected = log1p_infonce_rows(z1, z2, tau)
    assert expected.max() < 1e-2, "the input must give tiny losses"
    # A rounding error u in each logit (≤ 2/τ in size) moves ξ_i, hence loss_i ≈ ξ_i, by a
    # relative few·u·(2/τ): the tolerance follows that, relative to each tiny loss.
    unit = torch.finfo(dtype).eps
    rtol = 8 * unit * (2 / tau)
    error = ((rows.detach().cpu().double() - expected).abs() / expected).max().item()
    assert error <= rtol, f"{name} tiny infonce losses: relative error {error:.3g} > {rtol:.3g}"
    if dtype == torch.float32:
        # The test can fail: the difference form in float32 misses by far more than rtol.
        z = torch.nn.functional.normalize(torch.cat([z1, z2]).cpu().float(), dim=1)
        m = z.shape[0]
        d2 = 1 - z @ z.T
        pos = d2[torch.arange(m), (torch.arange(m) + m // 2) % m]
        logits = torch.where(reference.negative_mask(m), -d2 / tau, torch.tensor(-math.inf))
        lse = torch.logsumexp(torch.cat([logits, (-pos / tau)[:, None]], 1), 1)
        difference_form = (lse + pos / tau).double()
        assert ((difference_form - expected).abs() / expected).max() > 10 * rtol


# ----------------------------------------------------------------------------- DCL / NT-Xent

def _decoupled(z1, z2, tau, positive_in_denominator):
    """SimCLR's NT-Xent (cross-entropy over cosine logits, self excluded) and DCL (the positive
    also excluded from the denominator), mean over the 2N anchors, float64."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    m = z.shape[0]
    logits = (z @ z.T) / tau
    logits.fill_diagonal_(-math.inf)
    target = (torch.arange(m) + m // 2) % m
    if positive_in_denominator:
        return torch.nn.functional.cross_entropy(logits, target)
    pos = logits[torch.arange(m), target]
    logits[torch.arange(m), target] = -math.inf
    return (torch.logsumexp(logits, 1) - pos).mean()


def test_dcl_and_ntxent_modules(backend, gen):
    name, device = backend
    z1, z2 = views(gen, 6, 5, device=device)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ea, eb = z1.cpu().clone().requires_grad_(), z2.cpu().clone().requires_grad_()
    for module, positive_in_denominator in ((fastalpha.DCLLoss(backend=name), False),
                                            (fastalpha.NTXentLoss(backend=name), True),
                                            (fastalpha.DCLLoss(temperature=0.1, backend=name), False)):
        tau = module.kwargs["temperature"]
        got = module(a, b)
        expected = _decoupled(ea, eb, tau, positive_in_denominator)
        assert_close(got, expected, "float64", f"{name} {type(module).__name__} value")
        for g, e in zip(torch.autograd.grad(got, (a, b)), torch.autograd.grad(expected, (ea, eb))):
            assert_close(g, e, "float64", f"{name} {type(module).__name__} gradient")
    assert fastalpha.DCLLoss().kwargs["temperature"] == 0.5 and fastalpha.DCLLoss().kwargs["eps"] == 0.0
    assert fastalpha.NTXentLoss is fastalpha.InfoNCELoss and fastalpha.NTXentLoss().kwargs["eps"] == 1.0
    assert fastalpha.DCLLoss().kwargs["rule"] == "infonce"


def test_gather_distributed_checks_availability(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls in (fastalpha.DCLLoss, fastalpha.NTXentLoss, fastalpha.AlphaCLLoss):
        with pytest.raises(ValueError, match="is_available"):
            cls(gather_distributed=True)
        cls(gather_distributed=False)  # fine without torch.distributed

"""Public API: argument checks with clear messages, modules, presets, the fused-op plumbing."""
import math

import pytest
import torch

import fastalpha
from fastalpha import reference
from fastalpha.ops import FusedAlphaCL
from fastalpha.rules import RULES, make_spec
from fastalpha.testing import assert_close


def pair(n=4, d=3, dtype=torch.float64):
    return torch.randn(n, d, dtype=dtype), torch.randn(n, d, dtype=dtype)


z1, z2 = pair()
BAD_INPUTS = [
    # (description, call, exception type, text the message must contain)
    ("shape mismatch", lambda: fastalpha.alpha_cl_loss(z1, z2[:3]), ValueError, "same shape"),
    ("dim mismatch", lambda: fastalpha.alpha_cl_loss(z1, torch.randn(4, 5, dtype=torch.float64)), ValueError, "same shape"),
    ("not 2-D", lambda: fastalpha.alpha_cl_loss(z1[0], z2[0]), ValueError, "z1 must be 2-D"),
    ("N = 0", lambda: fastalpha.alpha_cl_loss(z1[:0], z2[:0]), ValueError, "N >= 1"),
    ("D = 0", lambda: fastalpha.alpha_cl_loss(z1[:, :0], z2[:, :0]), ValueError, "D >= 1"),
    ("integer dtype", lambda: fastalpha.alpha_cl_loss(z1.long(), z2.long()), TypeError, "z1 must have a floating dtype"),
    ("not a tensor", lambda: fastalpha.alpha_cl_loss(z1.tolist(), z2), TypeError, "z1 must be a torch.Tensor"),
    ("mixed dtypes", lambda: fastalpha.alpha_cl_loss(z1, z2.float()), TypeError, "same dtype"),
    ("mixed devices", lambda: fastalpha.alpha_cl_loss(z1, z2.to("meta")), ValueError, "same device"),
    ("temperature 0", lambda: fastalpha.alpha_cl_loss(z1, z2, temperature=0.0), ValueError, "temperature"),
    ("temperature < 0", lambda: fastalpha.alpha_cl_loss(z1, z2, temperature=-1.0), ValueError, "temperature"),
    ("temperature nan", lambda: fastalpha.alpha_cl_loss(z1, z2, temperature=math.nan), ValueError, "temperature"),
    ("temperature inf", lambda: fastalpha.alpha_cl_loss(z1, z2, temperature=math.inf), ValueError, "temperature"),
    ("temperature str", lambda: fastalpha.alpha_cl_loss(z1, z2, temperature="0.5"), TypeError, "temperature"),
    ("p <= 0", lambda: fastalpha.alpha_cl_loss(z1, z2, p=0.0), ValueError, "p must be"),
    ("gamma <= 0", lambda: fastalpha.alpha_cl_loss(z1, z2, rule="inverse", gamma=-2.0), ValueError, "gamma"),
    ("eps < 0", lambda: fastalpha.alpha_cl_loss(z1, z2, rule="infonce", eps=-0.1), ValueError, "eps"),
    ("eps nan", lambda: fastalpha.alpha_cl_loss(z1, z2, eps=math.nan), ValueError, "eps"),
    ("unknown rule", lambda: fastalpha.alpha_cl_loss(z1, z2, rule="hinge"), ValueError, "unknown rule"),
    ("unknown backend", lambda: fastalpha.alpha_cl_loss(z1, z2, backend="numpy"), ValueError, "unknown backend"),
    ("unknown reduction", lambda: fastalpha.alpha_cl_loss(z1, z2, reduction="max"), ValueError, "unknown reduction"),
    ("normalize not bool", lambda: fastalpha.alpha_cl_loss(z1, z2, normalize="yes"), TypeError, "normalize"),
    ("module bad rule", lambda: fastalpha.AlphaCLLoss(rule="nce"), ValueError, "unknown rule"),
    ("module bad temperature", lambda: fastalpha.InfoNCELoss(temperature=0), ValueError, "temperature"),
    ("pair_weights bad rule", lambda: fastalpha.pair_weights(z1, z2, rule="x"), ValueError, "unknown rule"),
    ("energy alpha shape", lambda: fastalpha.energy(z1, z2, torch.zeros(3, 3, dtype=torch.float64)), ValueError, "alpha must have shape"),
    ("energy alpha dtype", lambda: fastalpha.energy(z1, z2, torch.zeros(8, 8)), TypeError, "alpha must have the dtype"),
    ("covariance b1 alone", lambda: fastalpha.contrastive_covariance(z1, z2, torch.zeros(8, 8, dtype=torch.float64), b1=z1), ValueError, "b1 and b2"),
]


@pytest.mark.parametrize("what,call,exc,text", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(what, call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value), f"{what}: message {str(info.value)!r} does not mention {text!r}"


def test_explicit_unavailable_backend_says_why(monkeypatch):
    from fastalpha import dispatch

    monkeypatch.setattr(dispatch, "backend_status", lambda name, device=None: (False, "no compiler found (test)"))
    with pytest.raises(ValueError, match=r"backend='cpp' is not available .*no compiler found"):
        fastalpha.alpha_cl_loss(z1, z2, backend="cpp")
    # 'auto' falls back to eager instead of failing.
    assert torch.isfinite(fastalpha.alpha_cl_loss(z1, z2, backend="auto"))


def test_available_backends_shape():
    status = fastalpha.available_backends()
    assert set(status) == {"eager", "chunked", "cpp", "cuda", "triton"}
    assert status["eager"][0] is True and status["chunked"][0] is True
    for ok, reason in status.values():
        assert isinstance(ok, bool) and isinstance(reason, str) and reason


def test_rule_defaults():
    """Unset parameters take the rule's default (docs/design.md; square τ = 5, infonce ε = 1)."""
    assert make_spec("square").temperature == 5.0
    assert make_spec("infonce").eps == 1.0
    assert make_spec("direct") == make_spec("direct", temperature=0.5, p=4.0, eps=0.0)
    assert (make_spec("inverse").temperature, make_spec("inverse").gamma) == (0.5, 2.0)
    assert make_spec("entropy").p == 2.0 and make_spec("entropy", p=7.0).p == 2.0  # entropy is direct with p = 2
    a, b = pair()
    assert fastalpha.alpha_cl_loss(a, b, rule="square", backend="eager") == fastalpha.alpha_cl_loss(a, b, rule="square", temperature=5.0, backend="eager")


def test_paper_losses_presets():
    assert set(fastalpha.PAPER_LOSSES) == {"quadratic", "nce", "backprop", "entropy", "inverse", "square", "direct"}
    a, b = pair()
    for name, preset in fastalpha.PAPER_LOSSES.items():
        assert torch.isfinite(fastalpha.alpha_cl_loss(a, b, backend="eager", **preset)), name
    assert fastalpha.PAPER_LOSSES["backprop"] == dict(rule="entropy", temperature=0.5, detach_alpha=False)
    assert fastalpha.PAPER_LOSSES["square"]["temperature"] == 5.0
    assert fastalpha.PAPER_LOSSES["nce"]["eps"] == 1.0


def test_modules_match_functional():
    a, b = pair(6, 5)
    for rule in RULES:
        module = fastalpha.AlphaCLLoss(rule=rule, backend="eager")
        assert module(a, b) == fastalpha.alpha_cl_loss(a, b, rule=rule, backend="eager")
    nce = fastalpha.InfoNCELoss(temperature=0.2, backend="eager")
    assert fastalpha.NTXentLoss is fastalpha.InfoNCELoss
    assert nce(a, b) == fastalpha.alpha_cl_loss(a, b, rule="infonce", temperature=0.2, eps=1.0, backend="eager")
    assert "infonce" in repr(nce)


def test_non_contiguous_inputs(gen):
    big = torch.randn(7, 10, generator=gen, dtype=torch.float64)
    a, b = big[:, ::2], big.flip(0)[:, 1::2]
    assert not a.is_contiguous()
    expected = fastalpha.alpha_cl_loss(a.contiguous(), b.contiguous(), backend="eager")
    assert_close(fastalpha.alpha_cl_loss(a, b, backend="eager"), expected, "float64")
    assert_close(fastalpha.alpha_cl_loss(a, b, backend="auto"), expected, "float64")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("rule", RULES)
def test_fused_op_path_with_eager_kernel(gen, rule, reduction):
    """The custom op + autograd.Function (what every fused backend runs under, with its fused
    stacking and normalisation) equal autograd through cat + F.normalize."""
    z1, z2 = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 3 for _ in range(2))
    for detach in (True, False):
        for normalize in (False, True):
            spec = make_spec(rule, normalize=normalize, detach_alpha=detach)
            leaves = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            out = FusedAlphaCL.apply(*leaves, None, None, spec, reduction, "eager")  # no queue, fixed temperature
            weight = torch.rand(out.shape, generator=gen, dtype=torch.float64)
            (out * weight).sum().backward()
            ref_leaves = [z1.clone().requires_grad_(), z2.clone().requires_grad_()]
            expected = reference.reduce_rows(reference.loss_rows(reference.stack_views(*ref_leaves, normalize), spec), reduction)
            (expected * weight).sum().backward()
            where = f"{rule} detach={detach} normalize={normalize}"
            assert_close(out, expected, "float64", f"value {where}")
            for leaf, ref_leaf in zip(leaves, ref_leaves):
                assert_close(leaf.grad, ref_leaf.grad, "float64", f"grad {where}")


@pytest.mark.parametrize("backend", ["chunked", "cpp"])
def test_backward_of_a_retained_graph_twice(gen, backend):
    """The fused backward consumes its saved gradient in place: a second backward of a retained
    graph (and a learnable τ's gradient with it) must still equal the reference's."""
    if not fastalpha.available_backends()[backend][0]:
        pytest.skip(f"backend {backend!r} unavailable: {fastalpha.available_backends()[backend][1]}")
    a, b = (torch.randn(9, 5, generator=gen) * 2 for _ in range(2))
    tau = torch.tensor(0.3, requires_grad=True)
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_()]
    loss = fastalpha.alpha_cl_loss(*leaves, rule="infonce", temperature=tau, backend=backend)
    loss.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in leaves] + [tau.grad.clone()]
    loss.backward()
    second = [leaf.grad - g for leaf, g in zip(leaves, first)] + [tau.grad - first[2]]
    ref_tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ref = [a.double().requires_grad_(), b.double().requires_grad_()]
    fastalpha.alpha_cl_loss(*ref, rule="infonce", temperature=ref_tau, backend="eager").backward()
    for name, got_1, got_2, want in zip(("z1", "z2", "tau"), first, second, [r.grad for r in ref] + [ref_tau.grad]):
        assert_close(got_1, want.float(), "float32", f"first backward, grad {name}")
        assert_close(got_2, want.float(), "float32", f"second backward, grad {name}")


def test_custom_op_opcheck(gen):
    """torch.library.opcheck: schema, fake (meta) implementation and dispatch are consistent."""
    z = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    for need_grad in (True, False):
        args = (z, None, 0, 8, None, "direct", 0.5, 4.0, 2.0, 0.0, True, False, "all", need_grad, "eager", [])
        torch.library.opcheck(torch.ops.fastalpha.alpha_cl_fused.default, args, test_utils=("test_schema", "test_faketensor"))
    weight = torch.rand(5, generator=gen, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastalpha.alpha_cl_fused.default, (z, None, 2, 7, weight, "square", 5.0, 4.0, 2.0, 0.0, False, True, "all", True, "eager", []),
                          test_utils=("test_schema", "test_faketensor"))
    # Groups over [Z; queue] (a labelled queue): the fake gives the (M + K)-row gradient too.
    queue = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    groups = fastalpha.positives.Groups.of(torch.tensor([0, 1, 0, 2, 1, 1, 0, 2]), 5, torch.tensor([2, 0, 9, 1, 0]))
    for backend in ("eager", "chunked"):
        args = (z, queue, 1, 6, weight, "infonce", 0.5, 4.0, 2.0, 1.0, True, True, "all", True, backend, list(groups.tensors()))
        torch.library.opcheck(torch.ops.fastalpha.alpha_cl_fused.default, args, test_utils=("test_schema", "test_faketensor"))

"""torch.compile and the custom op `fastalpha::alpha_cl_fused`.

`alpha_cl_loss(..., backend=<fused>)` must trace into one graph (fullgraph=True, no graph
break): the custom op is opaque to Dynamo, and its fake implementation gives the output
shapes. On a machine without GPU the fused backend is `triton` under the interpreter
(conftest sets TRITON_INTERPRET=1), at tiny sizes. `torch.library.opcheck` checks the op's
schema, fake implementation and autograd registration against real runs, for the triton and
the eager implementation of the contract.
"""
import pytest
import torch

import fastalpha
from fastalpha.testing import assert_close

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(old)
    torch._dynamo.reset()


def _views(gen, n=4, d=8):
    z1 = torch.randn(n, d, generator=gen).to(DEVICE)
    z2 = torch.randn(n, d, generator=gen).to(DEVICE)
    return z1, z2


def _loss_fn(rule, reduction, detach_alpha, weights):
    def loss_fn(z1, z2):
        loss = fastalpha.alpha_cl_loss(z1, z2, rule=rule, detach_alpha=detach_alpha, reduction=reduction, backend="triton")
        return (loss * weights).sum() if reduction == "none" else loss
    return loss_fn


@pytest.mark.parametrize("rule,reduction,detach_alpha", [("direct", "mean", False), ("square", "none", True)])
def test_fullgraph_has_no_graph_break(gen, rule, reduction, detach_alpha):
    z1, z2 = _views(gen)
    weights = torch.rand(8, generator=gen).to(DEVICE)
    explanation = torch._dynamo.explain(_loss_fn(rule, reduction, detach_alpha, weights))(z1, z2)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes]
    assert "fastalpha.alpha_cl_fused" in ops, ops      # the fused op itself, not a fallback


def test_backend_choice_carries_the_mark_of_assume_constant_result():
    # fastalpha.dispatch sets the mark itself so that `import fastalpha` does not import
    # torch._dynamo; it must be exactly what the public decorator sets, in this torch.
    probe = torch.compiler.assume_constant_result(lambda: None)
    marks = {name: value for name, value in vars(probe).items() if name.startswith("_dynamo")}
    assert marks, "torch.compiler.assume_constant_result no longer marks the function: set the mark another way"
    for name, value in marks.items():
        assert getattr(fastalpha.dispatch._resolve_backend, name, None) == value, name


@pytest.mark.parametrize("compiler,rule,reduction,detach_alpha", [
    ("aot_eager", "direct", "mean", False),
    ("aot_eager", "square", "none", True),        # backward runs the op again, with row weights
    ("aot_eager", "infonce", "sum", True),
    ("inductor", "direct", "mean", False),        # one inductor case: it is slow on 2 CPU cores
])
def test_compiled_matches_eager(gen, compiler, rule, reduction, detach_alpha):
    """fullgraph=True compiles; value and gradients equal the uncompiled call (same kernels)."""
    z1, z2 = _views(gen)
    weights = torch.rand(8, generator=gen).to(DEVICE)
    loss_fn = _loss_fn(rule, reduction, detach_alpha, weights)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)

    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = compiled(a, b)
    loss.backward()
    a_ref, b_ref = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss_ref = loss_fn(a_ref, b_ref)
    loss_ref.backward()
    assert_close(loss, loss_ref, "float32", "loss")
    assert_close(a.grad, a_ref.grad, "float32", "grad z1")
    assert_close(b.grad, b_ref.grad, "float32", "grad z2")


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("rule,detach_alpha,unit_rows,weighted,need_grad", [
    ("direct", False, True, False, True),
    ("square", True, False, True, True),
    ("infonce", True, True, False, False),
    ("quadratic", True, False, True, True),
])
def test_opcheck_custom_op(gen, backend, rule, detach_alpha, unit_rows, weighted, need_grad):
    """Schema, fake (meta) implementation vs real outputs, and dynamic-shape AOT dispatch."""
    z = torch.randn(6, 5, generator=gen).to(DEVICE)
    if unit_rows:
        z = torch.nn.functional.normalize(z, dim=1)
    weight = torch.rand(4, generator=gen).to(DEVICE) if weighted else None
    args = (z, None, 1, 5, weight, rule, 0.5, 4.0, 2.0, 0.0, detach_alpha, unit_rows, "all", need_grad, backend, [])
    torch.library.opcheck(torch.ops.fastalpha.alpha_cl_fused.default, args)


# ----------------------------------------------------------------------------- groups
# Labels, V ≥ 3 views and a labelled queue: the groups are built with static shapes and no host
# read (fastalpha.positives.Groups), so these calls trace into one graph, and a graph compiled
# once serves every label assignment of the same shapes.

GROUPED_BACKENDS = ["chunked", "cpp"]


def _grouped_calls(gen, backend):
    """name → (loss function, inputs needing gradients, other inputs, a fresh draw of the labels)."""
    z = torch.randn(14, 6, generator=gen).to(DEVICE)
    views = torch.randn(3, 5, 6, generator=gen).to(DEVICE)
    queue = torch.randn(9, 6, generator=gen).to(DEVICE)

    def labels(k=14):
        return torch.randint(0, 4, (k,), generator=gen).to(DEVICE)

    return {
        "supcon": (lambda z, y: fastalpha.SupConLoss(0.1, backend=backend)(z, y), (z,), lambda: (labels(),)),
        "labels": (lambda z, y: fastalpha.alpha_cl_loss(z, labels=y, rule="direct", backend=backend), (z,),
                   lambda: (labels(),)),
        "views": (lambda v: fastalpha.alpha_cl_loss(v, rule="square", backend=backend), (views,), lambda: ()),
        "labelled-queue": (lambda z, y, q, yq: fastalpha.alpha_cl_loss(z, labels=y, queue=q, queue_labels=yq,
                                                                       rule="infonce", backend=backend),
                           (z,), lambda: (labels(), queue, labels(9))),
        "views-queue": (lambda v, q: fastalpha.alpha_cl_loss(v, queue=q, rule="entropy", backend=backend), (views,),
                        lambda: (queue,)),
    }


def _grouped_backend(name):
    ok, reason = fastalpha.dispatch.backend_status(name, torch.device("cpu"))
    if not ok:
        pytest.skip(reason)
    return name


@pytest.mark.parametrize("backend", GROUPED_BACKENDS)
@pytest.mark.parametrize("call", ["supcon", "labels", "views", "labelled-queue", "views-queue"])
def test_grouped_calls_trace_without_graph_break(gen, backend, call):
    fn, leaves, rest = _grouped_calls(gen, _grouped_backend(backend))[call]
    if "queue" in call and not fastalpha.dispatch.supports(backend, "all", True, True)[0]:
        backend = "chunked"
        fn, leaves, rest = _grouped_calls(gen, backend)[call]
    explanation = torch._dynamo.explain(fn)(*leaves, *rest())
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    ops = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes]
    assert "fastalpha.alpha_cl_fused" in ops, ops


@pytest.mark.parametrize("call", ["supcon", "labels", "views", "labelled-queue", "views-queue"])
def test_grouped_compiled_matches_eager_without_recompiling_for_new_labels(gen, call):
    """fullgraph=True: value and gradient equal the uncompiled call, for three label draws of
    the same shapes, with recompilation an error."""
    fn, leaves, rest = _grouped_calls(gen, "chunked")[call]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for step in range(3):
        others = rest()
        inputs = [x.clone().requires_grad_() for x in leaves]
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            got = compiled(*inputs, *others)
        got_grads = torch.autograd.grad(got, inputs)
        ref_inputs = [x.clone().requires_grad_() for x in leaves]
        want = fn(*ref_inputs, *others)
        want_grads = torch.autograd.grad(want, ref_inputs)
        assert_close(got, want, "float32", f"{call} loss, draw {step}")
        for g, w in zip(got_grads, want_grads):
            assert_close(g, w, "float32", f"{call} gradient, draw {step}")

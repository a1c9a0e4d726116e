r"""The one custom op behind every fused backend, and the autograd rule that uses it.

`fastalpha::alpha_cl_fused(z, row_lo, row_hi, row_weight, <LossSpec fields>, need_grad, backend)
-> (loss_rows, grad)` runs the kernel of `backend` (see fastalpha.dispatch for the contract).
It is registered with `torch.library` and a fake (meta) implementation, so
`torch.compile(fullgraph=True)` traces through it. A custom op takes only plain types, so the
spec travels as its fields and is rebuilt in the op body; `LossSpec` rejects an unknown rule
there, whichever backend was asked for.

Since α is a stop-gradient (or, for `detach_alpha=False`, its effect is folded into β), the
gradient of Σ_i loss_i is a by-product of the forward pass: the forward returns it, and the
backward only scales it by the incoming scalar. Only `reduction="none"` needs a second
pass in backward, with the incoming per-row gradient as row weights.

Second derivatives (`create_graph=True`) are exact: the backward then recomputes the
gradient with the dense reference under autograd (O(M²) memory), since the fused gradient
is a constant to autograd and would silently drop every term but the normalisation's.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import dispatch, reference
from .rules import LossSpec

logger = logging.getLogger("fastalpha")


@torch.library.custom_op("fastalpha::alpha_cl_fused", mutates_args=())
def alpha_cl_fused(
    z: torch.Tensor,
    queue: Optional[torch.Tensor],
    row_lo: int,
    row_hi: int,
    row_weight: Optional[torch.Tensor],
    rule: str,
    temperature: float,
    p: float,
    gamma: float,
    eps: float,
    detach_alpha: bool,
    unit_rows: bool,
    negatives: str,
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = LossSpec(rule, temperature, p, gamma, eps, detach_alpha, unit_rows, negatives)
    impl = dispatch.implementation(backend)
    if queue is None:
        loss_rows, grad = impl(z, spec, row_lo, row_hi, row_weight, need_grad)
    else:
        loss_rows, grad = impl(z, spec, row_lo, row_hi, row_weight, need_grad, queue=queue)
    # A custom op may not return an alias of its input.
    return loss_rows.clone() if loss_rows is z else loss_rows, grad


@alpha_cl_fused.register_fake
def _alpha_cl_fused_fake(z, queue, row_lo, row_hi, row_weight, rule, temperature, p, gamma, eps, detach_alpha, unit_rows,
                         negatives, need_grad, backend):
    loss_rows = z.new_empty((row_hi - row_lo,), dtype=torch.promote_types(z.dtype, torch.float32))
    rows = z.shape[0] + (0 if queue is None else queue.shape[0])
    grad = z.new_empty((rows, z.shape[1]) if need_grad else (0, z.shape[1]))
    return loss_rows, grad


def call_fused(z: torch.Tensor, spec: LossSpec, backend: str, row_lo: int, row_hi: int, row_weight=None, need_grad=True,
               queue: Optional[torch.Tensor] = None):
    """Call the custom op with a validated spec. With a queue, grad has M + K rows ([Z; queue])."""
    return torch.ops.fastalpha.alpha_cl_fused(
        z, queue, row_lo, row_hi, row_weight, spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, spec.negatives, need_grad, backend,
    )


_double_backward_logged = False


def differentiable_gradient(z, queue, temperature, spec: LossSpec, row_weight: torch.Tensor):
    """(∂/∂Z, ∂/∂τ) of Σ_i w_i loss_i by dense autograd with a graph, for second derivatives.

    `z` is the saved input of the fused Function: inside a `create_graph=True` backward it
    carries its graph, so the result is differentiable in z (and in the weights w).
    """
    global _double_backward_logged
    if not _double_backward_logged:
        _double_backward_logged = True
        logger.info("fastalpha: create_graph=True: the gradient is recomputed by the dense eager reference "
                    "(O(M^2) memory) so that second derivatives are exact")
    with torch.enable_grad():
        zg = z if z.requires_grad else z.detach().requires_grad_()
        inputs = [zg] if temperature is None else [zg, temperature]
        rows = reference.loss_rows(zg, spec if temperature is None else spec.with_(temperature=temperature), queue=queue)
        grads = torch.autograd.grad(rows, inputs, row_weight.to(rows.dtype), create_graph=True, allow_unused=True)
    return grads[0], (grads[1] if temperature is not None else None)


class FusedAlphaCL(torch.autograd.Function):
    """loss = reduce(loss_rows(Z)); backward scales the gradient the forward already has.

    Inputs: z (M × D, normalised), queue (K × D or None, no gradient), temperature (None, or
    the learnable 0-dim τ whose value spec.temperature holds). The losses are homogeneous of
    degree 0 in (Z, τ) jointly under Z → cZ, τ → c²τ (every d2 difference is quadratic in the
    rows), so Euler's identity gives the temperature's gradient from the rows' gradient G of
    Σ_i w_i loss_i over [Z; queue]: ∂/∂τ = −⟨[Z; queue], G⟩ / (2τ). No extra kernel output.
    """

    @staticmethod
    def forward(ctx, z, queue, temperature, spec: LossSpec, reduction: str, backend: str):
        m = z.shape[0]
        need_grad = (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]) and reduction != "none"
        loss_rows, grad = call_fused(z, spec, backend, 0, m, None, need_grad, queue)
        ctx.spec, ctx.reduction, ctx.backend = spec, reduction, backend
        ctx.save_for_backward(z, queue, temperature, grad)
        loss_rows = loss_rows.to(z.dtype)
        if reduction == "none":
            return loss_rows
        return loss_rows.mean() if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        z, queue, temperature, grad = ctx.saved_tensors
        m = z.shape[0]
        stat = torch.promote_types(z.dtype, torch.float32)
        if ctx.reduction == "none":
            row_weight = grad_out.to(stat).contiguous()
        else:
            scale = grad_out / m if ctx.reduction == "mean" else grad_out
            row_weight = scale.to(stat).expand(m)
        if torch.is_grad_enabled():
            grad_z, grad_t = differentiable_gradient(z, queue, temperature, ctx.spec, row_weight)
            return grad_z.to(z.dtype), None, grad_t, None, None, None
        if ctx.reduction == "none":
            _, grad = call_fused(z, ctx.spec, ctx.backend, 0, m, row_weight, True, queue)
        else:
            grad = grad * row_weight[0].to(grad.dtype)
        grad_t = None
        if temperature is not None and ctx.needs_input_grad[2]:
            cols = z if queue is None else torch.cat([z, queue.to(z.dtype)], 0)
            inner = (cols.to(stat) * grad.to(stat)).sum()
            grad_t = (-inner / (2 * ctx.spec.temperature)).to(temperature.dtype)
        return grad[:m], None, grad_t, None, None, None

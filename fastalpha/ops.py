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
    loss_rows, grad = dispatch.implementation(backend)(z, spec, row_lo, row_hi, row_weight, need_grad)
    # A custom op may not return an alias of its input.
    return loss_rows.clone() if loss_rows is z else loss_rows, grad


@alpha_cl_fused.register_fake
def _alpha_cl_fused_fake(z, row_lo, row_hi, row_weight, rule, temperature, p, gamma, eps, detach_alpha, unit_rows,
                         negatives, need_grad, backend):
    loss_rows = z.new_empty((row_hi - row_lo,), dtype=torch.promote_types(z.dtype, torch.float32))
    grad = z.new_empty((z.shape[0], z.shape[1]) if need_grad else (0, z.shape[1]))
    return loss_rows, grad


def call_fused(z: torch.Tensor, spec: LossSpec, backend: str, row_lo: int, row_hi: int, row_weight=None, need_grad=True):
    """Call the custom op with a validated spec."""
    return torch.ops.fastalpha.alpha_cl_fused(
        z, row_lo, row_hi, row_weight, spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, spec.negatives, need_grad, backend,
    )


_double_backward_logged = False


def differentiable_gradient(z: torch.Tensor, spec: LossSpec, row_weight: torch.Tensor, row_lo: int = 0, row_hi=None) -> torch.Tensor:
    """∂(Σ_i w_i loss_i)/∂Z by dense autograd with a graph, for second derivatives.

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
        rows = reference.loss_rows(zg, spec, row_lo, row_hi)
        (grad,) = torch.autograd.grad(rows, zg, row_weight.to(rows.dtype), create_graph=True)
    return grad


class FusedAlphaCL(torch.autograd.Function):
    """loss = reduce(loss_rows(Z)); backward scales the gradient the forward already has."""

    @staticmethod
    def forward(ctx, z, spec: LossSpec, reduction: str, backend: str):
        m = z.shape[0]
        need_grad = ctx.needs_input_grad[0] and reduction != "none"
        loss_rows, grad = call_fused(z, spec, backend, 0, m, None, need_grad)
        ctx.spec, ctx.reduction, ctx.backend = spec, reduction, backend
        ctx.save_for_backward(z, grad)
        loss_rows = loss_rows.to(z.dtype)
        if reduction == "none":
            return loss_rows
        return loss_rows.mean() if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        z, grad = ctx.saved_tensors
        m = z.shape[0]
        if ctx.reduction == "none":
            row_weight = grad_out.to(torch.promote_types(z.dtype, torch.float32)).contiguous()
        else:
            scale = grad_out / m if ctx.reduction == "mean" else grad_out
            row_weight = scale.to(torch.promote_types(z.dtype, torch.float32)).expand(m)
        if torch.is_grad_enabled():
            return differentiable_gradient(z, ctx.spec, row_weight).to(z.dtype), None, None, None
        if ctx.reduction == "none":
            _, grad = call_fused(z, ctx.spec, ctx.backend, 0, m, row_weight, True)
            return grad, None, None, None
        return grad * row_weight[0].to(grad.dtype), None, None, None

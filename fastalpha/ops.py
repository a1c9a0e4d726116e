r"""The one custom op behind every fused backend, and the autograd rule that uses it.

`fastalpha::alpha_cl_fused(z, row_lo, row_hi, row_weight, rule, τ, p, γ, ε, detach_alpha,
need_grad, backend) -> (loss_rows, grad)` runs the kernel of `backend` (see
fastalpha.dispatch for the contract). It is registered with `torch.library` and a fake
(meta) implementation, so `torch.compile(fullgraph=True)` traces through it.

Since α is a stop-gradient (or, for `detach_alpha=False`, its effect is folded into β), the
gradient of Σ_i loss_i is a by-product of the forward pass: the forward returns it, and the
backward only scales it by the incoming scalar. Only `reduction="none"` needs a second
pass in backward, with the incoming per-row gradient as row weights.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .rules import RuleParams


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
    need_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = RuleParams(rule=rule, temperature=temperature, p=p, gamma=gamma, eps=eps)
    loss_rows, grad = dispatch.implementation(backend)(z, row_lo, row_hi, row_weight, params, detach_alpha, need_grad)
    # A custom op may not return an alias of its input.
    return loss_rows.clone() if loss_rows is z else loss_rows, grad


@alpha_cl_fused.register_fake
def _alpha_cl_fused_fake(z, row_lo, row_hi, row_weight, rule, temperature, p, gamma, eps, detach_alpha, need_grad, backend):
    loss_rows = z.new_empty((row_hi - row_lo,), dtype=torch.promote_types(z.dtype, torch.float32))
    grad = z.new_empty((z.shape[0], z.shape[1]) if need_grad else (0, z.shape[1]))
    return loss_rows, grad


def call_fused(z: torch.Tensor, params: RuleParams, detach_alpha: bool, backend: str, row_lo: int, row_hi: int, row_weight=None, need_grad=True):
    """Call the custom op with a validated RuleParams."""
    return torch.ops.fastalpha.alpha_cl_fused(
        z, row_lo, row_hi, row_weight, params.rule, params.temperature, params.p, params.gamma, params.eps,
        detach_alpha, need_grad, backend,
    )


class FusedAlphaCL(torch.autograd.Function):
    """loss = reduce(loss_rows(Z)); backward scales the gradient the forward already has."""

    @staticmethod
    def forward(ctx, z, params: RuleParams, detach_alpha: bool, reduction: str, backend: str):
        m = z.shape[0]
        need_grad = ctx.needs_input_grad[0] and reduction != "none"
        loss_rows, grad = call_fused(z, params, detach_alpha, backend, 0, m, None, need_grad)
        ctx.params, ctx.detach_alpha, ctx.reduction, ctx.backend = params, detach_alpha, reduction, backend
        if reduction == "none":
            ctx.save_for_backward(z)
            return loss_rows
        ctx.save_for_backward(grad)
        return loss_rows.mean() if reduction == "mean" else loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (saved,) = ctx.saved_tensors
        if ctx.reduction == "none":
            z = saved
            row_weight = grad_out.to(torch.promote_types(z.dtype, torch.float32)).contiguous()
            _, grad = call_fused(z, ctx.params, ctx.detach_alpha, ctx.backend, 0, z.shape[0], row_weight, True)
            return grad, None, None, None, None
        scale = grad_out / saved.shape[0] if ctx.reduction == "mean" else grad_out
        return saved * scale.to(saved.dtype), None, None, None, None

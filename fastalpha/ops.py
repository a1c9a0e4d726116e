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

from . import dispatch, positives, reference
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
    groups: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = LossSpec(rule, temperature, p, gamma, eps, detach_alpha, unit_rows, negatives)
    group_sets = positives.Groups(*groups) if groups else None
    if group_sets is not None and not bool(group_sets.has_loss[row_lo:row_hi].any()):
        # No anchor in range has a positive and a negative: every loss is 0, and so is the
        # gradient (the one host synchronisation of a grouped call; the kernels need not
        # handle a batch without any pair).
        return _no_loss(z, queue, row_lo, row_hi, need_grad)
    impl = dispatch.implementation(backend)
    # Only the set-ups a backend was asked for reach it as keywords: one without queues or
    # groups keeps the plain signature.
    extra = {name: value for name, value in (("queue", queue), ("groups", group_sets)) if value is not None}
    loss_rows, grad = impl(z, spec, row_lo, row_hi, row_weight, need_grad, **extra)
    # A custom op may not return an alias of its input.
    return loss_rows.clone() if loss_rows is z else loss_rows, grad


def _no_loss(z, queue, row_lo: int, row_hi: int, need_grad: bool):
    rows = z.shape[0] + (0 if queue is None else queue.shape[0])
    loss_rows = z.new_zeros((row_hi - row_lo,), dtype=torch.promote_types(z.dtype, torch.float32))
    return loss_rows, z.new_zeros((rows, z.shape[1]) if need_grad else (0, z.shape[1]))


@alpha_cl_fused.register_fake
def _alpha_cl_fused_fake(z, queue, row_lo, row_hi, row_weight, rule, temperature, p, gamma, eps, detach_alpha, unit_rows,
                         negatives, need_grad, backend, groups):
    loss_rows = z.new_empty((row_hi - row_lo,), dtype=torch.promote_types(z.dtype, torch.float32))
    rows = z.shape[0] + (0 if queue is None else queue.shape[0])
    grad = z.new_empty((rows, z.shape[1]) if need_grad else (0, z.shape[1]))
    return loss_rows, grad


def call_fused(z: torch.Tensor, spec: LossSpec, backend: str, row_lo: int, row_hi: int, row_weight=None, need_grad=True,
               queue: Optional[torch.Tensor] = None, groups: Optional[positives.Groups] = None):
    """Call the custom op with a validated spec. With a queue, grad has M + K rows ([Z; queue]);
    `groups` (fastalpha.positives.Groups over [Z; queue]) takes the positives and negatives from
    groups. The op carries the groups' tensors, so they are computed once per call."""
    return torch.ops.fastalpha.alpha_cl_fused(
        z, queue, row_lo, row_hi, row_weight, spec.rule, spec.temperature, spec.p, spec.gamma, spec.eps,
        spec.detach_alpha, spec.unit_rows, spec.negatives, need_grad, backend,
        [] if groups is None else list(positives.groups_of(groups, 0 if queue is None else queue.shape[0]).tensors()),
    )


_double_backward_logged = False


def differentiable_gradient(views, queue, temperature, spec: LossSpec, row_weight: torch.Tensor, groups=None):
    """(∂/∂view for each view, ∂/∂τ) of Σ_i w_i loss_i by dense autograd with a graph, for second derivatives.

    `views` are the saved inputs of the fused Function: inside a `create_graph=True` backward
    they carry their graph, so the result is differentiable in them (and in the weights w).
    """
    global _double_backward_logged
    if not _double_backward_logged:
        _double_backward_logged = True
        logger.info("fastalpha: create_graph=True: the gradient is recomputed by the dense eager reference "
                    "(O(M^2) memory) so that second derivatives are exact")
    with torch.enable_grad():
        views = [v if v.requires_grad else v.detach().requires_grad_() for v in views]
        inputs = views if temperature is None else views + [temperature]
        z = torch.cat(views, 0)
        if spec.unit_rows:
            z = torch.nn.functional.normalize(z, dim=1)
        spec = spec if temperature is None else spec.with_(temperature=temperature)
        if groups is None:
            rows = reference.loss_rows(z, spec, queue=queue)
        else:
            rows = reference.grouped_loss_rows(z, spec, groups, queue=queue)
        grads = torch.autograd.grad(rows, inputs, row_weight.to(rows.dtype), create_graph=True, allow_unused=True)
    return list(grads[:len(views)]), (grads[-1] if temperature is not None else None)


# torch.nn.functional.normalize's default: the fused path normalises the rows exactly as the
# reference does (x / max(|x|, eps)).
NORM_EPS = 1e-12
# Rows per step of the row-wise passes over an M × D buffer: their temporaries stay this × D.
ROW_CHUNK = 1024


def stack_rows(views, unit_rows: bool):
    """Z = [z1; z2; …], row-normalised when unit_rows, written once into one M × D buffer, and
    the rows' norms |x_i| (M × 1, or None): what `torch.cat` + `F.normalize` compute, without
    their intermediate M × D tensors."""
    starts = [0]
    for v in views:
        starts.append(starts[-1] + v.shape[0])
    z = views[0].new_empty((starts[-1], views[0].shape[1]))
    if not unit_rows:
        for v, lo, hi in zip(views, starts, starts[1:]):
            z[lo:hi].copy_(v)
        return z, None
    norms = torch.cat([torch.linalg.vector_norm(v, dim=1, keepdim=True) for v in views])
    denominators = norms.clamp_min(NORM_EPS)
    for v, lo, hi in zip(views, starts, starts[1:]):
        torch.div(v, denominators[lo:hi], out=z[lo:hi])
    return z, norms


def through_normalisation_(grad: torch.Tensor, z: torch.Tensor, norms, scale) -> torch.Tensor:
    r"""In place: grad (∂/∂Z of the normalised rows) → scale · ∂/∂X of the raw rows.

    For y = x / c with c = max(|x|, eps): ∂/∂x = (g − (g·y) y) / |x| when |x| ≥ eps, g / eps
    below (the clamp cuts the norm's path, as in autograd). Row chunks keep the temporaries at
    ROW_CHUNK × D. `scale` is a scalar tensor (the reduction's factor) or None; without
    normalisation only the scale applies.
    """
    if norms is None:
        return grad if scale is None else grad.mul_(scale.to(grad.dtype))
    stat = torch.promote_types(grad.dtype, torch.float32)
    for start in range(0, z.shape[0], ROW_CHUNK):
        g, y, norm = grad[start:start + ROW_CHUNK], z[start:start + ROW_CHUNK], norms[start:start + ROW_CHUNK]
        dot = (g.to(stat) * y.to(stat)).sum(1, keepdim=True)
        dot.masked_fill_(norm < NORM_EPS, 0)
        factor = 1 / norm.to(stat).clamp_min(NORM_EPS)
        if scale is not None:
            factor = factor * scale.to(stat)
        g.addcmul_(y, dot.to(g.dtype), value=-1).mul_(factor.to(g.dtype))
    return grad


def rows_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ over all entries in promote(dtype, float32), in row chunks (no full-size product)."""
    stat = torch.promote_types(a.dtype, torch.float32)
    return sum((a[s:s + ROW_CHUNK].to(stat) * b[s:s + ROW_CHUNK].to(stat)).sum()
               for s in range(0, a.shape[0], ROW_CHUNK))


class FusedAlphaCL(torch.autograd.Function):
    """loss = reduce(loss_rows(Z)), Z = [z1; z2; …] (normalised when spec.unit_rows); the backward
    scales the gradient the forward already has and takes it through the normalisation.

    Inputs: the views z1, z2 (N × D, raw; z2 is None for one labelled view) and any further
    views after the fixed arguments, queue (K × D, already prepared, or None, no gradient),
    temperature (None, or the learnable 0-dim τ whose value spec.temperature holds), groups
    (None: z1 and z2 are partners; else fastalpha.positives.Groups over [Z; queue], docs/design.md
    "Positive sets").
    Stacking, normalisation and its backward are fused here so that a call holds Z and the
    kernel's gradient G (M × D each) and no other M × D tensor: the backward works on G in
    place (once; a second backward of a retained graph recomputes G). With groups, "mean"
    averages over the anchors that have a positive and a negative
    (Groups.has_loss), counted as a tensor: no host synchronisation, so it traces.

    The losses are homogeneous of degree 0 in (Z, τ) jointly under Z → cZ, τ → c²τ (every d2
    difference is quadratic in the rows), so Euler's identity gives the temperature's gradient
    from the rows' gradient G of Σ_i w_i loss_i over [Z; queue]: ∂/∂τ = −⟨[Z; queue], G⟩ / (2τ).
    """

    @staticmethod
    def forward(ctx, z1, z2, queue, temperature, spec: LossSpec, reduction: str, backend: str, groups=None, *more_views):
        views = [v for v in (z1, z2) if v is not None] + list(more_views)
        with torch.no_grad():
            z, norms = stack_rows(views, spec.unit_rows)
        m = z.shape[0]
        # needs_input_grad: z1, z2, queue, τ, spec, reduction, backend, groups, then the further views.
        wanted = ctx.needs_input_grad
        needs_grad = wanted[0] or wanted[1] or wanted[3] or any(wanted[8:])
        loss_rows, grad = call_fused(z, spec, backend, 0, m, None, needs_grad and reduction != "none", queue, groups)
        ctx.spec, ctx.reduction, ctx.backend = spec, reduction, backend
        ctx.has_z2, ctx.more_views = z2 is not None, len(more_views)
        ctx.anchors = m if groups is None else groups.anchor_count().clamp_min(1)
        ctx.groups = groups
        ctx.save_for_backward(z, norms, queue, temperature, *views)
        # Not saved for backward: the backward consumes it in place (see there).
        ctx.fused_grad = grad
        loss_rows = loss_rows.to(z.dtype)
        if reduction == "none":
            return loss_rows
        if reduction == "sum":
            return loss_rows.sum()
        return loss_rows.mean() if groups is None else loss_rows.sum() / ctx.anchors.to(loss_rows.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        z, norms, queue, temperature, *views = ctx.saved_tensors
        groups = ctx.groups
        m = z.shape[0]
        stat = torch.promote_types(z.dtype, torch.float32)
        if ctx.reduction == "none":
            row_weight, scale = grad_out.to(stat).contiguous(), None
        else:
            scale = (grad_out / ctx.anchors if ctx.reduction == "mean" else grad_out).to(stat)
            row_weight = scale.expand(m)
        if torch.is_grad_enabled():
            view_grads, grad_t = differentiable_gradient(views, queue, temperature, ctx.spec, row_weight, groups)
            return _layout(ctx, view_grads, grad_t)
        # The forward's G is consumed in place by the first backward (torch.compile's traced
        # backward works on a copy); a retained graph's next backward recomputes it.
        grad = ctx.fused_grad
        if torch.compiler.is_compiling():
            grad = None if grad is None else grad.clone()
        else:
            ctx.fused_grad = None
        if ctx.reduction == "none":
            _, grad = call_fused(z, ctx.spec, ctx.backend, 0, m, row_weight, True, queue, groups)
        elif grad is None:
            # Recomputed as the forward computed it, so that every backward gives the same bits.
            _, grad = call_fused(z, ctx.spec, ctx.backend, 0, m, None, True, queue, groups)
        grad_t = None
        if temperature is not None and ctx.needs_input_grad[3]:
            inner = rows_inner(z, grad[:m]) + (0 if queue is None else rows_inner(queue, grad[m:]))
            if scale is not None:
                inner = inner * scale
            grad_t = (-inner / (2 * ctx.spec.temperature)).to(temperature.dtype)
        grad = through_normalisation_(grad[:m], z, norms, scale)
        return _layout(ctx, list(grad.split([v.shape[0] for v in views])), grad_t)


def _layout(ctx, view_grads, grad_t):
    """backward's outputs: one per input of forward (views, queue, τ, spec, …, groups, more views)."""
    first, rest = view_grads[0], view_grads[1:]
    second = rest.pop(0) if ctx.has_z2 else None
    return (first, second, None, grad_t, None, None, None, None, *rest)

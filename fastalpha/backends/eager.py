"""The eager backend of the fused-op contract (see fastalpha.dispatch): dense closed-form gradient.

It is what `fastalpha::alpha_cl_fused` runs when no compiled kernel applies, and what the
distributed layer uses with `backend="eager"`. Memory is O(R·M) for R anchor rows.
"""
from __future__ import annotations

import torch

from .. import reference
from ..rules import LossSpec
from . import every_negative_set


def status() -> tuple[bool, str]:
    return True, "dense PyTorch reference, O(M^2) memory"


supports = every_negative_set
supports_groups = True
supports_grouped_queue = True


def alpha_cl_fused(z: torch.Tensor, spec: LossSpec, row_lo: int, row_hi: int, row_weight, need_grad: bool, queue=None,
                   groups=None):
    # A custom op's kernel runs below autograd, so the gradient comes from the closed form
    # (tested against autograd of reference.loss_rows / grouped_loss_rows in the tests).
    if groups is not None:
        rows, grad = reference.grouped_closed_form_gradient(z, spec, groups, row_weight, row_lo, row_hi, queue)
    else:
        rows, grad = reference.closed_form_gradient(z, spec, row_weight, row_lo, row_hi, queue)
    out_dtype = torch.promote_types(z.dtype, torch.float32)
    if not need_grad:
        grad = z.new_empty((0, z.shape[1]))
    return rows.to(out_dtype), grad.to(z.dtype)

"""Before a provider is timed, it must agree with the float64 dense reference.

On a small input with awkward sizes (N = 37, so M = 74 is no multiple of any block; D = 24;
a queue, where the setup has one, of K = 29 rows), drawn in float64 with close positive pairs
and rounded to the benchmark dtype, the provider's loss (with and without gradient tracking,
since forward-only is a different path in the fused kernels) and the gradients of both views
are compared with fastalpha's dense reference run in float64 on the same rounded values, with
the same negatives and queue. Tolerances and the comparison are the test suite's
(`fastalpha.testing`): one table for the whole project.
"""
from __future__ import annotations

from typing import Callable

import torch

import fastalpha
from fastalpha import testing

from .providers import setup_kwargs

CHECK_N, CHECK_D, CHECK_K = 37, 24, 29


def correlated_views(n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 views whose positive pairs are close (cos ≈ 0.9), as after some training.

    With independent views d2_i ≈ d2_ij, so each loss_i = Σ_j α_ij (d2_i − d2_ij) is a small
    difference of O(1) terms and the mean loss loses digits to cancellation in any float32
    implementation; close positives keep the check well-conditioned.
    """
    z1 = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)


def precision(device: torch.device, dtype: torch.dtype) -> str:
    """The tolerance row for `dtype` on `device`: float32 matmuls on a GPU may run in tf32."""
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return testing.precision_of(dtype, tf32)


def check_agreement(fn: Callable, rule: str, device: torch.device, dtype: torch.dtype, generator: torch.Generator,
                    negatives: str = "all", with_queue: bool = False) -> tuple[str, str]:
    """("ok" | "wrong" | "error", reason) for loss function `fn(z1, z2, **setup)` of `rule`."""
    level = precision(device, dtype)
    views = [v.to(dtype) for v in correlated_views(CHECK_N, CHECK_D, generator)]
    queue = torch.randn(CHECK_K, CHECK_D, generator=generator, dtype=torch.float64).to(dtype) if with_queue else None
    exact = [v.to(torch.float64).requires_grad_() for v in views]
    exact_setup = setup_kwargs(negatives, None if queue is None else queue.to(torch.float64))
    setup = setup_kwargs(negatives, None if queue is None else queue.to(device))
    what = f"{2 * CHECK_N}x{CHECK_D} check input" + (f" (queue {CHECK_K}x{CHECK_D})" if with_queue else "")
    try:
        expected = fastalpha.alpha_cl_loss(*exact, rule=rule, backend="eager", **exact_setup)
        expected_grads = torch.autograd.grad(expected, exact)
    except Exception as err:
        return "error", f"the float64 reference raised on the {what}: {type(err).__name__}: {err}"
    try:
        with torch.no_grad():
            value_no_grad = fn(*(v.to(device) for v in views), **setup)
        inputs = [v.to(device).requires_grad_() for v in views]
        value = fn(*inputs, **setup)
        grads = torch.autograd.grad(value, inputs)
    except Exception as err:
        return "error", f"raised on the {what}: {type(err).__name__}: {err}"
    try:
        testing.assert_close(value_no_grad, expected, level, "loss (no grad)")
        testing.assert_close(value, expected, level, "loss")
        testing.assert_close(grads[0], expected_grads[0], level, "grad z1")
        testing.assert_close(grads[1], expected_grads[1], level, "grad z2")
    except AssertionError as err:
        return "wrong", f"disagrees with the float64 reference on a {what}: {err}"
    return "ok", f"agrees with the float64 reference at {level} tolerance"

"""Before a provider is timed, it must agree with the float64 dense reference.

On a small input with awkward sizes (N = 37, so M = 74 is no multiple of any block; D = 24),
drawn in float64 with close positive pairs and rounded to the benchmark dtype, the provider's loss (with and without
gradient tracking, since forward-only is a different path in the fused kernels) and the
gradients of both views are compared with fastalpha's dense reference run in float64 on the
same rounded values. Tolerances and the comparison are the test suite's
(tests/tolerances.py): one table for the whole project.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable

import torch

import fastalpha

CHECK_N, CHECK_D = 37, 24
_TOLERANCES_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "tolerances.py")


def _tolerances():
    spec = importlib.util.spec_from_file_location("fastalpha_tests_tolerances", _TOLERANCES_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    return _tolerances().precision_of(dtype, tf32)


def check_agreement(fn: Callable, rule: str, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> tuple[str, str]:
    """("ok" | "wrong" | "error", reason) for loss function `fn(z1, z2)` of `rule`."""
    tolerances = _tolerances()
    level = precision(device, dtype)
    views = [v.to(dtype) for v in correlated_views(CHECK_N, CHECK_D, generator)]
    exact = [v.to(torch.float64).requires_grad_() for v in views]
    expected = fastalpha.alpha_cl_loss(*exact, rule=rule, backend="eager")
    expected_grads = torch.autograd.grad(expected, exact)
    try:
        with torch.no_grad():
            value_no_grad = fn(*(v.to(device) for v in views))
        inputs = [v.to(device).requires_grad_() for v in views]
        value = fn(*inputs)
        grads = torch.autograd.grad(value, inputs)
    except Exception as err:
        return "error", f"raised on the {2 * CHECK_N}x{CHECK_D} check input: {type(err).__name__}: {err}"
    try:
        tolerances.assert_close(value_no_grad, expected, level, "loss (no grad)")
        tolerances.assert_close(value, expected, level, "loss")
        tolerances.assert_close(grads[0], expected_grads[0], level, "grad z1")
        tolerances.assert_close(grads[1], expected_grads[1], level, "grad z2")
    except AssertionError as err:
        return "wrong", f"disagrees with the float64 reference on a {2 * CHECK_N}x{CHECK_D} input: {err}"
    return "ok", f"agrees with the float64 reference at {level} tolerance"

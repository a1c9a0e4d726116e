"""Before a provider is timed, it must agree with the float64 dense reference.

On a small input with awkward sizes (N = 37, so M = 74 is no multiple of any block; D = 24;
a queue, where the setup has one, of K = 29 rows; for the labels set-up one view of M = 74
rows with the set-up's labels), drawn in float64 with close positives and rounded to the
benchmark dtype, the provider's loss (with and without gradient tracking, since forward-only
is a different path in the fused kernels) and the gradients of the views are compared with
fastalpha's dense reference run in float64 on the same rounded values, with the same set-up
and rule parameters (for pml's SupConLoss: fastalpha's SupCon, infonce with labels at
providers.SUPCON). Tolerances and the comparison are the test suite's (`fastalpha.testing`):
one table for the whole project.
"""
from __future__ import annotations

from typing import Callable

import torch

from fastalpha import testing

from .providers import loss_fn, memory_loss_fn, setup_kwargs, supcon_labels

CHECK_N, CHECK_D, CHECK_K = 37, 24, 29


def correlated_views(n: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two float64 views whose positive pairs are close (cos ≈ 0.9), as after some training.

    With independent views d2_i ≈ d2_ij, so each loss_i = Σ_j α_ij (d2_i − d2_ij) is a small
    difference of O(1) terms and the mean loss loses digits to cancellation in any float32
    implementation; close positives keep the check well-conditioned.
    """
    z1 = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(n, d, generator=generator, dtype=torch.float64)


def labelled_view(m: int, d: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One float64 view of m rows and its labels (providers.supcon_labels), each row its class
    centre plus noise: positives close, for the same reason as `correlated_views`."""
    labels = supcon_labels(m, generator)
    centres = torch.randn(int(labels.max()) + 1, d, generator=generator, dtype=torch.float64)
    return centres[labels] + 0.5 * torch.randn(m, d, generator=generator, dtype=torch.float64), labels


def precision(device: torch.device, dtype: torch.dtype) -> str:
    """The tolerance row for `dtype` on `device`: float32 matmuls on a GPU may run in tf32."""
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return testing.precision_of(dtype, tf32)


def check_agreement(fn: Callable, rule: str, device: torch.device, dtype: torch.dtype, generator: torch.Generator,
                    negatives: str = "all", with_queue: bool = False, positives: str = "pair",
                    supcon: bool = False) -> tuple[str, str]:
    """("ok" | "wrong" | "error", reason) for loss function `fn(*views, **setup)` of `rule`:
    fn(z1, z2, ...) for partner positives, fn(z, labels=y) for positives="labels"."""
    level = precision(device, dtype)
    if positives == "labels":
        view, labels = labelled_view(2 * CHECK_N, CHECK_D, generator)
        views = [view.to(dtype)]
    else:
        views, labels = [v.to(dtype) for v in correlated_views(CHECK_N, CHECK_D, generator)], None
    queue = torch.randn(CHECK_K, CHECK_D, generator=generator, dtype=torch.float64).to(dtype) if with_queue else None
    exact = [v.to(torch.float64).requires_grad_() for v in views]
    exact_setup = setup_kwargs(negatives, None if queue is None else queue.to(torch.float64), labels)
    setup = setup_kwargs(negatives, None if queue is None else queue.to(device), None if labels is None else labels.to(device))
    what = (f"{2 * CHECK_N}x{CHECK_D} check input" + (f" (queue {CHECK_K}x{CHECK_D})" if with_queue else "")
            + (f" ({len(labels.unique())} labels)" if labels is not None else ""))
    names = ["z"] if len(views) == 1 else [f"z{k + 1}" for k in range(len(views))]
    try:
        expected = loss_fn("eager", rule, positives, supcon)(*exact, **exact_setup)
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
        for name, grad, expected_grad in zip(names, grads, expected_grads):
            testing.assert_close(grad, expected_grad, level, f"grad {name}")
    except AssertionError as err:
        return "wrong", f"disagrees with the float64 reference on a {what}: {err}"
    return "ok", f"agrees with the float64 reference at {level} tolerance"


#: The memory set-up's check: batches of MEMORY_CHECK_B rows into MEMORY_CHECK_K slots, for
#: MEMORY_CHECK_STEPS steps: the memory filling, full, and wrapped around.
MEMORY_CHECK_B, MEMORY_CHECK_K, MEMORY_CHECK_STEPS = 24, 60, 4


def check_memory_agreement(name: str, device: torch.device, dtype: torch.dtype, generator: torch.Generator) -> tuple[str, str]:
    """("ok" | "wrong" | "error", reason) for provider `name`'s cross-batch memory
    (providers.memory_loss_fn): step after step, its loss and gradient against those of the
    float64 reference (fastalpha.CrossBatchMemory on the eager backend, the dense float64
    reference, with a float64 memory) fed the same labelled batches."""
    level = precision(device, dtype)
    what = f"{MEMORY_CHECK_STEPS} steps of {MEMORY_CHECK_B} rows into a {MEMORY_CHECK_K}-slot memory"
    try:
        xbm = memory_loss_fn(name, CHECK_D, MEMORY_CHECK_K)
        exact = memory_loss_fn("eager", CHECK_D, MEMORY_CHECK_K)
        exact.to(torch.float64)
    except Exception as err:
        return "error", f"could not build the memory for the {what}: {type(err).__name__}: {err}"
    for step in range(MEMORY_CHECK_STEPS):
        rows, labels = labelled_view(MEMORY_CHECK_B, CHECK_D, generator)
        reference = rows.clone().requires_grad_()
        try:
            expected = exact(reference, labels=labels)
            (expected_grad,) = torch.autograd.grad(expected, reference)
        except Exception as err:
            return "error", f"the float64 reference raised at step {step} of {what}: {type(err).__name__}: {err}"
        inputs = rows.to(device=device, dtype=dtype).requires_grad_()
        try:
            value = xbm(inputs, labels=labels.to(device))
            (grad,) = torch.autograd.grad(value, inputs)
        except Exception as err:
            return "error", f"raised at step {step} of {what}: {type(err).__name__}: {err}"
        try:
            testing.assert_close(value, expected, level, f"loss at step {step}")
            testing.assert_close(grad, expected_grad, level, f"grad at step {step}")
        except AssertionError as err:
            return "wrong", f"disagrees with the float64 reference in {what}: {err}"
    return "ok", f"agrees with the float64 reference at {level} tolerance over {what}"

"""Backend choice: which implementation of the fused op runs for a given tensor.

Every backend implements one contract (the kernel behind `fastalpha::alpha_cl_fused`):

    impl(z, spec, row_lo, row_hi, row_weight, need_grad) -> (loss_rows, grad)

    z          (M, D) stacked and already normalised rows, M = 2N even (N ≥ 2), any float dtype
    spec       the validated fastalpha.rules.LossSpec (rule, parameters, detach_alpha, unit_rows)
    rows       the anchors i in [row_lo, row_hi); all M rows are columns (negatives, partners)
    row_weight None (all ones) or an (R,) tensor w of dtype promote(z.dtype, float32)
    loss_rows  (R,) per-anchor losses, dtype promote(z.dtype, float32)
    grad       (M, D) in z.dtype: ∂(Σ_i w_i loss_i)/∂Z (rows and columns), or (0, D) if not need_grad

    queue      (keyword, only when given) (K, D) extra negative rows; grad then has M + K rows
    groups     (keyword, only when given) fastalpha.positives.Groups over the columns [Z; queue]:
               positives and negatives from the groups (negatives="all", any M ≥ 1; row ids,
               column ids with −1 for ignored columns, self columns, |P_i| and |J_i|)

A backend module exposes `status() -> (available, reason)` and `alpha_cl_fused(...)` with the
signature above, and optionally `supports(negatives, has_queue) -> (ok, reason)` when it
computes more than the SimCLR negatives (every row but i and p(i), no queue), and
`supports_groups = True` when it takes group-defined positives (and `supports_grouped_queue =
True` when also with queue columns: a labelled queue, a cross-batch memory). `backend="auto"` picks, for CUDA tensors, triton, then cuda, then chunked; for
CPU tensors, cpp, then chunked (plain PyTorch, always there, so memory stays O(R·M) on a
machine without a compiler or without Triton). An automatic fallback is logged once at INFO; an explicit
backend that is unavailable raises with the reason.
"""
from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger("fastalpha")

BACKENDS = ("eager", "chunked", "cpp", "cuda", "triton")
_MODULES = {name: f"fastalpha.backends.{name}" for name in BACKENDS}
_AUTO_ORDER = {"cuda": ("triton", "cuda", "chunked", "eager"), "cpu": ("cpp", "chunked", "eager")}


@functools.lru_cache(maxsize=None)
def _module(name: str):
    return importlib.import_module(_MODULES[name])


def backend_status(name: str, device: torch.device | None = None) -> tuple[bool, str]:
    """(available, reason) for one backend, optionally for tensors on `device`."""
    try:
        module = _module(name)
    except ImportError as err:
        return False, f"{_MODULES[name]} cannot be imported: {err}"
    if device is not None and hasattr(module, "device_status"):
        return module.device_status(device)
    return module.status()


def available_backends() -> dict[str, tuple[bool, str]]:
    """Map each backend name to (available, reason) on this machine."""
    return {name: backend_status(name) for name in BACKENDS}


_fallbacks_logged: set = set()


def supports(name: str, negatives: str, has_queue: bool, has_groups: bool = False) -> tuple[bool, str]:
    """(supported, reason) of a backend for a set of negatives (and group-defined positives).

    A backend module may define `supports(negatives, has_queue)`; one that does not computes
    the SimCLR set only (negatives="all", no queue). Groups need `supports_groups = True`.
    """
    module = _module(name)
    if has_groups and not getattr(module, "supports_groups", False):
        return False, f"the {name} backend has no group-defined positives (labels, more than two views)"
    if has_groups and has_queue and not getattr(module, "supports_grouped_queue", False):
        return False, f"the {name} backend has no queue columns with group-defined positives (a labelled queue)"
    if has_groups:
        return True, ""
    if hasattr(module, "supports"):
        return module.supports(negatives, has_queue)
    if negatives == "all" and not has_queue:
        return True, ""
    return False, f"the {name} backend computes negatives='all' without a queue only"


def resolve_backend(backend: str, device: torch.device, spec=None, has_queue: bool = False,
                    has_groups: bool = False) -> str:
    """Turn the user's `backend` into a concrete backend name for tensors on `device` and a spec."""
    negatives = "all" if spec is None else spec.negatives
    return _resolve_backend(backend, device.type, device.index, negatives, has_queue, has_groups)


# The choice depends only on the machine and the arguments, never on tensor values: under
# torch.compile it is evaluated once at trace time and baked into the graph instead of
# tracing imports and logging. The mark is the one torch.compiler.assume_constant_result sets
# (tests/test_compile.py checks that they agree), set here because that decorator imports
# torch._dynamo, which would add seconds to every `import fastalpha`.
def _resolve_backend(backend: str, device_type: str, device_index, negatives: str, has_queue: bool,
                     has_groups: bool = False) -> str:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}, got {type(backend).__name__}")
    if backend == "auto":
        skipped = []
        for name in _AUTO_ORDER.get(device.type, ("chunked", "eager")):
            ok, reason = backend_status(name, device)
            if ok:
                ok, reason = supports(name, negatives, has_queue, has_groups)
            if ok:
                if skipped and (device.type, name) not in _fallbacks_logged:
                    _fallbacks_logged.add((device.type, name))
                    logger.info("fastalpha: backend='auto' uses %r on %s (%s)", name, device.type, "; ".join(skipped))
                return name
            skipped.append(f"{name}: {reason}")
        return "eager"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend={backend!r}; expected 'auto' or one of {BACKENDS}")
    ok, reason = backend_status(backend, device)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available for {device.type} tensors: {reason}")
    ok, reason = supports(backend, negatives, has_queue, has_groups)
    if not ok:
        raise ValueError(f"backend={backend!r} does not support negatives={negatives!r}"
                         f"{' with a queue' if has_queue else ''}{' with labels or more than two views' if has_groups else ''}"
                         f": {reason}")
    return backend


_resolve_backend._dynamo_marked_constant = True


def implementation(name: str):
    """The `alpha_cl_fused` function of a concrete backend."""
    return _module(name).alpha_cl_fused

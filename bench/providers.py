r"""The implementations the benchmark compares ("providers"), behind one interface.

=============== ===================================================================== ==========
provider        what runs                                                             memory
=============== ===================================================================== ==========
eager           fastalpha.alpha_cl_loss(..., backend="eager"): dense autograd          O(M²)
chunked         fastalpha.alpha_cl_loss(..., backend="chunked"): full-row chunks in    O(R·M)
                plain PyTorch, gradient from the forward pass
compile         torch.compile(dynamic=True) of the dense reference                     O(M²)
cpp/cuda/triton fastalpha.alpha_cl_loss(..., backend=name): the fused kernels          O(M·D)
=============== ===================================================================== ==========

Each provider gives `status(device) -> (available, reason)`, `loss_fn(rule) -> f(z1, z2, **setup)`
(default rule parameters, detach_alpha=True, reduction="mean"; `setup` is the negatives/queue
arguments of a benchmark setup, see `setup_kwargs`), and a predicted peak memory used to skip
sizes that would exceed the run's cap (see `predicted_peak_bytes`).
"""
from __future__ import annotations

import functools
import inspect
import shutil
from typing import Callable

import torch

import fastalpha
from fastalpha import dispatch
from fastalpha.backends.chunked import default_chunk_rows

PROVIDERS = ("eager", "chunked", "compile", "cpp", "cuda", "triton")
#: Former names of providers, still read from older CSV files and accepted on the command line.
ALIASES = {"eager-chunked": "chunked"}
#: Providers backed by a fused fastalpha kernel: they alone get the extra large sizes.
FUSED = ("cpp", "cuda", "triton")
DEFAULT_PROVIDERS = {
    "cpu": ("eager", "chunked", "compile", "cpp"),
    "cuda": ("eager", "chunked", "compile", "triton", "cuda"),
}

#: Peak memory of the dense providers in units of M·C·itemsize (C = columns per anchor row:
#: M, plus K with a queue), measured on this project's CPU machine at M = 1024…4096, D = 128,
#: float32 for `direct` and `infonce` (bench/compare.py measures it on every run, column
#: peak_mb): eager ≈ 6.3–7.5 (fwd and fwd+bwd), compile ≈ 1.05 (fwd) and ≈ 4.1–4.5 (fwd+bwd).
#: Rounded up, these predict which sizes exceed the memory cap.
DENSE_PEAK_FACTOR = {
    ("eager", "fwd"): 8.0,
    ("eager", "fwdbwd"): 8.0,
    ("compile", "fwd"): 1.5,
    ("compile", "fwdbwd"): 5.0,
}

#: Ways to choose the negatives of an anchor (fastalpha.alpha_cl_loss's `negatives`).
NEGATIVES = ("all", "cross", "none")


def canonical(name: str) -> str:
    """The current name of a provider (maps ALIASES)."""
    return ALIASES.get(name, name)


def check_provider(name: str) -> str:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    return name


def status(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason) of a provider for tensors on `device`."""
    check_provider(name)
    if name == "eager":
        return True, "fastalpha dense reference (autograd), O(M^2) memory"
    if name == "compile":
        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
        if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return False, "torch.compile on the CPU needs a C++ compiler (g++/c++/clang++ not found)"
        return True, "torch.compile(dynamic=True) of the dense reference"
    try:
        return dispatch.backend_status(name, device)
    except Exception as err:  # a backend under construction must not stop the benchmark
        return False, f"fastalpha backend {name!r} status check failed: {type(err).__name__}: {err}"


def setup_kwargs(negatives: str, queue: torch.Tensor | None) -> dict:
    """The keyword arguments of fastalpha.alpha_cl_loss for a setup; {} for the default
    (negatives="all", no queue), so that the default setup runs on any version of the API."""
    kwargs = {}
    if negatives != "all":
        kwargs["negatives"] = negatives
    if queue is not None:
        kwargs["queue"] = queue
    return kwargs


def setup_support(name: str, negatives: str, queue_rows: int) -> tuple[str, str]:
    """("ok", "") if provider `name` can run a setup; else ("skipped", why) when this
    fastalpha's API lacks the setup's arguments, ("unavailable", why) when the backend does
    not compute that set of negatives."""
    check_provider(name)
    needed = [arg for arg, used in (("negatives", negatives != "all"), ("queue", queue_rows > 0)) if used]
    if not needed:
        return "ok", ""
    parameters = inspect.signature(fastalpha.alpha_cl_loss).parameters
    missing = [arg for arg in needed if arg not in parameters]
    if missing:
        return "skipped", f"fastalpha.alpha_cl_loss has no {' / '.join(repr(m) for m in missing)} parameter in this version"
    supports = getattr(dispatch, "supports", None)
    if supports is None:
        return "ok", ""
    ok, reason = supports("eager" if name == "compile" else name, negatives, queue_rows > 0)
    return ("ok", "") if ok else ("unavailable", reason)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # Rules and sizes reuse one compiled function: shapes are symbolic (dynamic=True), so
    # a new M does not recompile; each rule is its own guard set, hence the raised limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(functools.partial(fastalpha.alpha_cl_loss, backend="eager"), dynamic=True)


def loss_fn(name: str, rule: str) -> Callable[..., torch.Tensor]:
    """f(z1, z2, **setup) -> scalar loss of `rule` (its default parameters) computed by provider `name`."""
    check_provider(name)
    if name == "compile":
        return functools.partial(_compiled_reference(), rule=rule)
    return functools.partial(fastalpha.alpha_cl_loss, rule=rule, backend=name)


def predicted_peak_bytes(name: str, m: int, d: int, dtype: torch.dtype, mode: str, device_type: str = "cpu",
                         queue_rows: int = 0) -> int:
    """Predicted peak memory of one call beyond its inputs (a guide for the cap, not a measurement).

    Dense providers: DENSE_PEAK_FACTOR · M · (M + K) · itemsize, whatever the negatives (a
    dense implementation may hold the full score matrix and mask it). chunked: about three
    (R × (M + K)) float32 chunk buffers plus (M × D) accumulators. Fused kernels: a few
    (M × D) buffers.
    """
    check_provider(name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows_bytes = m * d * max(itemsize, 4)
    columns = m + queue_rows
    if (name, mode) in DENSE_PEAK_FACTOR:
        return int(DENSE_PEAK_FACTOR[name, mode] * m * columns * itemsize)
    if name == "chunked":
        return int(3 * default_chunk_rows(m, device_type) * columns * 4 + 4 * rows_bytes)
    return int(6 * rows_bytes)

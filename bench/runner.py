"""One measurement: a provider computing one (rule, M, D, dtype, mode) loss, timed and its peak
memory taken, after it has been checked against the float64 reference.

A measurement (a `Task`) comes back as a dict: median_ms / p20_ms / p80_ms / repeats / peak_mb,
ceiling_gflops (torch.mm of the same shape class, see `ceiling`), load_1min and a status:

    ok           timed
    wrong        disagrees with the float64 reference on the check input (not timed)
    error        raised on the check input or while timing (not timed; the reason says what)
    OOM          predicted to exceed the memory cap, or an allocation failed
    unavailable  the provider cannot run here (decided by bench/compare.py, reason attached)

Runs in the measuring process: on the CPU two worker subprocesses per provider
(bench/worker.py), one timing (`run`) and one taking peak memory (`run_memory`) with the
allocator set up for exact accounting; on a GPU, `run` in the main process does both.
"""
from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass, field

import torch

from . import agreement, memory, providers, timing

MODES = ("fwd", "fwdbwd")


@dataclass(frozen=True)
class Task:
    provider: str
    rule: str
    m: int
    d: int
    dtype: str
    mode: str

    def key(self) -> tuple:
        return (self.provider, self.rule, self.m, self.d, self.dtype, self.mode)


@dataclass
class Settings:
    device: str = "cpu"
    threads: int = 2
    warmup: int = 1
    repeats: int = 5
    budget_s: float = 4.0
    cap_bytes: int = 4 * 2**30
    seed: int = 0
    verdicts: dict = field(default_factory=dict)   # (provider, rule, dtype) -> (status, reason)
    ceilings: dict = field(default_factory=dict)   # (M, D, dtype) -> GFLOP/s of torch.mm


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(s in text for s in ("out of memory", "not enough memory", "can't allocate memory"))


def _make_call(fn, z1, z2, mode):
    if mode == "fwd":
        return lambda: fn(z1, z2)

    def forward_backward():
        z1.grad = z2.grad = None
        fn(z1, z2).backward()

    return forward_backward


def verdict(task: Task, settings: Settings) -> tuple[str, str]:
    """The agreement check of (provider, rule, dtype), run once per measuring process."""
    key = (task.provider, task.rule, task.dtype)
    if key not in settings.verdicts:
        device = torch.device(settings.device)
        gen = torch.Generator().manual_seed(settings.seed)
        fn = providers.loss_fn(task.provider, task.rule)
        settings.verdicts[key] = agreement.check_agreement(fn, task.rule, device, dtype_of(task.dtype), gen)
    return settings.verdicts[key]


def ceiling(task: Task, settings: Settings) -> float:
    """The matmul ceiling for the task's shape class, measured once per measuring process, just
    before the first measurement that needs it, so that it sees the machine as that
    provider's measurements do (the CPU machine is shared and its speed drifts)."""
    key = (task.m, task.d, task.dtype)
    if key not in settings.ceilings:
        settings.ceilings[key] = timing.matmul_ceiling_gflops(task.m, task.d, dtype_of(task.dtype), torch.device(settings.device),
                                                              budget_s=min(settings.budget_s, 2.0))
    return settings.ceilings[key]


def run(task: Task, settings: Settings) -> dict:
    """Check and time one task (and, on a GPU, take its peak memory); never raises for a
    provider's failure, which becomes the status."""
    result = _run(task, settings)
    # The machine's 1-minute load average when the measurement ended: how crowded it was.
    result["load_1min"] = os.getloadavg()[0]
    return result


def _failure(err: Exception) -> dict:
    first_line = str(err).splitlines()[0][:300] if str(err) else ""
    return dict(status="OOM" if _is_out_of_memory(err) else "error", reason=f"{type(err).__name__}: {first_line}")


def _run(task: Task, settings: Settings) -> dict:
    result = dict(median_ms=None, p20_ms=None, p80_ms=None, repeats=0, peak_mb=None)
    status, reason = verdict(task, settings)
    if status != "ok":
        return dict(result, status=status, reason=reason)
    dtype = dtype_of(task.dtype)
    predicted = providers.predicted_peak_bytes(task.provider, task.m, task.d, dtype, task.mode, settings.device)
    if predicted > settings.cap_bytes:
        return dict(result, status="OOM", reason=f"predicted peak {predicted / 2**30:.1f} GiB > memory cap {settings.cap_bytes / 2**30:.1f} GiB (not run)")
    device = torch.device(settings.device)
    try:
        ceiling_gflops = ceiling(task, settings)
        return dict(result, **_time(task, settings, device, dtype), ceiling_gflops=ceiling_gflops, status="ok", reason=reason)
    except Exception as err:
        return dict(result, **_failure(err))
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


#: The memory worker warms each provider up on this many rows rather than the task's M.
MEMORY_WARMUP_M = 256


def run_memory(task: Task, settings: Settings) -> dict:
    """CPU peak memory of one task that `run` timed: {"peak_mb": …}, or a note why not.

    For a worker started with memory.EXACT_MALLOC_ENV (bench/memory.py explains why this is a
    process of its own). The warm-up runs at M = MEMORY_WARMUP_M: it initialises thread pools
    and compiles (torch.compile's graph has dynamic shapes) without costing a full-size call,
    and any buffer a provider would keep between calls at full size is counted, not hidden in
    the baseline. Then the task's inputs, the baseline, and one call.
    """
    try:
        small = dataclasses.replace(task, m=min(task.m, MEMORY_WARMUP_M))
        _warm_up(_inputs(small, settings, torch.device("cpu"), dtype_of(task.dtype))[2], task, settings)
        z1, z2, call = _inputs(task, settings, torch.device("cpu"), dtype_of(task.dtype))
        gc.collect()
        baseline = memory.rss_bytes()
        if not memory.reset_peak_rss():
            return dict(peak_mb=None, memory_note="/proc/self/clear_refs is not writable: no per-call peak")
        call()
        return dict(peak_mb=max(memory.peak_rss_bytes() - baseline, 0) / 2**20)
    except Exception as err:
        failure = _failure(err)
        return dict(peak_mb=None, memory_note=f"peak memory not measured: {failure['status']}: {failure['reason']}")
    finally:
        gc.collect()


def _inputs(task: Task, settings: Settings, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    n = task.m // 2
    needs_grad = task.mode == "fwdbwd"
    z1 = torch.randn(n, task.d, generator=gen, device=device).to(dtype).requires_grad_(needs_grad)
    z2 = torch.randn(n, task.d, generator=gen, device=device).to(dtype).requires_grad_(needs_grad)
    return z1, z2, _make_call(providers.loss_fn(task.provider, task.rule), z1, z2, task.mode)


def _warm_up(call, task: Task, settings: Settings) -> None:
    """Untimed calls first: compilation, autotuning, first-touch allocations."""
    for _ in range(max(settings.warmup, 1) + (task.provider == "compile")):
        call()


def _time(task: Task, settings: Settings, device: torch.device, dtype: torch.dtype) -> dict:
    z1, z2, call = _inputs(task, settings, device, dtype)
    _warm_up(call, task, settings)
    if device.type == "cpu":
        median, p20, p80, count = timing.time_cpu(call, settings.repeats, settings.budget_s)
        return dict(median_ms=median, p20_ms=p20, p80_ms=p80, repeats=count)
    z1.grad = z2.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    estimate_ms = timing.cuda_call_ms(call)   # the memory call also sizes the timing loop
    peak = torch.cuda.max_memory_allocated(device) - baseline
    median, p20, p80, count = timing.time_cuda(call, settings.repeats, settings.budget_s, estimate_ms)
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80, repeats=count, peak_mb=max(peak, 0) / 2**20)

"""One measurement: a provider computing one (rule, M, D, dtype, mode, set-up) loss,
timed and its peak memory taken, after it has been checked against the float64 reference.

A measurement (a `Task`) comes back as a dict: median_ms / p20_ms / p80_ms / repeats /
calls_per_block / peak_mb / rss_growth_mb, ceiling_gflops (the compute ceiling, see `ceiling`)
and fma_peak_gflops (CPU: timing.fma_peak_gflops), load_start / load_end (1-minute load average when the measurement began and
ended) and a status:

    ok           timed
    wrong        disagrees with the float64 reference on the check input (not timed)
    error        raised on the check input or while timing (not timed; the reason says what)
    OOM          predicted to exceed the memory cap, or an allocation failed
    unavailable  the provider cannot run here (decided by bench/compare.py, reason attached)
    skipped      this fastalpha's API lacks the setup's arguments (decided by bench/compare.py)

A call slower than `Settings.single_call_s` is not repeated: its first call is the
measurement (repeats = 1, no warm-up, no memory measurement), so that the large sizes of the
fused providers finish in one call each.

Runs in the measuring process: on the CPU, worker subprocesses (bench/worker.py), one timing
(`run`) and, per `Settings.memory`, one taking the per-call peak with the allocator pinned for
exact accounting (`run_memory`, column peak_mb) and a fresh one per task with the default
allocator over three calls (`run_rss`, column rss_growth_mb); on a GPU, `run` in the main
process does both.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time
from dataclasses import dataclass, field

import torch

from . import agreement, memory, providers, report, timing

MODES = ("fwd", "fwdbwd")
#: Settings.memory: which CPU peak-memory measurements a run takes.
MEMORY_MODES = ("pinned", "fresh", "both", "none")
#: Calls of one fresh process in `run_rss`: a training loop's first steps, where allocator
#: arenas, thread pools and any buffer a provider keeps between calls have all appeared.
RSS_CALLS = 3


@dataclass(frozen=True)
class Task:
    provider: str
    rule: str
    m: int
    d: int
    dtype: str
    mode: str
    negatives: str = "all"
    queue: int = 0   # K rows of extra negatives (0: no queue)
    positives: str = "pair"   # providers.POSITIVES: "labels" is one labelled view of M rows, "memory"
                              # that view through a cross-batch memory of `queue` slots

    def key(self) -> tuple:
        return (self.provider, self.rule, self.m, self.d, self.dtype, self.mode, self.negatives, self.queue, self.positives)

    def setup(self) -> str:
        """The setup's name in tables: "all", "cross", "none+queue65536", "labels", …"""
        return report.setup_name(dict(negatives=self.negatives, queue=self.queue, positives=self.positives))


@dataclass
class Settings:
    device: str = "cpu"
    threads: int = 2
    warmup: int = 1
    repeats: int = 5
    budget_s: float = 4.0
    cap_bytes: int = 4 * 2**30
    seed: int = 0
    memory: str = "pinned"      # one of MEMORY_MODES
    single_call_s: float = 30.0
    rule_params: str = "default"   # "supcon": SupCon's infonce parameters in every set-up (providers.rule_kwargs)
    verdicts: dict = field(default_factory=dict)   # (provider, rule, dtype, negatives, queue?, positives) -> (status, reason)
    ceilings: dict = field(default_factory=dict)   # CPU (D, dtype, mode), GPU (M, D, dtype) -> GFLOP/s


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(s in text for s in ("out of memory", "not enough memory", "can't allocate memory"))


def _make_call(fn, views, mode, setup: dict):
    if mode == "fwd":
        return lambda: fn(*views, **setup)

    def forward_backward():
        for view in views:
            view.grad = None
        fn(*views, **setup).backward()

    return forward_backward


def verdict(task: Task, settings: Settings) -> tuple[str, str]:
    """The agreement check of (provider, rule, dtype), run once per measuring process."""
    key = (task.provider, task.rule, task.dtype, task.negatives, task.queue > 0, task.positives)
    if key not in settings.verdicts:
        device = torch.device(settings.device)
        gen = torch.Generator().manual_seed(settings.seed)
        supcon = settings.rule_params == "supcon"
        if task.positives == "memory":
            settings.verdicts[key] = agreement.check_memory_agreement(task.provider, device, dtype_of(task.dtype), gen)
        else:
            fn = providers.loss_fn(task.provider, task.rule, task.positives, supcon)
            settings.verdicts[key] = agreement.check_agreement(fn, task.rule, device, dtype_of(task.dtype), gen,
                                                               negatives=task.negatives, with_queue=task.queue > 0,
                                                               positives=task.positives, supcon=supcon)
    return settings.verdicts[key]


def ceiling(task: Task, settings: Settings) -> float:
    """The compute ceiling for the task, measured once per measuring process, just before the
    first measurement that needs it, so that it sees the machine as that provider's
    measurements do (the CPU machine is shared and its speed drifts). CPU: the cpp kernel's
    tile products into cache-resident outputs, one single-threaded worker process per thread,
    per (D, dtype, mode) (timing.tile_gemm_ceiling_gflops; None where the machine is too
    loaded for its workers to start together); GPU: torch.mm of the task's shape class."""
    budget = min(settings.budget_s, 2.0)
    if settings.device == "cpu":
        key = (task.d, task.dtype, task.mode)
        if key not in settings.ceilings:
            # bf16/fp16 inputs are computed in float32 by the CPU providers that matter here.
            dtype = torch.float64 if task.dtype == "float64" else torch.float32
            try:
                settings.ceilings[key] = timing.tile_gemm_ceiling_gflops(task.d, dtype, settings.threads, budget_s=budget,
                                                                         mode=task.mode)
            except RuntimeError as err:
                print(f"compute ceiling not measured: {err}")
                settings.ceilings[key] = None
        return settings.ceilings[key]
    key = (task.m, task.d, task.dtype)
    if key not in settings.ceilings:
        settings.ceilings[key] = timing.matmul_ceiling_gflops(task.m, task.d, dtype_of(task.dtype), torch.device(settings.device),
                                                              budget_s=budget)
    return settings.ceilings[key]


def run(task: Task, settings: Settings) -> dict:
    """Check and time one task (and, on a GPU, take its peak memory); never raises for a
    provider's failure, which becomes the status."""
    # The machine's 1-minute load average when the measurement began and ended: how crowded it was.
    load_start = os.getloadavg()[0]
    result = _run(task, settings)
    result.update(load_start=load_start, load_end=os.getloadavg()[0])
    return result


def _failure(err: Exception) -> dict:
    first_line = str(err).splitlines()[0][:300] if str(err) else ""
    return dict(status="OOM" if _is_out_of_memory(err) else "error", reason=f"{type(err).__name__}: {first_line}")


def _run(task: Task, settings: Settings) -> dict:
    result = dict(median_ms=None, p20_ms=None, p80_ms=None, repeats=0, calls_per_block=None, peak_mb=None, rss_growth_mb=None)
    status, reason = verdict(task, settings)
    if status != "ok":
        return dict(result, status=status, reason=reason)
    dtype = dtype_of(task.dtype)
    predicted = providers.predicted_peak_bytes(task.provider, task.m, task.d, dtype, task.mode, settings.device, task.queue)
    if predicted > settings.cap_bytes:
        return dict(result, status="OOM", reason=f"predicted peak {predicted / 2**30:.1f} GiB > memory cap {settings.cap_bytes / 2**30:.1f} GiB (not run)")
    device = torch.device(settings.device)
    try:
        ceiling_gflops = ceiling(task, settings)
        peak = timing.fma_peak_gflops(settings.threads, dtype)[0] if device.type == "cpu" else None
        timed = _time(task, settings, device, dtype)
        note = timed.pop("note", "")
        return dict(result, **timed, ceiling_gflops=ceiling_gflops, fma_peak_gflops=peak,
                    cpp_algorithm=os.environ.get("FASTALPHA_CPP_ALGORITHM"), status="ok", reason=reason + note)
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
        small = dataclasses.replace(task, m=min(task.m, MEMORY_WARMUP_M), queue=min(task.queue, MEMORY_WARMUP_M))
        _warm_up(_inputs(small, settings, torch.device("cpu"), dtype_of(task.dtype))[1], task, settings)
        _, call = _inputs(task, settings, torch.device("cpu"), dtype_of(task.dtype))
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


def run_rss(task: Task, settings: Settings) -> dict:
    """{"rss_growth_mb": …}: what a user's fresh process grows by over RSS_CALLS calls.

    For a fresh worker with glibc's default allocator, one task per process: the inputs (and
    queue) are made and the provider's library loaded (its status check), then the baseline
    resident set, then RSS_CALLS calls with no warm-up; the figure is the high-water mark
    above the baseline. Unlike `run_memory` it counts what the allocator keeps from one call
    to the next (arenas, per-thread buffers), which is what a training process sees.
    """
    try:
        cpu = torch.device("cpu")
        _, call = _inputs(task, settings, cpu, dtype_of(task.dtype))
        providers.status(task.provider, cpu)
        gc.collect()
        baseline = memory.rss_bytes()
        if not memory.reset_peak_rss():
            return dict(rss_growth_mb=None, memory_note="/proc/self/clear_refs is not writable: no RSS growth")
        for _ in range(RSS_CALLS):
            call()
        return dict(rss_growth_mb=max(memory.peak_rss_bytes() - baseline, 0) / 2**20)
    except Exception as err:
        failure = _failure(err)
        return dict(rss_growth_mb=None, memory_note=f"RSS growth not measured: {failure['status']}: {failure['reason']}")


def _inputs(task: Task, settings: Settings, device: torch.device, dtype: torch.dtype):
    """The views (z1, z2 of N = M/2 rows each; with labels one view z of M rows), the same for
    every provider, and the call to measure (with the queue, K × D, or the labels; the memory
    set-up: the provider's cross-batch memory of K slots, filled first)."""
    gen = torch.Generator(device=device).manual_seed(settings.seed)
    needs_grad = task.mode == "fwdbwd"
    labelled = task.positives in providers.LABELLED
    count, rows = (1, task.m) if labelled else (2, task.m // 2)
    views = [torch.randn(rows, task.d, generator=gen, device=device).to(dtype).requires_grad_(needs_grad) for _ in range(count)]
    labels = providers.supcon_labels(task.m, torch.Generator().manual_seed(settings.seed)).to(device) if labelled else None
    if task.positives == "memory":
        fn = providers.memory_loss_fn(task.provider, task.d, task.queue).to(device)
        providers.fill_memory(fn, task.m, settings.seed + 1)
        return views, _make_call(fn, views, task.mode, {"labels": labels})
    queue = torch.randn(task.queue, task.d, generator=gen, device=device).to(dtype) if task.queue else None
    setup = providers.setup_kwargs(task.negatives, queue, labels)
    fn = providers.loss_fn(task.provider, task.rule, task.positives, settings.rule_params == "supcon")
    return views, _make_call(fn, views, task.mode, setup)


def _warm_up(call, task: Task, settings: Settings, done: int = 0) -> float | None:
    """Untimed calls first (compilation, autotuning, first-touch allocations): at least one,
    one more for torch.compile, less the `done` ones already made. Returns the duration of
    the last in seconds (None if none was left to make)."""
    elapsed = None
    for _ in range(max(settings.warmup, 1) + (task.provider == "compile") - done):
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
    return elapsed


def _time(task: Task, settings: Settings, device: torch.device, dtype: torch.dtype) -> dict:
    views, call = _inputs(task, settings, device, dtype)
    if device.type == "cpu":
        start = time.perf_counter()
        call()
        first_s = time.perf_counter() - start
        # torch.compile's first call is mostly compilation: never a measurement.
        if first_s > settings.single_call_s and task.provider != "compile":
            ms = first_s * 1e3
            return dict(median_ms=ms, p20_ms=ms, p80_ms=ms, repeats=1, calls_per_block=1, single_call=True,
                        note=f"; one call, no warm-up ({first_s:.1f} s > single-call limit {settings.single_call_s:g} s)")
        last_s = _warm_up(call, task, settings, done=1)
        estimate_s = first_s if last_s is None else last_s
        median, p20, p80, count, per_block = timing.time_cpu(call, settings.repeats, settings.budget_s, estimate_s)
        return dict(median_ms=median, p20_ms=p20, p80_ms=p80, repeats=count, calls_per_block=per_block)
    _warm_up(call, task, settings)
    for view in views:
        view.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    estimate_ms = timing.cuda_call_ms(call)   # the memory call also sizes the timing loop
    peak = torch.cuda.max_memory_allocated(device) - baseline
    median, p20, p80, count, per_block = timing.time_cuda(call, settings.repeats, settings.budget_s, estimate_ms)
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80, repeats=count, calls_per_block=per_block, peak_mb=max(peak, 0) / 2**20)

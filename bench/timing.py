"""Wall-clock timing of one benchmark call, and the matrix-product ceiling it is compared with.

CPU: `torch.utils.benchmark.Timer.blocked_autorange`, after the caller's warm-up. The Timer
runs the call in blocks (one call per block once a call takes more than a few milliseconds,
10^k for tiny calls, so that timer overhead stays below 1e-4 of a block) until the timed total
passes `min_run_time`, and pins the torch thread count while it does. `time_cpu` sets
`min_run_time` from the caller's estimate of one call so that about
`min(repeats, max(min_repeats, budget_s / call))` blocks are timed; blocked_autorange makes
untimed calls of its own to choose the block size (for calls over 10 ms, one: a second warm-up).
CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls), with its repetition
time stretched so that at least `repeats` calls are timed; calls slower than SLOW_CALL_MS are
timed one by one with CUDA events, at least 3 and at most what `budget_s` allows.

Both return (median, p20, p80) in milliseconds per call, the number of timed blocks and the
calls per block.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch
from torch.utils import benchmark

#: Largest matmul output the ceiling measurement allocates (elements): 2^24 on the CPU
#: (64 MiB in float32), 2^28 on a GPU. Bigger M is timed on a row block of the same shape class.
CEILING_OUTPUT_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
#: Shortest block of calls torch.utils.benchmark's blocked_autorange times (see time_cpu).
MIN_BLOCK_S = 0.01
#: On a GPU, calls slower than this are timed individually instead of by do_bench.
SLOW_CALL_MS = 500.0


def summarize(times_ms: list[float]) -> tuple[float, float, float]:
    median, p20, p80 = np.percentile(np.asarray(times_ms), [50, 20, 80])
    return float(median), float(p20), float(p80)


def time_cpu(fn: Callable[[], object], repeats: int, budget_s: float, estimate_s: float, min_repeats: int = 3,
             threads: int | None = None) -> tuple[float, float, float, int, int]:
    """(median, p20, p80) ms per call over the timed blocks, the number of blocks, calls per block.

    `estimate_s` is the duration of one call (the caller's last warm-up): it converts the
    wanted number of blocks into blocked_autorange's `min_run_time`.
    """
    estimate_s = max(estimate_s, 1e-7)
    wanted = min(max(repeats, 1), max(min_repeats, math.ceil(budget_s / estimate_s)))
    # blocked_autorange grows a block by powers of ten until the timer's overhead (about a
    # microsecond) is under 1e-4 of it: calls under MIN_BLOCK_S come in blocks of 10^k calls.
    block_s = estimate_s if estimate_s >= MIN_BLOCK_S else estimate_s * 10 ** math.ceil(math.log10(MIN_BLOCK_S / estimate_s))
    # The loop stops at the first block that brings the total past min_run_time: half a block
    # short of `wanted` blocks, so that a block slightly faster than the estimate does not add one.
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=(wanted - 0.5) * block_s)
    times_ms = [t * 1e3 for t in measurement.times]
    return (*summarize(times_ms), len(times_ms), int(measurement.number_per_run))


def cuda_call_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_cuda(fn: Callable[[], object], repeats: int, budget_s: float = 3.0, estimate_ms: float | None = None,
              min_repeats: int = 3) -> tuple[float, float, float, int, int]:
    """do_bench for calls under SLOW_CALL_MS; slower calls are timed one by one with CUDA events
    (do_bench would first spend five calls estimating, and an L2 flush is noise for them)."""
    import triton.testing

    estimate_ms = max(cuda_call_ms(fn) if estimate_ms is None else estimate_ms, 1e-3)
    if estimate_ms > SLOW_CALL_MS:
        count = max(min_repeats, min(repeats, int(budget_s * 1e3 / estimate_ms)))
        return (*summarize([cuda_call_ms(fn) for _ in range(count)]), count, 1)
    rep_ms = max(100.0, 1.2 * repeats * estimate_ms)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80), max(1, int(rep_ms / estimate_ms)), 1


def matmul_ceiling_gflops(m: int, d: int, dtype: torch.dtype, device: torch.device, repeats: int = 5, budget_s: float = 2.0) -> float:
    """GFLOP/s of torch.mm (R × D) @ (D × M) into a preallocated output, R = M or a row block.

    This is the rate the α-CL products (S = Z Zᵀ, αZ, αᵀZ) could run at, measured in the same
    run, same dtype, device and thread count, so `ceiling_fraction` compares like with like.
    """
    rows = min(m, max(1, CEILING_OUTPUT_ELEMENTS[device.type] // m))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(rows, d, generator=gen, device=device).to(dtype)
    b = torch.randn(d, m, generator=gen, device=device).to(dtype)
    out = torch.empty(rows, m, device=device, dtype=dtype)

    def product():
        torch.mm(a, b, out=out)

    if device.type == "cuda":
        median_ms = time_cuda(product, repeats)[0]
    else:
        # blocked_autorange batches a small product into blocks of 10^k calls by itself.
        product()
        t0 = time.perf_counter()
        product()
        median_ms = time_cpu(product, repeats, budget_s, estimate_s=time.perf_counter() - t0)[0]
    return 2.0 * rows * d * m / (median_ms * 1e-3) / 1e9

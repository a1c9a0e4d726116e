"""Wall-clock timing of one benchmark call, and the matrix-product ceiling it is compared with.

CPU: `time.perf_counter` around each call, after the caller's warm-up; at least
`min_repeats` calls, then stop at `repeats` calls or once `budget_s` seconds are spent.
CUDA: `triton.testing.do_bench` (CUDA events, L2 flushed between calls), with its repetition
time stretched so that at least `repeats` calls are timed; calls slower than SLOW_CALL_MS are
timed one by one with CUDA events, at least 3 and at most what `budget_s` allows.

Both return (median, p20, p80) in milliseconds and the number of timed calls.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

#: Largest matmul output the ceiling measurement allocates (elements): 2^24 on the CPU
#: (64 MiB in float32), 2^28 on a GPU. Bigger M is timed on a row block of the same shape class.
CEILING_OUTPUT_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 28}
#: On a GPU, calls slower than this are timed individually instead of by do_bench.
SLOW_CALL_MS = 500.0


def summarize(times_ms: list[float]) -> tuple[float, float, float]:
    median, p20, p80 = np.percentile(np.asarray(times_ms), [50, 20, 80])
    return float(median), float(p20), float(p80)


def time_cpu(fn: Callable[[], object], repeats: int, budget_s: float, min_repeats: int = 3) -> tuple[float, float, float, int]:
    times = []
    start = time.perf_counter()
    while len(times) < max(repeats, 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= min_repeats and time.perf_counter() - start > budget_s:
            break
    return (*summarize(times), len(times))


def cuda_call_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of one call, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def time_cuda(fn: Callable[[], object], repeats: int, budget_s: float = 3.0, estimate_ms: float | None = None,
              min_repeats: int = 3) -> tuple[float, float, float, int]:
    """do_bench for calls under SLOW_CALL_MS; slower calls are timed one by one with CUDA events
    (do_bench would first spend five calls estimating, and an L2 flush is noise for them)."""
    import triton.testing

    estimate_ms = max(cuda_call_ms(fn) if estimate_ms is None else estimate_ms, 1e-3)
    if estimate_ms > SLOW_CALL_MS:
        count = max(min_repeats, min(repeats, int(budget_s * 1e3 / estimate_ms)))
        return (*summarize([cuda_call_ms(fn) for _ in range(count)]), count)
    rep_ms = max(100.0, 1.2 * repeats * estimate_ms)
    median, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    return float(median), float(p20), float(p80), max(1, int(rep_ms / estimate_ms))


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
        median_ms, _, _, _ = time_cuda(product, repeats)
    else:
        # A small product takes microseconds: time batches of k calls (≥ 10 ms each) so that
        # timer resolution and scheduling noise do not dominate.
        product()
        t0 = time.perf_counter()
        product()
        k = max(1, int(0.01 / max(time.perf_counter() - t0, 1e-7)))
        median_ms, _, _, _ = time_cpu(lambda: [product() for _ in range(k)], repeats, budget_s)
        median_ms /= k
    return 2.0 * rows * d * m / (median_ms * 1e-3) / 1e9

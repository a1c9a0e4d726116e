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

import json
import math
import os
import subprocess
import sys
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


#: Rows and columns of the compute ceiling's products: the cpp kernel's tile, (T × D) @ (D × T)
#: with T = 256, whose T × T float32 output (256 KiB) stays in a core's L2 as the kernel's does.
CEILING_TILE = 256


#: The shortest window each of the ceiling's worker processes measures.
CEILING_MIN_WINDOW_S = 0.3


def tile_gemm_ceiling_gflops(d: int, dtype: torch.dtype, threads: int, budget_s: float = 2.0,
                             mode: str = "fwdbwd") -> float:
    """GFLOP/s of the cpp kernel's tile products into cache-resident outputs on the CPU, the way
    it runs them: `threads` single-threaded workers at once, each a loop of products on its own
    T × T tile (T = CEILING_TILE), in the kernel's mix for `mode`:

        fwd      S = A Bᵀ                                    (T × D)(D × T)
        fwdbwd   S = A Bᵀ twice (the sweep and the gradient pass), then G_a += W B and
                 G_b += Wᵀ A                                  (T × T)(T × D)

    A and B are row blocks of Z (T × D, row-major, B read transposed as the kernel reads it).
    This is the rate a fused CPU kernel's arithmetic can approach: torch.mm of an M × M output
    (`matmul_ceiling_gflops`) is bound by writing that output to memory, which no fused kernel
    does, and one product of a tile on several threads, or torch.bmm, splits so small a
    product that it costs more than it gains. The workers are processes, not threads: Python
    threads calling torch.mm with one intra-op thread were measured to run one at a time on
    this project's 2-core machine (about 100 GFLOP/s in all, as much as one worker alone), so
    they measured one core. The workers start together once all have warmed up and each
    measures a window of `budget_s` (at least CEILING_MIN_WINDOW_S); the ceiling is the sum of
    their rates, measured in the run so that it sees the machine as the providers'
    measurements do.
    """
    if mode not in ("fwd", "fwdbwd"):
        raise ValueError(f"mode must be 'fwd' or 'fwdbwd', got {mode!r}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    window = max(CEILING_MIN_WINDOW_S, budget_s)
    code = (f"import sys; sys.path.insert(0, {root!r}); from bench import timing; "
            f"print(timing.tile_products_rate({d}, {str(dtype).split('.')[-1]!r}, {mode!r}, {window!r}))")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    workers = [subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, env=env, text=True) for _ in range(threads)]
    try:
        for worker in workers:                  # each says "ready" once imported and warmed up
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"ceiling worker failed with exit code {worker.wait()}")
        for worker in workers:
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(worker.stdout.readline()) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    spread = max(r["start"] for r in results) - min(r["start"] for r in results)
    if spread > 0.1 * window:
        # A worker that started late measured partly alone: its rate is no concurrent rate.
        raise RuntimeError(f"the ceiling's workers started {spread:.2f} s apart; the machine is too loaded to measure it")
    return float(sum(r["gflops"] for r in results))


def tile_products_rate(d: int, dtype_name: str, mode: str, window_s: float) -> str:
    """One ceiling worker (`tile_gemm_ceiling_gflops`), on one thread: warms up, prints "ready",
    waits for a line on stdin, then returns JSON of its tile-product mix's GFLOP/s over
    `window_s` seconds and the wall-clock time it started."""
    torch.set_num_threads(1)
    t, dtype = CEILING_TILE, getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(t, d, generator=gen).to(dtype) for _ in range(2))
    s, ga, gb = torch.empty(t, t, dtype=dtype), torch.zeros(t, d, dtype=dtype), torch.zeros(t, d, dtype=dtype)

    def mix():
        torch.mm(a, b.t(), out=s)
        if mode == "fwdbwd":
            torch.mm(a, b.t(), out=s)
            ga.addmm_(s, b)
            gb.addmm_(s.t(), a)

    for _ in range(3):
        mix()
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    count, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < window_s:
        mix()
        count += 1
    gflops = (1 if mode == "fwd" else 4) * 2.0 * t * t * d * count / elapsed / 1e9
    return json.dumps({"gflops": gflops, "start": start})


#: FMA pipes per core assumed by `fma_peak_gflops`: two on the x86 server cores this project
#: runs on (Intel since Haswell, AMD since Zen 2); a core with one gives half the figure.
FMA_PIPES = 2


def _cpu_info() -> dict:
    """vendor, flags and clocks (MHz) from /proc/cpuinfo and lscpu; {} where unreadable."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("vendor_id", "flags", "cpu MHz") and key not in info:
                    info[key] = value
    except OSError:
        pass
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "CPU max MHz":
                info["max MHz"] = value.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fma_peak_gflops(threads: int, dtype: torch.dtype) -> tuple[float | None, str]:
    """(GFLOP/s, how it was derived) of the cores' multiply-add peak: threads × clock × SIMD
    lanes × 2 (an FMA is two flops) × FMA_PIPES; (None, why) where the clock or the vector
    width cannot be read. The clock is lscpu's maximum (else /proc/cpuinfo's current one); the
    lanes are AVX-512's 16 float32 (8 float64), AVX2's 8 or SSE's 4, with AMD's AVX-512 (Zen 4,
    two 256-bit halves) counted as 256 bits. bfloat16/float16 inputs are computed in float32.
    In a virtual machine the clock read is the nominal one and the cores may run faster, so
    this is a nominal figure; `tile_gemm_ceiling_gflops` measures the bound.
    """
    info = _cpu_info()
    flags = set(info.get("flags", "").split())
    mhz = info.get("max MHz") or info.get("cpu MHz")
    if not flags or not mhz:
        return None, "no /proc/cpuinfo flags or clock"
    bits = 512 if "avx512f" in flags and info.get("vendor_id") != "AuthenticAMD" else 256 if "avx2" in flags and "fma" in flags else 128
    width = 8 if dtype == torch.float64 else 4
    lanes = bits // (8 * width)
    ghz = float(mhz) / 1e3
    peak = threads * ghz * lanes * 2 * FMA_PIPES
    return peak, f"{threads} threads x {ghz:.2f} GHz x {lanes} lanes ({bits}-bit) x 2 x {FMA_PIPES} FMA pipes"

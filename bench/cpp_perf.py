r"""Performance target of the C++ CPU kernel (backend "cpp"), measured in one run.

    python bench/cpp_perf.py                     # M = 8192, D = 128, rule direct, float32, + M = 131072
    python bench/cpp_perf.py --repeats 9 --no-big --out /tmp/cpp_perf.json

Forward + backward of `fastalpha.alpha_cl_loss` with backend "cpp" against the dense eager
reference (backend "eager") and, where bench/chunked.py is present, the plain-PyTorch chunked
baseline, on the same inputs:

  * time: the providers take turns within each repeat (so a noisy neighbour slows all of
    them alike); the median over repeats after one warm-up is reported;
  * ceiling: a matmul Z Zᵀ of the same M, D is timed in the same turns; a fused fwd+bwd
    counts as 4 GEMM-shaped passes, 8·M²·D flops, and "fraction of ceiling" is
    (8·M²·D / t) / (matmul GFLOP/s) (the one-pass CPU kernel does 3 products, so > 1 is possible);
  * peak memory: each provider in a fresh subprocess, high-water mark of its resident set
    during one step beyond what it held before (glibc's mmap threshold pinned low so that
    freed buffers leave the process);
  * the large size runs the cpp backend once (the dense reference would need M² floats).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import fastalpha  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def chunked_loss():
    """bench/chunked.py's loss, or None where that file is absent."""
    try:
        sys.path.insert(0, os.path.join(ROOT, "bench"))
        from chunked import chunked_alpha_cl_loss
    except ImportError:
        return None
    return chunked_alpha_cl_loss


def step_fn(provider: str, rule: str):
    if provider == "chunked":
        loss = chunked_loss()
        return lambda z1, z2: loss(z1, z2, rule=rule)
    return lambda z1, z2: fastalpha.alpha_cl_loss(z1, z2, rule=rule, backend=provider)


def make_inputs(m: int, d: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(m // 2, d, generator=gen).requires_grad_()
    z2 = torch.randn(m // 2, d, generator=gen).requires_grad_()
    return z1, z2


def fwd_bwd(fn, z1, z2) -> None:
    z1.grad = z2.grad = None
    fn(z1, z2).backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_peak_memory(provider: str, m: int, d: int, rule: str) -> None:
    """In a fresh process: bytes above the pre-step resident set during one fwd+bwd."""
    z1, z2 = make_inputs(m, d)
    fn = step_fn(provider, rule)
    fwd_bwd(fn, z1, z2)  # warm-up: library load, thread pools, first-touch of allocator arenas
    z1.grad = z2.grad = None
    baseline = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fwd_bwd(fn, z1, z2)
    print(json.dumps({"peak_bytes": (_status_kib("VmHWM") - baseline) * 1024}))


def peak_memory(provider: str, m: int, d: int, rule: str) -> int | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", provider, "--m", str(m), "--d", str(d), "--rule", rule]
    out = subprocess.run(cmd, env=dict(os.environ, **MALLOC_ENV), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        print(f"  memory of {provider} failed: {out.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def time_providers(providers, m: int, d: int, rule: str, repeats: int) -> dict[str, list[float]]:
    z1, z2 = make_inputs(m, d)
    z = torch.cat([z1, z2]).detach()
    fns = {p: step_fn(p, rule) for p in providers}
    times = {p: [] for p in providers}
    times["matmul"] = []
    for p in providers:  # warm-up
        fwd_bwd(fns[p], z1, z2)
    torch.mm(z, z.T)
    for _ in range(repeats):
        for p in providers:
            t = time.perf_counter()
            fwd_bwd(fns[p], z1, z2)
            times[p].append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.mm(z, z.T)
        times["matmul"].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=8192, help="stacked rows M = 2N (default 8192)")
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--rule", default="direct")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big", type=int, default=131072, help="M of the large cpp-only run")
    parser.add_argument("--no-big", action="store_true", help="skip the large run")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_memory:
        child_peak_memory(args.child_memory, args.m, args.d, args.rule)
        return 0

    ok, reason = fastalpha.available_backends()["cpp"]
    if not ok:
        print(f"backend cpp unavailable: {reason}")
        return 1
    providers = ["cpp", "eager"] + (["chunked"] if chunked_loss() is not None else [])
    m, d = args.m, args.d
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; M={m} D={d} rule={args.rule} float32 fwd+bwd; "
          f"median of {args.repeats} interleaved repeats (noisy if the machine is shared)")
    times = time_providers(providers, m, d, args.rule, args.repeats)
    med = {p: statistics.median(v) for p, v in times.items()}
    mm_gflops = 2 * m * m * d / med["matmul"] / 1e9
    fused_flops = 8 * m * m * d
    results = {"m": m, "d": d, "rule": args.rule, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "matmul_gflops": mm_gflops, "providers": {}}
    for p in providers:
        peak = None if args.no_memory else peak_memory(p, m, d, args.rule)
        results["providers"][p] = {"median_s": med[p], "times_s": times[p], "peak_bytes": peak,
                                   "gflops": fused_flops / med[p] / 1e9,
                                   "fraction_of_ceiling": fused_flops / med[p] / 1e9 / mm_gflops}
    print(f"matmul Z Zᵀ: {med['matmul'] * 1e3:.1f} ms -> {mm_gflops:.1f} GFLOP/s (ceiling for 8·M²·D: "
          f"{fused_flops / mm_gflops / 1e9:.3f} s)")
    print(f"{'provider':<10}{'median s':>10}{'min s':>9}{'max s':>9}{'GFLOP/s':>9}{'of ceiling':>12}{'peak MiB':>10}")
    for p, r in results["providers"].items():
        peak = "-" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.1f}"
        print(f"{p:<10}{r['median_s']:>10.3f}{min(r['times_s']):>9.3f}{max(r['times_s']):>9.3f}{r['gflops']:>9.1f}"
              f"{r['fraction_of_ceiling']:>12.2f}{peak:>10}")
    cpp, eager = results["providers"]["cpp"], results["providers"]["eager"]
    results["speedup_vs_eager"] = eager["median_s"] / cpp["median_s"]
    line = f"cpp vs eager: {results['speedup_vs_eager']:.2f}x faster"
    if cpp["peak_bytes"] and eager["peak_bytes"]:
        results["memory_ratio_vs_eager"] = eager["peak_bytes"] / cpp["peak_bytes"]
        line += f", {results['memory_ratio_vs_eager']:.1f}x less peak memory"
    if "chunked" in results["providers"]:
        results["speedup_vs_chunked"] = results["providers"]["chunked"]["median_s"] / cpp["median_s"]
        line += f"; {results['speedup_vs_chunked']:.2f}x faster than eager-chunked"
    print(line + f"; {cpp['fraction_of_ceiling']:.2f} of the matmul ceiling")

    if not args.no_big:
        z1, z2 = make_inputs(args.big, d, seed=1)
        fn = step_fn("cpp", args.rule)
        t = time.perf_counter()
        fwd_bwd(fn, z1, z2)
        big = time.perf_counter() - t
        big_gflops = 8 * args.big**2 * d / big / 1e9
        results["big"] = {"m": args.big, "seconds": big, "gflops": big_gflops, "fraction_of_ceiling": big_gflops / mm_gflops}
        print(f"cpp M={args.big} D={d}: {big:.1f} s fwd+bwd (one run), {big_gflops:.1f} GFLOP/s, "
              f"{big_gflops / mm_gflops:.2f} of the matmul ceiling measured above")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

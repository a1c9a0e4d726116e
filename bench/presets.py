"""Named benchmark runs (`python bench/compare.py --preset NAME`) and the targets some report.

A preset is a list of groups, each a product of providers × rules × sizes × dims × dtypes ×
modes × setups, plus run settings. `cpu-targets` measures what issue 14 asks of the cpp
backend and `target_report` prints its ratio table with PASS/FAIL: a report of one run, not a
test (timings on a shared machine are noisy; the load average is printed with it).
"""
from __future__ import annotations

from dataclasses import dataclass

from .report import machine_line

CPU_TARGET_M = 8192
CPU_LARGE_M = 262144
QUEUE_ROWS = 65536
#: The supervised (SupCon) presets: rows of the one labelled view.
SUPCON_SIZES = [1024, 2048, 4096, 8192, 16384]
SUPCON_CUDA_SIZES = [16384, 32768, 65536]
#: Memory cap of the supcon preset: pml's SupConLoss at M = 16384 fwd+bwd is predicted at
#: 12·M²·4 bytes = 12 GiB (providers.DENSE_PEAK_FACTOR; 11.3 GiB by the factor measured up to
#: M = 8192), which the default CPU cap of 4 GiB would record as OOM without running; the
#: machine it is meant for has 24 GB.
SUPCON_MEM_CAP_GB = 24.0

PRESETS = {
    "cpu-targets": dict(
        device="cpu",
        help=f"cpp vs chunked vs eager at M={CPU_TARGET_M}, D=128, float32 (fwd+bwd direct and infonce, fwd infonce), "
             f"RSS growth of a fresh process, cpp at M={CPU_LARGE_M}; prints the targets with PASS/FAIL",
        groups=[
            dict(providers=["cpp", "chunked", "eager"], rules=["direct", "infonce"], sizes=[CPU_TARGET_M], modes=["fwdbwd"]),
            dict(providers=["cpp", "chunked", "eager"], rules=["infonce"], sizes=[CPU_TARGET_M], modes=["fwd"]),
            dict(providers=["cpp"], rules=["direct"], sizes=[CPU_LARGE_M], modes=["fwdbwd"]),
        ],
        common=dict(dims=[128], dtypes=["float32"], setups=["all"]),
        settings=dict(repeats=7, budget_s=5.0, memory="both"),
    ),
    "setups": dict(
        device="cpu",
        help=f"the negatives set-ups at M={CPU_TARGET_M}, D=128, float32 fwd+bwd, infonce and direct: all (SimCLR), "
             f"cross (CLIP), none+queue and all+queue (K={QUEUE_ROWS})",
        groups=[dict(providers=["cpp", "chunked", "eager"], rules=["infonce", "direct"], sizes=[CPU_TARGET_M], modes=["fwdbwd"])],
        common=dict(dims=[128], dtypes=["float32"], setups=["all", "cross", "none+queue", "all+queue"]),
        settings=dict(repeats=5, budget_s=3.0, memory="pinned"),
    ),
    "setups-cuda": dict(
        device="cuda",
        help="the negatives set-ups on a GPU at M=16384 and 65536, D=128, fwd+bwd, infonce and direct, float32 and bfloat16",
        groups=[dict(providers=["triton", "cuda", "chunked", "eager"], rules=["infonce", "direct"], sizes=[16384, 65536],
                     modes=["fwdbwd"])],
        common=dict(dims=[128], dtypes=["float32", "bfloat16"], setups=["all", "cross", "none+queue", "all+queue"]),
        settings=dict(repeats=10, budget_s=3.0),
    ),
    "supcon": dict(
        device="cpu",
        help=f"labels (SupCon, infonce at temperature 0.1): cpp, chunked and eager vs pytorch-metric-learning's SupConLoss "
             f"at M={','.join(map(str, SUPCON_SIZES))} rows of one view, D=128, float32 fwd+bwd, memory cap {SUPCON_MEM_CAP_GB:g} GiB",
        groups=[dict(providers=["cpp", "chunked", "eager", "pml"], rules=["infonce"], sizes=SUPCON_SIZES, modes=["fwdbwd"])],
        common=dict(dims=[128], dtypes=["float32"], setups=["labels"]),
        # Calls up to 300 s are still repeated and get their memory taken: pml at M = 16384 is
        # estimated at 1-2 minutes a call on 2 cores (26 s at M = 8192 on one busy core, growing
        # faster than M²), and its peak is what this preset is for.
        settings=dict(repeats=5, budget_s=3.0, memory="pinned", single_call_s=300.0, mem_cap_gb=SUPCON_MEM_CAP_GB),
    ),
    "supcon-cuda": dict(
        device="cuda",
        help=f"labels (SupCon) on a GPU: triton, cuda, chunked vs pytorch-metric-learning's SupConLoss at "
             f"M={','.join(map(str, SUPCON_CUDA_SIZES))}, D=128, fwd+bwd, float32 and bfloat16",
        groups=[dict(providers=["triton", "cuda", "chunked", "pml"], rules=["infonce"], sizes=SUPCON_CUDA_SIZES, modes=["fwdbwd"])],
        common=dict(dims=[128], dtypes=["float32", "bfloat16"], setups=["labels"]),
        settings=dict(repeats=10, budget_s=3.0),
    ),
}


@dataclass(frozen=True)
class Target:
    what: str
    kind: str          # "speedup": baseline time / cpp time; "memory_ratio": eager / cpp RSS growth;
                       # "memory_max": cpp RSS growth in MB; "completes": the run finished
    rule: str
    mode: str
    m: int
    bound: float = 0.0


#: Issue 14's targets for the cpp backend (2 cores, D = 128, float32).
CPU_TARGETS = (
    Target("cpp speed-up over chunked, direct fwd+bwd", "speedup", "direct", "fwdbwd", CPU_TARGET_M, 2.0),
    Target("cpp speed-up over chunked, infonce fwd+bwd", "speedup", "infonce", "fwdbwd", CPU_TARGET_M, 1.6),
    Target("cpp speed-up over chunked, infonce fwd", "speedup", "infonce", "fwd", CPU_TARGET_M, 1.5),
    Target("eager / cpp RSS growth, direct fwd+bwd", "memory_ratio", "direct", "fwdbwd", CPU_TARGET_M, 30.0),
    Target("eager / cpp RSS growth, infonce fwd+bwd", "memory_ratio", "infonce", "fwdbwd", CPU_TARGET_M, 30.0),
    Target("cpp RSS growth (MB), direct fwd+bwd", "memory_max", "direct", "fwdbwd", CPU_TARGET_M, 40.0),
    Target("cpp RSS growth (MB), infonce fwd+bwd", "memory_max", "infonce", "fwdbwd", CPU_TARGET_M, 40.0),
    Target(f"cpp M={CPU_LARGE_M} direct fwd+bwd completes (s)", "completes", "direct", "fwdbwd", CPU_LARGE_M),
)
TARGETS = {"cpu-targets": CPU_TARGETS}


def _row(rows, provider, target):
    for r in rows:
        if (r["provider"], r["rule"], r["mode"], r["M"], r["D"], r["dtype"], r["negatives"], r["queue"], r["positives"]) == \
                (provider, target.rule, target.mode, target.m, 128, "float32", "all", 0, "pair"):
            return r
    return None


def _evaluate(rows, target):
    """(measured text, needed text, verdict) of one target."""
    cpp = _row(rows, "cpp", target)
    if cpp is None or cpp["status"] != "ok":
        return "-", "", f"MISSING (cpp: {'not run' if cpp is None else cpp['status']})"
    if target.kind == "completes":
        return f"{cpp['median_ms'] / 1e3:.1f}", "completes", "PASS"
    if target.kind == "memory_max":
        mb = cpp["rss_growth_mb"]
        if mb is None:
            return "-", f"<= {target.bound:g}", "MISSING (no RSS growth)"
        mb *= 2**20 / 1e6
        return f"{mb:.1f}", f"<= {target.bound:g}", "PASS" if mb <= target.bound else "FAIL"
    baseline_name = "chunked" if target.kind == "speedup" else "eager"
    baseline = _row(rows, baseline_name, target)
    if baseline is None or baseline["status"] != "ok":
        return "-", f">= {target.bound:g}x", f"MISSING ({baseline_name}: {'not run' if baseline is None else baseline['status']})"
    if target.kind == "speedup":
        ratio = baseline["median_ms"] / cpp["median_ms"]
        extra = ""
    else:
        if not cpp["rss_growth_mb"] or baseline["rss_growth_mb"] is None:
            return "-", f">= {target.bound:g}x", "MISSING (no RSS growth)"
        ratio = baseline["rss_growth_mb"] / cpp["rss_growth_mb"]
        pinned = baseline["peak_mb"] / cpp["peak_mb"] if cpp.get("peak_mb") and baseline.get("peak_mb") is not None else None
        extra = "" if pinned is None else f"  (per-call peak, pinned allocator: {pinned:.1f}x)"
    return f"{ratio:.2f}x", f">= {target.bound:g}x", ("PASS" if ratio >= target.bound else "FAIL") + extra


def target_report(preset: str, rows: list[dict], env: dict, load_end: float | None) -> str:
    """The preset's targets against one run's rows; '' for a preset without targets."""
    targets = TARGETS.get(preset)
    if not targets:
        return ""
    lines = [f"targets of --preset {preset} (one run, a report, not a test): {machine_line(env, load_end)}",
             f"{'target':<48}{'measured':>10}{'needed':>12}  verdict", "-" * 82]
    for target in targets:
        measured, needed, verdict = _evaluate(rows, target)
        lines.append(f"{target.what:<48}{measured:>10}{needed:>12}  {verdict}")
    if env.get("load_start") is not None and env.get("cores") and max(env["load_start"], load_end or 0) >= env["cores"]:
        lines.append(f"WARNING: the 1-minute load reached {max(env['load_start'], load_end or 0):.2f} on {env['cores']} cores: "
                     "other processes competed for the CPU, the ratios are unreliable")
    return "\n".join(lines)


def expand(preset: str) -> list[dict]:
    """The groups of a preset with its common fields filled in."""
    spec = PRESETS[preset]
    return [dict(spec["common"], **group) for group in spec["groups"]]


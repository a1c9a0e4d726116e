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
#: The supervised (SupCon) presets: rows of the one labelled view (and, for the SimCLR rows of
#: `supcon`, the stacked rows of two views: the same M).
SUPCON_SIZES = [8192, 16384]
#: The labelled batch `supcon` only checks completes (one call, cpp).
SUPCON_LARGE_M = 131072
SUPCON_CUDA_SIZES = [16384, 32768, 65536]
#: The cross-batch memory rows of `supcon`: a labelled batch of XBM_BATCH rows through a full
#: memory of each of XBM_MEMORY_SIZES slots (fastalpha.CrossBatchMemory vs pml's).
XBM_BATCH = 1024
XBM_MEMORY_SIZES = [4096, 16384, 65536]
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
        help=f"labels (SupCon: infonce, temperature 0.1, eps 1): cpp, chunked and pytorch-metric-learning's SupConLoss, "
             f"and cpp's SimCLR call (two views, the same parameters) at M={','.join(map(str, SUPCON_SIZES))}, "
             f"cpp labelled at M={SUPCON_LARGE_M}; a labelled batch of {XBM_BATCH} rows through a full cross-batch "
             f"memory of {','.join(map(str, XBM_MEMORY_SIZES))} slots: fastalpha.CrossBatchMemory on cpp and chunked vs "
             f"pml's CrossBatchMemory(SupConLoss); D=128, float32 fwd+bwd, memory cap {SUPCON_MEM_CAP_GB:g} GiB; "
             f"prints issue 35's targets with PASS/FAIL (about 15 minutes on 2 cores)",
        groups=[
            dict(providers=["cpp", "chunked", "pml"], rules=["infonce"], sizes=SUPCON_SIZES, setups=["labels"]),
            dict(providers=["cpp"], rules=["infonce"], sizes=SUPCON_SIZES, setups=["all"]),
            dict(providers=["cpp"], rules=["infonce"], sizes=[SUPCON_LARGE_M], setups=["labels"]),
            dict(providers=["cpp", "chunked", "pml"], rules=["infonce"], sizes=[XBM_BATCH],
                 setups=[f"labels+memory{k}" for k in XBM_MEMORY_SIZES]),
        ],
        common=dict(dims=[128], dtypes=["float32"], modes=["fwdbwd"]),
        # SupCon's parameters for the SimCLR rows too, so that labelled / unlabelled compares
        # equal work (τ = 0.1 decides, e.g., whether the cpp kernel's fixed shift applies).
        rule_params="supcon",
        # Calls up to 60 s are repeated and get their memory taken (pml at M = 16384 took 26 s
        # on 2 quiet cores); a longer one (cpp at M = 131072) is one call without a warm-up
        # and without memory figures, which is all its "completes" target needs.
        settings=dict(repeats=5, budget_s=3.0, memory="both", single_call_s=60.0, mem_cap_gb=SUPCON_MEM_CAP_GB),
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
@dataclass(frozen=True)
class RatioTarget:
    """top's `field` / bottom's `field` at M = m (D = 128, float32, fwd+bwd, infonce), each side
    a (provider, positives) row; at_least: ratio >= bound, else ratio <= bound. kind
    "completes": bottom's row is ok."""
    what: str
    m: int
    top: tuple
    bottom: tuple
    field: str = "median_ms"
    bound: float = 1.0
    at_least: bool = True
    kind: str = "ratio"


CPP_LABELS, CPP_PAIRS = ("cpp", "labels"), ("cpp", "pair")
#: Issue 35's targets (2 cores, D = 128, float32, fwd+bwd, SupCon's infonce, 100-odd classes:
#: classes of 8 rows and singletons, providers.supcon_labels).
SUPCON_TARGETS = tuple(
    target
    for m in SUPCON_SIZES
    for target in (
        RatioTarget(f"cpp speed-up over chunked, labels, M={m}", m, ("chunked", "labels"), CPP_LABELS, bound=2.0),
        RatioTarget(f"cpp speed-up over pml SupConLoss, M={m}", m, ("pml", "labels"), CPP_LABELS, bound=15.0),
        RatioTarget(f"cpp labelled / unlabelled time, M={m}", m, CPP_LABELS, CPP_PAIRS, bound=1.2, at_least=False),
        RatioTarget(f"cpp labelled / unlabelled RSS growth, M={m}", m, CPP_LABELS, CPP_PAIRS, field="rss_growth_mb",
                    bound=1.25, at_least=False),
    )
) + (RatioTarget(f"cpp labelled M={SUPCON_LARGE_M} completes (s)", SUPCON_LARGE_M, CPP_LABELS, CPP_LABELS,
                 kind="completes"),)
TARGETS = {"cpu-targets": CPU_TARGETS, "supcon": SUPCON_TARGETS}


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


def _supcon_row(rows, provider, positives, m):
    for r in rows:
        if (r["provider"], r["positives"], r["M"], r["rule"], r["mode"], r["D"], r["dtype"], r["negatives"], r["queue"]) == \
                (provider, positives, m, "infonce", "fwdbwd", 128, "float32", "all", 0):
            return r
    return None


def _evaluate_ratio(rows, target: RatioTarget):
    """(measured text, needed text, verdict) of a RatioTarget."""
    sides = {}
    for name, (provider, positives) in (("top", target.top), ("bottom", target.bottom)):
        r = _supcon_row(rows, provider, positives, target.m)
        if r is None or r["status"] != "ok":
            return "-", "", f"MISSING ({provider} {positives}: {'not run' if r is None else r['status']})"
        sides[name] = r
    if target.kind == "completes":
        return f"{sides['bottom']['median_ms'] / 1e3:.1f}", "completes", "PASS"
    top, bottom = sides["top"].get(target.field), sides["bottom"].get(target.field)
    needed = f"{'>=' if target.at_least else '<='} {target.bound:g}x"
    if top is None or not bottom:
        return "-", needed, f"MISSING (no {target.field})"
    ratio = top / bottom
    ok = ratio >= target.bound if target.at_least else ratio <= target.bound
    extra = f"  ({top:.1f} / {bottom:.1f} MiB)" if target.field == "rss_growth_mb" else ""
    return f"{ratio:.2f}x", needed, ("PASS" if ok else "FAIL") + extra


def target_report(preset: str, rows: list[dict], env: dict, load_end: float | None) -> str:
    """The preset's targets against one run's rows; '' for a preset without targets."""
    targets = TARGETS.get(preset)
    if not targets:
        return ""
    lines = [f"targets of --preset {preset} (one run, a report, not a test): {machine_line(env, load_end)}",
             f"{'target':<48}{'measured':>10}{'needed':>12}  verdict", "-" * 82]
    for target in targets:
        measured, needed, verdict = (_evaluate_ratio if isinstance(target, RatioTarget) else _evaluate)(rows, target)
        lines.append(f"{target.what:<48}{measured:>10}{needed:>12}  {verdict}")
    if env.get("load_start") is not None and env.get("cores") and max(env["load_start"], load_end or 0) >= env["cores"]:
        lines.append(f"WARNING: the 1-minute load reached {max(env['load_start'], load_end or 0):.2f} on {env['cores']} cores: "
                     "other processes competed for the CPU, the ratios are unreliable")
    return "\n".join(lines)


def expand(preset: str) -> list[dict]:
    """The groups of a preset with its common fields filled in."""
    spec = PRESETS[preset]
    return [dict(spec["common"], **group) for group in spec["groups"]]


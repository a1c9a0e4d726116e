"""Rows of a benchmark run: derived columns, the CSV file and the printed table.

Derived columns of an `ok` row:

    gflops            = flops / median time, flops = 8·M²·D for fwd+bwd (a fused kernel's four
                        GEMM-shaped passes: S twice, αZ, αᵀZ) and 2·M²·D for fwd alone. The
                        same nominal count for every provider, so gflops is a rate of *work
                        done for the user*, comparable across providers.
    ceiling_gflops    torch.mm rate of the same shape class, measured by the process that took
                      the measurement, just before its first one of that shape (bench/runner.py)
    ceiling_fraction  = gflops / ceiling_gflops. With the nominal count this can exceed 1 for
                      an implementation doing fewer than four GEMM passes (one-pass designs
                      with three products per chunk top out at 8/6 ≈ 1.33 of their real rate).
    speedup_vs_eager  = eager median / this median   (same rule, M, D, dtype, mode)
    speedup_vs_chunked = eager-chunked median / this median
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict

COLUMNS = (
    "provider", "rule", "M", "D", "dtype", "mode",
    "median_ms", "p20_ms", "p80_ms", "repeats", "peak_mb",
    "gflops", "ceiling_gflops", "ceiling_fraction", "speedup_vs_eager", "speedup_vs_chunked",
    "status", "reason",
    "device", "threads", "torch", "triton", "git_commit", "timestamp", "load_1min",
)
STATUSES = ("ok", "OOM", "wrong", "error", "unavailable")


def nominal_flops(m: int, d: int, mode: str) -> float:
    return (8.0 if mode == "fwdbwd" else 2.0) * m * m * d


def add_derived(rows: list[dict]) -> list[dict]:
    """Fill gflops, ceiling_fraction and the speed-up columns (ceiling_gflops comes measured)."""
    medians = {(r["provider"], r["rule"], r["M"], r["D"], r["dtype"], r["mode"]): r["median_ms"]
               for r in rows if r["status"] == "ok"}
    for r in rows:
        r.update(gflops=None, ceiling_fraction=None, speedup_vs_eager=None, speedup_vs_chunked=None)
        r.setdefault("ceiling_gflops", None)
        if r["status"] != "ok":
            continue
        r["gflops"] = nominal_flops(r["M"], r["D"], r["mode"]) / (r["median_ms"] * 1e-3) / 1e9
        if r["ceiling_gflops"]:
            r["ceiling_fraction"] = r["gflops"] / r["ceiling_gflops"]
        same = (r["rule"], r["M"], r["D"], r["dtype"], r["mode"])
        for column, baseline in (("speedup_vs_eager", "eager"), ("speedup_vs_chunked", "eager-chunked")):
            if (baseline, *same) in medians:
                r[column] = medians[(baseline, *same)] / r["median_ms"]
    return rows


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_value(r.get(c)) for c in COLUMNS})


def read_csv(path: str) -> list[dict]:
    """Rows of a results CSV with numbers parsed back (empty cells become None)."""
    ints = ("M", "D", "repeats", "threads")
    floats = ("median_ms", "p20_ms", "p80_ms", "peak_mb", "gflops", "ceiling_gflops", "ceiling_fraction",
              "speedup_vs_eager", "speedup_vs_chunked", "load_1min")
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            for c in ints + floats:
                row[c] = None if row[c] == "" else (int(row[c]) if c in ints else float(row[c]))
            rows.append(row)
    return rows


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def table(rows: list[dict]) -> str:
    """A text table per (rule, D, dtype, mode); unavailable providers listed once at the top."""
    lines = []
    unavailable = {}
    for r in rows:
        if r["status"] == "unavailable":
            unavailable.setdefault(r["provider"], r["reason"])
    for provider, reason in unavailable.items():
        lines.append(f"{provider}: unavailable ({reason})")
    groups = defaultdict(list)
    for r in rows:
        if r["status"] != "unavailable":
            groups[(r["rule"], r["D"], r["dtype"], r["mode"])].append(r)
    header = (f"{'provider':<14}{'M':>8}{'median ms':>12}{'p20-p80 ms':>20}{'peak MiB':>10}{'GFLOP/s':>9}"
              f"{'ceil':>6}{'x eager':>9}{'x chunked':>10}  status")
    for (rule, d, dtype, mode), group in groups.items():
        lines += ["", f"rule={rule}  D={d}  dtype={dtype}  mode={mode}", header, "-" * len(header)]
        for r in sorted(group, key=lambda r: (r["M"], r["provider"])):
            spread = f"{_fmt(r['p20_ms'], '.4g')}-{_fmt(r['p80_ms'], '.4g')}" if r["status"] == "ok" else "-"
            note = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:70]}"
            lines.append(
                f"{r['provider']:<14}{r['M']:>8}{_fmt(r['median_ms'], '.4g'):>12}{spread:>20}"
                f"{_fmt(r['peak_mb'], '.1f'):>10}{_fmt(r['gflops'], '.1f'):>9}{_fmt(r['ceiling_fraction'], '.0%'):>6}"
                f"{_fmt(r['speedup_vs_eager'], '.2f'):>9}{_fmt(r['speedup_vs_chunked'], '.2f'):>10}  {note}")
    return "\n".join(lines)

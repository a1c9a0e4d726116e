"""Rows of a benchmark run: derived columns, the CSV file and the printed table.

Derived columns of an `ok` row:

    gflops            = flops / median time, with the same nominal count for every provider
                        (`nominal_flops`), so gflops is a rate of *work done for the user*,
                        comparable across providers. Per column of an anchor's score row:
                        8·D for fwd+bwd (a fused kernel's four GEMM-shaped passes: S twice,
                        αZ, αᵀZ), 6·D for a queue column (it gets no gradient: no αᵀQ), 2·D
                        for fwd alone. Score columns per anchor: M ("all", and "labels",
                        where M is the rows of its one view), M/2 ("cross"),
                        0 ("none"), plus K for a queue.
    true_gflops       = true_flops / median time: the flops the provider's algorithm really does
                        (`true_flops`: the cpp kernel's symmetric tiles 4·M²·D fwd+bwd, its one
                        pass and the chunked/dense ones 6·M·C·D; C = M + K columns), its rate
    ceiling_gflops    the compute ceiling, measured by the process that took the measurement,
                      just before its first one of that D, dtype and mode (bench/runner.py): on
                      the CPU the cpp kernel's tile products (the fwd or fwd+bwd mix) into
                      cache-resident outputs, one single-threaded worker process per thread
                      (timing.tile_gemm_ceiling_gflops); on a GPU torch.mm of the same shape class
    ceiling_fraction  = true_gflops / ceiling_gflops: how close the provider's own arithmetic
                      runs to the products' rate (at most about 1: a fused kernel does these
                      products and more)
    fma_peak_gflops   the cores' multiply-add peak from clock and vector width (CPU,
                      timing.fma_peak_gflops), and peak_fraction = true_gflops / it
    speedup_vs_B        = B's median / this median, B in SPEEDUP_BASELINES (eager, chunked, pml)
    memory_saving_vs_B  = B's peak_mb / this peak_mb (how many times less memory than B), B in
                        MEMORY_BASELINES (eager, pml: the O(M²) ones)
                        for the same rule, M, D, dtype, mode and set-up, where B has an `ok`
                        row (and a peak) in the same run

Memory columns: peak_mb is the per-call peak beyond the inputs (CPU: one call in a worker whose
allocator returns every freed buffer, bench/memory.py; GPU: torch.cuda.max_memory_allocated);
rss_growth_mb is the resident-set growth of a fresh process over three calls with the default
allocator (CPU only, bench/runner.py `run_rss`), what a training process sees.
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict

from .providers import canonical

#: The providers every row's time and peak memory are compared with, when they ran in the same run.
SPEEDUP_BASELINES = ("eager", "chunked", "pml")
MEMORY_BASELINES = ("eager", "pml")
#: (column, baseline, the row's field it divides, table heading) of every ratio column.
RATIOS = tuple((f"speedup_vs_{b}", b, "median_ms", f"x {b}") for b in SPEEDUP_BASELINES) + \
    tuple((f"memory_saving_vs_{b}", b, "peak_mb", f"mem x {b}") for b in MEMORY_BASELINES)
COLUMNS = (
    "provider", "rule", "M", "D", "dtype", "mode", "negatives", "queue", "positives",
    "median_ms", "p20_ms", "p80_ms", "repeats", "calls_per_block", "peak_mb", "rss_growth_mb",
    "gflops", "true_gflops", "ceiling_gflops", "ceiling_fraction", "fma_peak_gflops", "peak_fraction",
    *(column for column, *_ in RATIOS),
    "status", "reason",
    "device", "threads", "cores", "torch", "triton", "git_commit", "timestamp", "load_start", "load_end",
)
STATUSES = ("ok", "OOM", "wrong", "error", "unavailable", "skipped")
#: Columns an older CSV may lack, with the value they had then.
OLD_DEFAULTS = {"negatives": "all", "queue": 0, "positives": "pair"}


def score_columns(m: int, negatives: str) -> float:
    """Batch columns in an anchor's score row: the rows a setup compares it with."""
    return {"all": m, "cross": m / 2, "none": 0}[negatives]


def nominal_flops(m: int, d: int, mode: str, negatives: str = "all", queue: int = 0) -> float:
    batch, per_queue = (8.0, 6.0) if mode == "fwdbwd" else (2.0, 2.0)
    return m * d * (batch * score_columns(m, negatives) + per_queue * queue)


def cpp_algorithm(m: int, d: int, mode: str, negatives: str = "all", queue: int = 0, rule: str = "direct",
                  positives: str = "pair", forced: str | None = None) -> str:
    """"symmetric" or "onepass": what csrc/alpha_cl_cpu.cpp's choose_algorithm runs for a full
    anchor range (`forced`: FASTALPHA_CPP_ALGORITHM). Labels run the symmetric tiles but for square."""
    if positives == "labels" and rule == "square":
        return "onepass"
    if forced in ("onepass", "symmetric"):
        return forced
    if negatives == "none" or queue >= m:
        return "onepass"
    large = (m >= 2048 and m * d >= 2**18) if mode == "fwdbwd" else m >= 1024
    return "symmetric" if large and d >= 32 else "onepass"


def true_flops(provider: str, m: int, d: int, mode: str, negatives: str = "all", queue: int = 0, rule: str = "direct",
               positives: str = "pair", forced: str | None = None) -> float:
    """Multiply-add flops (2 per FMA) of one call as the provider computes it.

    One pass over full rows (cpp's and cuda's one pass, chunked, the dense eager/compile/pml):
    S = Z [Z; Q]ᵀ, then ω[Z; Q] and ωᵀZ, 6·M·C·D fwd+bwd and 2·M·C·D forward, C = M + K
    (the masked columns of "cross"/"none" are computed too). cpp's symmetric tiles: each pair of
    Z once for both anchors, pass 1 one product and pass 2 three over M²/2 pairs, 4·M²·D fwd+bwd
    and M²·D forward ("cross": the cross-view quarter of the pairs, half of that), and 8·M·K·D
    (forward 2·M·K·D) for the queue's one-directional pairs. triton: the nominal count. A
    cross-batch memory (positives="memory", K slots that hold the batch too): pml compares the
    batch with the memory only, C = K; fastalpha's call has the batch's own columns as well,
    ignored (C = M + K).
    """
    columns = m + queue
    if positives == "memory" and provider == "pml":
        columns = queue
    if provider == "triton":
        return nominal_flops(m, d, mode, negatives, queue)
    if provider == "cpp" and cpp_algorithm(m, d, mode, negatives, queue, rule, positives, forced) == "symmetric":
        pairs = {"all": 1.0, "cross": 0.5}[negatives] * m * m * d
        return (4.0 * pairs + 8.0 * m * queue * d) if mode == "fwdbwd" else (pairs + 2.0 * m * queue * d)
    return (6.0 if mode == "fwdbwd" else 2.0) * m * columns * d


def _same(r: dict) -> tuple:
    return (r["rule"], r["M"], r["D"], r["dtype"], r["mode"], r["negatives"], r["queue"], r["positives"])


def add_derived(rows: list[dict]) -> list[dict]:
    """Fill gflops, ceiling_fraction and the ratio columns (ceiling_gflops comes measured)."""
    ok = {(r["provider"], *_same(r)): r for r in rows if r["status"] == "ok"}
    for r in rows:
        r.update(gflops=None, true_gflops=None, ceiling_fraction=None, peak_fraction=None,
                 **{column: None for column, *_ in RATIOS})
        r.setdefault("ceiling_gflops", None)
        r.setdefault("fma_peak_gflops", None)
        if r["status"] != "ok":
            continue
        seconds = r["median_ms"] * 1e-3
        r["gflops"] = nominal_flops(r["M"], r["D"], r["mode"], r["negatives"], r["queue"]) / seconds / 1e9
        r["true_gflops"] = true_flops(r["provider"], r["M"], r["D"], r["mode"], r["negatives"], r["queue"], r["rule"],
                                      r["positives"], r.get("cpp_algorithm")) / seconds / 1e9
        if r["ceiling_gflops"]:
            r["ceiling_fraction"] = r["true_gflops"] / r["ceiling_gflops"]
        if r["fma_peak_gflops"]:
            r["peak_fraction"] = r["true_gflops"] / r["fma_peak_gflops"]
        for column, baseline, field, _ in RATIOS:
            base = ok.get((baseline, *_same(r)))
            # A peak under a page rounds to 0: no ratio rather than a division by zero.
            if base is not None and base.get(field) is not None and r.get(field):
                r[column] = base[field] / r[field]
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
    """Rows of a results CSV with numbers parsed back (empty cells become None).

    Older files are read too: provider "eager-chunked" becomes "chunked", a missing
    negatives/queue/positives column the default setup, and load_1min (taken at a measurement's end)
    becomes load_end."""
    ints = ("M", "D", "repeats", "calls_per_block", "threads", "cores", "queue")
    floats = ("median_ms", "p20_ms", "p80_ms", "peak_mb", "rss_growth_mb", "gflops", "true_gflops", "ceiling_gflops",
              "ceiling_fraction", "fma_peak_gflops", "peak_fraction",
              *(column for column, *_ in RATIOS), "load_start", "load_end")
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = dict(raw)
            if "load_1min" in row and "load_end" not in row:
                row["load_end"] = row.pop("load_1min")
            for c in ints + floats:
                value = row.get(c, "")
                row[c] = None if value in ("", None) else (int(value) if c in ints else float(value))
            for c, default in OLD_DEFAULTS.items():
                if row.get(c) in ("", None):
                    row[c] = default
            row["provider"] = canonical(row["provider"])
            rows.append(row)
    return rows


def _fmt(value, spec: str, empty: str = "-") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return empty
    return format(value, spec)


def setup_name(r: dict) -> str:
    """"all", "cross", "none+queue65536", …; "labels" for the labelled set-up (SupCon)."""
    if r["positives"] == "labels":
        return "labels"
    if r["positives"] == "memory":
        return f"labels+memory{r['queue']}"
    return r["negatives"] + (f"+queue{r['queue']}" if r["queue"] else "")


def machine_line(env: dict, load_end: float | None = None) -> str:
    """Machine, thread count and 1-minute load average of a run: printed with every figure."""
    end = "" if load_end is None else f" -> {load_end:.2f} at end"
    return (f"{env.get('device', '?')}, {env.get('threads', '?')} threads of {env.get('cores', '?')} cores, "
            f"torch {env.get('torch', '?')}, commit {env.get('git_commit') or '?'}; "
            f"1-min load {_fmt(env.get('load_start'), '.2f')} at start{end}")


def table(rows: list[dict]) -> str:
    """A text table per (rule, D, dtype, mode, set-up); unavailable/skipped ones listed once at the top.

    Ratio columns (RATIOS) are those of the baselines that have an `ok` row in the table's
    group: "x B" = B's median / this median, "mem x B" = B's peak / this peak."""
    lines = []
    not_run = {}
    for r in rows:
        if r["status"] == "skipped":
            not_run.setdefault(f"set-up={setup_name(r)}", f"skipped: {r['reason']}")
        elif r["status"] == "unavailable":
            what = r["provider"] + ("" if setup_name(r) == "all" else f", set-up={setup_name(r)}")
            not_run.setdefault(what, f"unavailable: {r['reason']}")
    for what, why in not_run.items():
        lines.append(f"{what}: {why}")
    groups = defaultdict(list)
    for r in rows:
        if r["status"] not in ("unavailable", "skipped"):
            groups[(r["rule"], r["D"], r["dtype"], r["mode"], setup_name(r))].append(r)
    for (rule, d, dtype, mode, setup), group in groups.items():
        present = {r["provider"] for r in group if r["status"] == "ok"}
        ratios = [(column, title) for column, baseline, _, title in RATIOS if baseline in present]
        header = (f"{'provider':<10}{'M':>8}{'median ms':>12}{'p20-p80 ms':>20}{'peak MiB':>10}{'RSS+ MiB':>10}{'GFLOP/s':>9}"
                  f"{'true':>7}{'ceil':>6}{'peak':>6}" + "".join(f"{title:>{len(title) + 2}}" for _, title in ratios) + f"{'load':>11}  status")
        lines += ["", f"rule={rule}  D={d}  dtype={dtype}  mode={mode}  set-up={setup}", header, "-" * len(header)]
        for r in sorted(group, key=lambda r: (r["M"], r["provider"])):
            spread = f"{_fmt(r['p20_ms'], '.4g')}-{_fmt(r['p80_ms'], '.4g')}" if r["status"] == "ok" else "-"
            load = f"{_fmt(r.get('load_start'), '.1f')}->{_fmt(r.get('load_end'), '.1f')}"
            note = r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason'][:70]}"
            lines.append(
                f"{r['provider']:<10}{r['M']:>8}{_fmt(r['median_ms'], '.4g'):>12}{spread:>20}"
                f"{_fmt(r['peak_mb'], '.1f'):>10}{_fmt(r.get('rss_growth_mb'), '.1f'):>10}{_fmt(r['gflops'], '.1f'):>9}"
                f"{_fmt(r.get('true_gflops'), '.1f'):>7}{_fmt(r['ceiling_fraction'], '.0%'):>6}"
                f"{_fmt(r.get('peak_fraction'), '.0%'):>6}"
                + "".join(f"{_fmt(r[column], '.2f'):>{len(title) + 2}}" for column, title in ratios)
                + f"{load:>11}  {note}")
    return "\n".join(lines)

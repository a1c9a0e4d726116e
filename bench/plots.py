"""PNG plots of a benchmark run: time vs M and peak memory vs M, log-log, one line per provider.

One figure per run, a grid with one row per (rule, D, dtype, mode, set-up) and two columns
(time, memory), and a third where a group has pml rows (the labels set-up): each provider's
speed-up (solid) and memory saving (dashed) over pml, the ratio columns of the CSV. The
labels set-up's M is the rows of its one view. The cross-batch memory set-ups (one per memory
size K) share one row per batch size, drawn against K. Only `ok` measurements are drawn; a provider that ran out of memory
(or was predicted to) at some sizes says so in its legend entry. The memory panel draws the
per-call peak (peak_mb, solid, filled markers) and, where measured, the RSS growth of a fresh
process over three calls with the default allocator (rss_growth_mb, dashed, open markers).
A provider of an older file under a former name ("eager-chunked") is drawn as the one it is
now ("chunked"). The title carries the machine, threads, torch, commit and load.

    python bench/plots.py bench/results/cpu-....csv      # redraw a figure from its CSV
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib import ticker  # noqa: E402

if __package__ in (None, ""):   # run as a script: python bench/plots.py FILE.csv
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.report import read_csv, setup_name  # noqa: E402

#: The baseline of the ratio panel, and the columns it draws (bench/report.py RATIOS).
RATIO_BASELINE = "pml"
RATIO_LINES = ((f"speedup_vs_{RATIO_BASELINE}", "-", "speed-up"), (f"memory_saving_vs_{RATIO_BASELINE}", "--", "memory saving"))

STYLE = {
    "eager": dict(color="tab:gray", marker="o"),
    "chunked": dict(color="tab:blue", marker="s"),
    "compile": dict(color="tab:purple", marker="^"),
    "cpp": dict(color="tab:red", marker="D"),
    "cuda": dict(color="tab:green", marker="v"),
    "triton": dict(color="tab:orange", marker="P"),
    "pml": dict(color="tab:brown", marker="X"),
}


def _size_label(m: int) -> str:
    return f"{m // 1024}k" if m >= 1024 and m % 1024 == 0 else str(m)


def _x(r: dict) -> int:
    """The horizontal coordinate of a row: its memory slots K in the memory set-up, else M."""
    return r["queue"] if r["positives"] == "memory" else r["M"]


def _panel_setup(r: dict) -> str:
    """The set-up a row is drawn in: the memory set-ups of one batch size share a panel."""
    return f"labels+memory, batch {r['M']}" if r["positives"] == "memory" else setup_name(r)


def _xlabel(setup: str) -> str:
    if setup.startswith("labels+memory"):
        return "K memory slots"
    return "M rows (one labelled view)" if setup == "labels" else "M = 2N rows"


def plot_results(rows: list[dict], path: str, title: str = "") -> str | None:
    """Draw the grid into `path`; returns the path, or None when no measurement is ok."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["rule"], r["D"], r["dtype"], r["mode"], _panel_setup(r))].append(r)
    groups = {k: v for k, v in groups.items() if any(r["status"] == "ok" for r in v)}
    if not groups:
        return None
    with_ratio = {k for k, v in groups.items() if any(r["provider"] == RATIO_BASELINE and r["status"] == "ok" for r in v)}
    columns = 3 if with_ratio else 2
    fig, axes = plt.subplots(len(groups), columns, figsize=(5.5 * columns, 3.6 * len(groups)), squeeze=False)
    for (rule, d, dtype, mode, setup), (ax_time, ax_mem, *ax_ratio) in zip(groups, axes):
        group = groups[(rule, d, dtype, mode, setup)]
        ax_ratio = ax_ratio[0] if ax_ratio else None
        if ax_ratio is not None and (rule, d, dtype, mode, setup) not in with_ratio:
            ax_ratio.set_axis_off()
            ax_ratio = None
        for provider in dict.fromkeys(r["provider"] for r in group):
            points = sorted((r for r in group if r["provider"] == provider), key=_x)
            ok = [r for r in points if r["status"] == "ok"]
            if not ok:
                continue
            oom = [_x(r) for r in points if r["status"] == "OOM"]
            label = provider + (f" (OOM at {_xlabel(setup).split()[0]}≥{min(oom)})" if oom else "")
            style = STYLE.get(provider, {})
            ax_time.plot([_x(r) for r in ok], [r["median_ms"] for r in ok], label=label, **style)
            ax_time.fill_between([_x(r) for r in ok], [r["p20_ms"] for r in ok], [r["p80_ms"] for r in ok],
                                 color=style.get("color"), alpha=0.2)
            with_mem = [r for r in ok if r["peak_mb"] is not None and r["peak_mb"] > 0]
            ax_mem.plot([_x(r) for r in with_mem], [r["peak_mb"] for r in with_mem], label=label, **style)
            with_rss = [r for r in ok if r.get("rss_growth_mb") is not None and r["rss_growth_mb"] > 0]
            if with_rss:
                ax_mem.plot([_x(r) for r in with_rss], [r["rss_growth_mb"] for r in with_rss], label=f"{provider} (fresh RSS)",
                            linestyle="--", markerfacecolor="none", **style)
            if ax_ratio is not None and provider != RATIO_BASELINE:
                for column, linestyle, what in RATIO_LINES:
                    ratio = [r for r in ok if r.get(column)]
                    ax_ratio.plot([_x(r) for r in ratio], [r[column] for r in ratio], label=f"{provider} {what}",
                                  **dict(style, linestyle=linestyle))
        subtitle = f"{rule}, D={d}, {dtype}, {'fwd+bwd' if mode == 'fwdbwd' else 'fwd'}, {setup}"
        xlabel = _xlabel(setup)
        ax_time.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="median time (ms)", title=subtitle)
        ax_mem.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="memory beyond inputs (MiB)", title=subtitle)
        panels = [ax_time, ax_mem]
        for ax in panels:
            ax.title.set_fontsize(9)
        if ax_ratio is not None:
            ax_ratio.axhline(1.0, color="black", linewidth=0.8)
            ax_ratio.set(xscale="log", yscale="log", xlabel=xlabel, ylabel=f"{RATIO_BASELINE} / provider (x)",
                         title=f"vs {RATIO_BASELINE}: speed-up (solid), memory saving (dashed)")
            ax_ratio.title.set_fontsize(9)
            panels.append(ax_ratio)
        sizes = sorted({_x(r) for r in group if r["status"] == "ok"})
        for ax in panels:
            ax.set_xticks(sizes, [_size_label(m) for m in sizes])
            ax.xaxis.set_minor_locator(ticker.NullLocator())
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def title_of(name: str, rows: list[dict]) -> str:
    """A figure title from a CSV's rows: machine, threads, torch, commit and the load range."""
    first = rows[0] if rows else {}
    loads = [r[c] for r in rows for c in ("load_start", "load_end") if r.get(c) is not None]
    load = f"; 1-min load {min(loads):.2f}-{max(loads):.2f}" if loads else ""
    return (f"{name}: {first.get('device', '?')}, {first.get('threads', '?')} threads, torch {first.get('torch', '?')}, "
            f"commit {first.get('git_commit') or '?'}{load}")


if __name__ == "__main__":
    for csv_path in sys.argv[1:]:
        rows = read_csv(csv_path)
        name = os.path.splitext(os.path.basename(csv_path))[0]
        print(plot_results(rows, os.path.splitext(csv_path)[0] + ".png", title_of(name, rows)))

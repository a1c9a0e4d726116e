"""The grid's results: mean ± std per cell next to the paper's numbers, as Markdown, CSV and a plot.

Written into the grid's root folder:

    results.md    one table per (dataset, backbone): a row per loss, per epochs column the
                  measured linear top-1 (mean ± std over the finished seeds, n), the paper's value
                  (Table 1/2) when it has one, and the kNN top-1; plus the untrained encoder
    runs.csv      one row per finished run (the numbers the table aggregates)
    results.png   measured mean ± std per loss (bars), the paper's mean ± std beside them

The headline number is the linear probe's best test top-1 over its 50 epochs, which is what the
authors' code (facebookresearch/luckmatters, linear_feature_eval.py) reports; the last-epoch
("final") value is in runs.csv and in a column of the table. std is the sample standard deviation
(n − 1); the paper does not say which it uses.
"""
from __future__ import annotations

import csv
import os
import platform
import statistics

from . import grid, paper_results

RUN_COLUMNS = ("dataset", "arch", "loss", "epochs", "seed", "linear_best", "linear_final", "knn",
               "untrained_linear_best", "untrained_knn", "train_time_s", "wall_s", "load_1min_start", "cpu_threads",
               "backend", "device", "torch")


def collect(runs: list, root: str) -> list[dict]:
    """One row per finished run (runs whose folder holds a completed summary with the grid's epochs)."""
    rows = []
    for run in runs:
        folder = run.folder(root)
        summary = grid.read_summary(folder)
        if not summary or summary.get("status") != "completed" or summary.get("epochs_done") != run.epochs:
            continue
        reported = summary.get("reported") or {}
        untrained = summary.get("untrained") or {}
        attempts = _attempts(folder)
        rows.append({
            "dataset": run.dataset, "arch": run.arch, "loss": run.loss, "epochs": run.epochs, "seed": run.seed,
            "linear_best": reported.get("linear_top1_best"), "linear_final": reported.get("linear_top1_final"),
            "knn": reported.get("knn_top1"),
            "untrained_linear_best": (untrained.get("linear") or {}).get("best"),
            "untrained_knn": untrained.get("knn_top1"),
            "train_time_s": summary.get("train_time_s"),
            "wall_s": round(sum(a.get("wall_s", 0) for a in attempts), 1) if attempts else None,
            "load_1min_start": attempts[0].get("load_1min_start") if attempts else None,
            "cpu_threads": summary.get("cpu_threads"), "backend": summary.get("backend"),
            "device": summary.get("device_name"), "torch": summary.get("torch"),
        })
    return rows


def _attempts(folder: str) -> list:
    import json

    try:
        with open(os.path.join(folder, "grid_run.json"), encoding="utf-8") as f:
            return json.load(f).get("attempts", [])
    except (FileNotFoundError, ValueError):
        return []


def mean_std(values: list) -> tuple[float | None, float | None, int]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None, 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def _fmt(mean, std, n=None) -> str:
    if mean is None:
        return "—"
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return text + (f" ({n})" if n is not None else "")


def cells(rows: list[dict]) -> dict:
    """(dataset, arch, loss, epochs) → {metric: (mean, std, n)}."""
    grouped: dict = {}
    for row in rows:
        grouped.setdefault((row["dataset"], row["arch"], row["loss"], row["epochs"]), []).append(row)
    return {key: {m: mean_std([r[m] for r in group]) for m in ("linear_best", "linear_final", "knn",
                                                                  "untrained_linear_best", "untrained_knn")}
            for key, group in grouped.items()}


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores visible"


def markdown(spec, runs: list, rows: list[dict], command: str) -> str:
    stats = cells(rows)
    epochs = sorted({r.epochs for r in runs})
    lines = [f"# Grid `{spec.name}`: {spec.about}", "", f"Command: `{command}`", ""]
    if rows:
        threads = sorted({r["cpu_threads"] for r in rows if r["cpu_threads"] is not None})
        loads = [r["load_1min_start"] for r in rows if r["load_1min_start"] is not None]
        devices = sorted({str(r["device"]) for r in rows})
        lines += [f"Machine: {_machine()}; device {', '.join(devices)}; torch {rows[0]['torch']}; "
                  f"{'/'.join(map(str, threads))} torch thread(s) per run; backend {rows[0]['backend']}; "
                  f"1-minute load average at run start {min(loads):.1f}–{max(loads):.1f} (median "
                  f"{statistics.median(loads):.1f})." if loads else f"Machine: {_machine()}.",
                  f"Runs finished: {len(rows)} of {len(runs)}; median wall time per run "
                  f"{statistics.median([r['wall_s'] for r in rows if r['wall_s']] or [0]):.0f} s.", ""]
    lines += ["Linear top-1 (%) on the complete test set: mean ± sample std over the seeds (n). *best* = the",
              "best epoch of the linear probe (what the authors' code reports), *final* = its last epoch;",
              "kNN: k = 200, t = 0.1. Each run's settings are in its config.json.", ""]
    for dataset in dict.fromkeys(r.dataset for r in runs):
        for arch in dict.fromkeys(r.arch for r in runs):
            lines += [f"## {dataset}, {arch}", ""]
            header = ["loss"]
            for e in epochs:
                header += [f"{e} ep best (n)", f"{e} ep final", f"{e} ep kNN"]
                if spec.table is not None:
                    header.append(f"{e} ep paper (Table {spec.table})")
            lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            untrained = []
            for loss in dict.fromkeys(r.loss for r in runs):
                row = [loss]
                for e in epochs:
                    c = stats.get((dataset, arch, loss, e), {})
                    row += [_fmt(*c.get("linear_best", (None, None, 0))),
                            _fmt(*c.get("linear_final", (None, None, 0))[:2]),
                            _fmt(*c.get("knn", (None, None, 0))[:2])]
                    if spec.table is not None:
                        paper = paper_results.lookup(dataset, arch, loss, e, spec.table)
                        row.append(_fmt(paper.mean, paper.std) if paper else "—")
                    untrained += [r for r in rows if (r["dataset"], r["arch"], r["loss"], r["epochs"]) == (dataset, arch, loss, e)]
                lines.append("| " + " | ".join(row) + " |")
            if untrained:
                lin = mean_std([r["untrained_linear_best"] for r in untrained])
                knn = mean_std([r["untrained_knn"] for r in untrained])
                lines += ["", f"Untrained encoder (same seeds, before pre-training): linear best {_fmt(*lin)}, "
                              f"kNN {_fmt(*knn[:2])}."]
            lines.append("")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    os.replace(path + ".tmp", path)


def plot(path: str, spec, runs: list, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = cells(rows)
    panels = [(d, a, e) for d in dict.fromkeys(r.dataset for r in runs) for a in dict.fromkeys(r.arch for r in runs)
              for e in sorted({r.epochs for r in runs})]
    losses = list(dict.fromkeys(r.loss for r in runs))
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 0.9 * len(losses)) * len(panels), 4.2), squeeze=False)
    for ax, (dataset, arch, epochs) in zip(axes[0], panels):
        xs = range(len(losses))
        width = 0.4 if spec.table is not None else 0.6
        means, stds = [], []
        for loss in losses:
            m, s, _ = stats.get((dataset, arch, loss, epochs), {}).get("linear_best", (None, None, 0))
            means.append(m if m is not None else float("nan"))
            stds.append(s or 0.0)
        ax.bar([x - (width / 2 if spec.table is not None else 0) for x in xs], means, width, yerr=stds, capsize=3,
               label="measured here (mean ± std)")
        if spec.table is not None:
            paper = [paper_results.lookup(dataset, arch, loss, epochs, spec.table) for loss in losses]
            ax.bar([x + width / 2 for x in xs], [p.mean if p else float("nan") for p in paper], width,
                   yerr=[p.std if p else 0.0 for p in paper], capsize=3, label=f"paper, Table {spec.table}", alpha=0.7)
        untrained = mean_std([r["untrained_linear_best"] for r in rows
                              if (r["dataset"], r["arch"], r["epochs"]) == (dataset, arch, epochs)])[0]
        if untrained is not None:
            ax.axhline(untrained, color="gray", linestyle="--", linewidth=1, label="untrained encoder (mean)")
            means = means + [untrained]  # keep the baseline inside the y range
        finite = [m for m in means if m == m]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 3))
        ax.set_xticks(list(xs))
        ax.set_xticklabels(losses, rotation=30, ha="right")
        ax.set_ylabel("linear top-1 (%), best probe epoch")
        ax.set_title(f"{dataset}, {arch}, {epochs} epochs", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(spec, runs: list, root: str, command: str, with_plot: bool = True) -> list[dict]:
    """Write results.md, runs.csv (and results.png); returns the finished runs' rows."""
    rows = collect(runs, root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "results.md"), "w", encoding="utf-8") as f:
        f.write(markdown(spec, runs, rows, command) + "\n")
    write_csv(os.path.join(root, "runs.csv"), rows)
    if with_plot and rows:
        plot(os.path.join(root, "results.png"), spec, runs, rows)
    return rows

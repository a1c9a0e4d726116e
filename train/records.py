"""The run folder (--out): config.json, metrics.csv, summary.json, and the final accuracy table.

metrics.csv has one row per epoch; row 0 is the untrained encoder (no loss yet):

    epoch, steps, loss (mean over the epoch's steps), lr (at the epoch's end), knn_top1 (%,
    empty when not evaluated that epoch), epoch_time_s (training only, without the probe),
    images_per_s (pre-training images per second; each image is seen as --views views, default 2),
    eval_time_s (the kNN monitor: features of the train and test images plus the vote)
"""
from __future__ import annotations

import csv
import json
import math
import os

METRIC_COLUMNS = ("epoch", "steps", "loss", "lr", "knn_top1", "epoch_time_s", "images_per_s", "eval_time_s")


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_metrics(path: str, rows: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pct(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.2f}"


def accuracy_table(rows: list[tuple[str, dict]]) -> str:
    """Rows of (label, probe dict as in ProbeResult.as_dict()) → a fixed-width table."""
    width = max([28] + [len(label) for label, _ in rows])
    header = f"{'encoder':<{width}} {'kNN top-1':>10} {'linear final':>13} {'linear best (epoch)':>20}"
    lines = [header, "-" * len(header)]
    for label, result in rows:
        linear = result.get("linear") or {}
        best = "—" if not linear else f"{_pct(linear['best'])} ({linear['best_epoch']:>2})"
        lines.append(f"{label:<{width}} {_pct(result.get('knn_top1')):>10} {_pct(linear.get('final')):>13} {best:>20}")
    lines.append("Accuracies are test top-1 (%). 'final' is after the last linear-probe epoch; 'best' is the "
                 "maximum over its epochs (what the authors' code reports), with that epoch.")
    return "\n".join(lines)

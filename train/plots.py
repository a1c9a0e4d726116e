"""PNG plots of a run: loss.png (training loss per epoch) and accuracy.png (kNN per epoch and the
linear-probe test accuracy per probe epoch, untrained vs trained encoder).

Several finished runs side by side (e.g. two losses on one dataset):

    python -m train.plots RUN_DIR [RUN_DIR ...] --out comparison.png
    python -m train.plots RUN_DIR [RUN_DIR ...] --out accuracy.png --bars   # final accuracies only
"""
from __future__ import annotations

import argparse
import json
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_epochs(*axes) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(out_dir: str, rows: list[dict], probes: dict, title: str) -> list[str]:
    """Write the plots; `rows` as in metrics.csv, `probes` maps a label to ProbeResult.as_dict()."""
    plt = _pyplot()
    written = []
    trained = [r for r in rows if r.get("loss") not in (None, "")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["epoch"]) for r in trained], [float(r["loss"]) for r in trained], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over the epoch)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    _integer_epochs(ax)
    fig.tight_layout()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    knn = [r for r in rows if r.get("knn_top1") not in (None, "")]
    left.plot([int(r["epoch"]) for r in knn], [float(r["knn_top1"]) for r in knn], marker="o")
    left.set_xlabel("pre-training epoch (0 = untrained)")
    left.set_ylabel("kNN test top-1 (%)")
    left.set_title("kNN monitor (k=200, t=0.1)", fontsize=9)
    left.grid(alpha=0.3)
    for label, result in probes.items():
        linear = (result or {}).get("linear")
        if linear:
            curve = linear["curve"]
            right.plot(range(1, len(curve) + 1), curve,
                       label=f"{label}: final {linear['final']:.2f}, best {linear['best']:.2f}")
    right.set_xlabel("linear-probe epoch")
    right.set_ylabel("linear test top-1 (%)")
    right.set_title("linear probe on frozen features", fontsize=9)
    right.grid(alpha=0.3)
    if right.lines:
        right.legend(fontsize=8)
    _integer_epochs(left, right)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = os.path.join(out_dir, "accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def compare_runs(run_dirs: list[str], out_path: str) -> str:
    """One loss panel per run (losses have different scales), then kNN and linear-probe curves of all."""
    from .config import positives_label
    from .records import read_metrics

    plt = _pyplot()
    n = len(run_dirs)
    fig, axes = plt.subplots(1, n + 2, figsize=(4.2 * (n + 2), 4))
    knn_ax, lin_ax = axes[n], axes[n + 1]
    baseline_drawn = set()
    for i, run in enumerate(run_dirs):
        with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
        rows = read_metrics(os.path.join(run, "metrics.csv"))
        cfg = summary["config"]
        # Older run folders predate --supervised/--views: they are self-supervised two-view runs.
        positives = positives_label(cfg.get("supervised", False), cfg.get("views", 2))
        label, color = f"{cfg['loss']} ({positives})", f"C{i}"
        trained = [r for r in rows if r["loss"]]
        axes[i].plot([int(r["epoch"]) for r in trained], [float(r["loss"]) for r in trained], marker="o", color=color)
        axes[i].set(xlabel="epoch", ylabel="training loss",
                    title=f"--loss {cfg['loss']}, {positives}\n({summary['dataset']}, {cfg['arch']})")
        knn = [r for r in rows if r["knn_top1"]]
        knn_ax.plot([int(r["epoch"]) for r in knn], [float(r["knn_top1"]) for r in knn], marker="o", color=color, label=label)
        linear = (summary.get("trained") or {}).get("linear")
        if linear:
            lin_ax.plot(range(1, len(linear["curve"]) + 1), linear["curve"], color=color,
                        label=f"{label}: final {linear['final']:.2f}, best {linear['best']:.2f}")
        untrained = (summary.get("untrained") or {}).get("linear")
        key = (cfg["seed"], cfg["arch"], summary["dataset"])
        if untrained and key not in baseline_drawn:  # same seed and arch: the same untrained encoder
            baseline_drawn.add(key)
            lin_ax.plot(range(1, len(untrained["curve"]) + 1), untrained["curve"], ":", color="gray",
                        label=f"untrained (seed {cfg['seed']}): final {untrained['final']:.2f}, best {untrained['best']:.2f}")
    knn_ax.set(xlabel="pre-training epoch (0 = untrained)", ylabel="kNN test top-1 (%)", title="kNN monitor (k=200, t=0.1)")
    lin_ax.set(xlabel="linear-probe epoch", ylabel="linear test top-1 (%)", title="linear probe on frozen features")
    knn_ax.legend(fontsize=8)
    lin_ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(9)
    _integer_epochs(*axes)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def accuracy_bars(run_dirs: list[str], out_path: str) -> str:
    """kNN and best linear-probe accuracy of each run's trained encoder as bars, the untrained
    encoders (one per seed, arch and dataset) as dashed lines: many runs in one readable figure."""
    from .config import positives_label

    plt = _pyplot()
    summaries = []
    for run in run_dirs:
        with open(os.path.join(run, "summary.json"), encoding="utf-8") as f:
            summaries.append(json.load(f))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(summaries)) + 3.5, 4.8))
    width = 0.38
    for k, (key, name) in enumerate((("knn_top1", "kNN top-1"), ("linear", "linear top-1, best epoch"))):
        values = []
        for summary in summaries:
            trained = summary.get("trained") or {}
            values.append(trained["linear"]["best"] if key == "linear" and trained.get("linear") else trained.get(key))
        xs = [i + (k - 0.5) * width for i in range(len(summaries))]
        bars = ax.bar(xs, [v or 0 for v in values], width, color=f"C{k}", label=f"trained: {name}")
        ax.bar_label(bars, labels=["—" if v is None else f"{v:.1f}" for v in values], fontsize=7, padding=2)
        untrained = {}
        for summary in summaries:
            before = summary.get("untrained") or {}
            value = before["linear"]["best"] if key == "linear" and before.get("linear") else before.get(key)
            cfg = summary["config"]
            if value is not None:
                untrained.setdefault((cfg["seed"], cfg["arch"], summary["dataset"]), value)
        for (seed, arch, dataset), value in untrained.items():
            ax.axhline(value, color=f"C{k}", linestyle="--", linewidth=1,
                       label=f"untrained {arch} (seed {seed}): {name} {value:.1f}")
    labels = []
    for summary in summaries:
        cfg = summary["config"]
        positives = positives_label(cfg.get("supervised", False), cfg.get("views", 2)).replace(", ", "\n")
        labels.append(f"{cfg['loss']}\n{positives}\n{summary['epochs_done']} ep, seed {cfg['seed']}")
    ax.set_xticks(range(len(summaries)), labels, fontsize=7)
    low = min([b.get_height() for b in ax.patches if b.get_height() > 0] + [line.get_ydata()[0] for line in ax.lines])
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("test top-1 (%)")
    datasets = sorted({s["dataset"] for s in summaries})
    ax.set_title(f"frozen-encoder probes on {', '.join(datasets)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m train.plots", description="Compare finished runs in one PNG.")
    parser.add_argument("runs", nargs="+", help="run folders (with summary.json and metrics.csv)")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--bars", action="store_true",
                        help="only the trained encoders' final kNN and best linear accuracy, as bars (for many runs)")
    args = parser.parse_args()
    print(accuracy_bars(args.runs, args.out) if args.bars else compare_runs(args.runs, args.out))

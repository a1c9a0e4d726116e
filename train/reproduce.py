"""Reproduce the paper's tables: `python train/reproduce.py table1` (see --help and docs/training.md).

    python train/reproduce.py table1 --dry-run                  # the run list, nothing is run
    python train/reproduce.py table1 --epochs 100 --seeds 5     # one column of Table 1
    python train/reproduce.py table2 --device cuda
    torchrun --nproc_per_node 4 train/reproduce.py table1       # every run on 4 GPUs
    python train/reproduce.py fashion-mnist --threads 1         # the CPU-sized grid measured here
    python train/reproduce.py fashion-mnist --report-only       # re-aggregate finished runs

Each run is an ordinary train/run.py run folder under --out (train/grid.py); running the same
command again skips finished runs and resumes interrupted ones. Several processes may work on
one grid at once (start the same command again): each claims a run folder before running it. After the runs (and after every
finished run, so that a stopped grid still has a current table) the results are aggregated into
results.md, runs.csv and results.png (train/grid_report.py).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
# As in train/run.py: `python train/reproduce.py` puts train/ first on sys.path; the repository
# root must be there instead so that `train` and `fastalpha` import as packages.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
elif os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

from train import grid, grid_report  # noqa: E402
from train.trainer import SCHEDULES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    grids = "\n".join(f"  {name:<14} {spec.about}" for name, spec in grid.GRIDS.items())
    parser = argparse.ArgumentParser(
        prog="python train/reproduce.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a grid of train/run.py runs (losses × datasets × backbones × epochs × seeds) as resumable "
                    "run folders, then aggregate mean ± std per cell next to the paper's Table 1/2 numbers.",
        epilog=f"grids:\n{grids}\n\n"
               "The paper recipe (Table 1/2 captions, Sec. 6): batch 128, Adam, lr 0.01 for resnet18 and 0.001 for\n"
               "resnet50, τ 0.5 (square τ 5, inverse γ 2, direct p 4). Extra train/run.py flags go after `--`,\n"
               "e.g. `-- --amp bf16`. Re-running a command skips finished runs and resumes interrupted ones.")
    parser.add_argument("grid", choices=tuple(grid.GRIDS), help="which grid (list below)")
    parser.add_argument("--out", default=None, help="root folder of the grid's run folders (default: runs/grid-<grid>)")
    parser.add_argument("--epochs", type=int, nargs="+", default=None, metavar="N",
                        help="epochs columns to run (default: the grid's; table1/table2: 100 300 500)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..K-1 per cell (default: the grid's; paper: 5)")
    parser.add_argument("--losses", nargs="+", default=None, metavar="LOSS", help="only these losses (default: the grid's)")
    parser.add_argument("--datasets", nargs="+", default=None, metavar="DATASET", help="only these datasets")
    parser.add_argument("--archs", nargs="+", default=None, metavar="ARCH", help="only these backbones")
    parser.add_argument("--schedule", choices=SCHEDULES, default="authors",
                        help="learning-rate schedule of every run; authors = as the authors' code (lr constant for 10 "
                             "epochs, then a per-epoch cosine with a one-epoch period in steps; the paper states no "
                             "schedule). Default: authors")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N, as train/run.py (default: auto)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch per run, as train/run.py (0 = auto)")
    parser.add_argument("--backend", default="auto", help="fastalpha backend, as train/run.py (default: auto)")
    parser.add_argument("--eval-every", type=int, default=0, metavar="N",
                        help="kNN monitor every N epochs (0 = only the final probes). Default: 0")
    parser.add_argument("--data-root", default="data", help="folder of torchvision datasets (default: ./data)")
    parser.add_argument("--download", action="store_true", help="download missing torchvision datasets")
    parser.add_argument("--progress", action="store_true", help="show each run's progress bars and log on the console "
                                                                 "(default: one line per run; the log is in run.log)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs (with their state and command) and exit")
    parser.add_argument("--report-only", action="store_true", help="aggregate the finished runs and exit")
    parser.add_argument("--stop-after", type=float, default=None, metavar="MINUTES",
                        help="start no new run after this many minutes (a run in progress finishes)")
    return parser


def _command(argv) -> str:
    """The command that runs this grid (what results.md records: a re-aggregation or a dry run
    is not how the numbers were made)."""
    argv = [a for a in argv if a not in ("--report-only", "--dry-run")]
    return "python train/reproduce.py " + " ".join(shlex.quote(a) for a in argv)


def _eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Everything after a bare `--` is passed to every train/run.py run unchanged.
    own, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(own)
    spec = grid.GRIDS[args.grid]
    losses = args.losses or spec.losses
    unknown = [name for name in losses if name not in grid.TABLE1_LOSSES]
    if unknown:
        parser.error(f"unknown loss(es) {unknown}; choose from {grid.TABLE1_LOSSES}")
    for name, value in (("seeds", args.seeds), ("threads", args.threads), ("eval-every", args.eval_every)):
        if value is not None and value < (1 if name == "seeds" else 0):
            parser.error(f"--{name} must be {'>= 1' if name == 'seeds' else '>= 0'}, got {value}")
    if args.epochs and min(args.epochs) < 1:
        parser.error("--epochs must be >= 1")
    root = args.out or os.path.join("runs", f"grid-{spec.name}")
    runs = grid.runs(args.datasets or spec.datasets, args.archs or spec.archs, losses, args.epochs or spec.epochs,
                     args.seeds or spec.seeds)
    options = {"schedule": args.schedule, "device": args.device, "threads": args.threads, "backend": args.backend,
               "eval_every": args.eval_every, "data_root": args.data_root, "download": args.download,
               "progress": args.progress, "extra": extra}
    rank0 = os.environ.get("RANK", "0") == "0"
    # Claims let several single-process grid commands share a grid; under torchrun every rank must run
    # the same list, so one torchrun job works on a grid alone.
    single = os.environ.get("WORLD_SIZE", "1") == "1"
    say = print if rank0 else (lambda *a, **k: None)
    command = _command(argv)

    states = [grid.state(run, root) for run in runs]
    if args.dry_run:
        say(f"{spec.name}: {len(runs)} runs under {root} ({states.count('done')} done, {states.count('partial')} to "
            f"resume, {states.count('new')} new)")
        for run, st in zip(runs, states):
            argv_run = grid.run_argv(run, root, spec, options, st == "partial", grid.measures_baseline(run, losses))
            say(f"  [{st:<7}] python train/run.py {' '.join(argv_run)}")
        return 0
    if args.report_only:
        if rank0:
            rows = grid_report.report(spec, runs, root, command)
            say(f"aggregated {len(rows)} finished run(s) of {len(runs)} into {os.path.join(root, 'results.md')}")
        return 0

    say(f"{spec.name}: {len(runs)} runs under {root}: {states.count('done')} done (skipped), "
        f"{states.count('partial')} to resume, {states.count('new')} new")
    started = time.time()
    durations, failed = [], []
    todo = [i for i, st in enumerate(states) if st != "done"]
    for k, i in enumerate(todo):
        if args.stop_after is not None and time.time() - started > 60 * args.stop_after:
            say(f"--stop-after {args.stop_after:g} min reached: {len(todo) - k} run(s) not started; "
                "the same command continues the grid")
            break
        run = runs[i]
        st = grid.state(run, root)  # another process may have finished it meanwhile
        if st == "done":
            continue
        if single and not grid.claim(run, root):
            say(f"[{k + 1}/{len(todo)}] {run.describe()}: taken by another process, skipped", flush=True)
            continue
        say(f"[{k + 1}/{len(todo)}] {run.describe()}: {'resuming' if st == 'partial' else 'starting'} "
            f"→ {run.folder(root)}", flush=True)
        t0 = time.time()
        try:
            status = grid.execute(run, root, spec, options, resume=st == "partial", echo=args.progress,
                                  baseline=grid.measures_baseline(run, losses))
        finally:
            if single:
                grid.release(run, root)
        durations.append(time.time() - t0)
        left = len(todo) - k - 1
        eta = f", about {_eta(left * sum(durations) / len(durations))} left" if left else ""
        summary = grid.read_summary(run.folder(root)) or {}
        acc = (summary.get("reported") or {}).get("linear_top1_best")
        result = f"linear best {acc:.2f}%" if status == 0 and acc is not None else f"exit status {status} (see run.log)"
        say(f"    {result}, {durations[-1]:.0f} s{eta}", flush=True)
        if status != 0:
            failed.append(run)
        if status == 130:
            say("interrupted: the same command resumes the grid")
            break
        if rank0:
            grid_report.report(spec, runs, root, command, with_plot=False)
    if rank0:
        rows = grid_report.report(spec, runs, root, command)
        say(f"{len(rows)} of {len(runs)} runs finished; table: {os.path.join(root, 'results.md')}, "
            f"plot: {os.path.join(root, 'results.png')}")
    if failed:
        say(f"{len(failed)} run(s) failed: " + "; ".join(r.describe() for r in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

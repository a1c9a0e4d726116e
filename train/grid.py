"""A reproduction grid: losses × datasets × backbones × epochs × seeds, one run folder per run.

    <root>/<dataset>-<arch>/<loss>/<epochs>ep/seed<k>/   an ordinary train/run.py run folder

A run's state is read from its folder, so the grid can be stopped (Ctrl-C, a session end) and
started again with the same command:

    done     summary.json says "completed" with the grid's epochs: skipped
    partial  checkpoint.pt exists: continued with `train/run.py --resume` (same maths, bit for bit)
    new      started from scratch

Each run is `train.cli.main(argv)` in this process (so `torchrun ... train/reproduce.py` works as
`torchrun ... train/run.py` does: every rank walks the same list); its console output goes to
run.log in its folder, and grid_run.json records its wall time and the machine's load.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

from fastalpha import PAPER_LOSSES

from . import paper_results
from .trainer import CHECKPOINT_NAME

#: The seven Table-1 losses, in the paper's row order.
TABLE1_LOSSES = ("quadratic", "nce", "backprop", "entropy", "inverse", "square", "direct")
assert set(TABLE1_LOSSES) == set(PAPER_LOSSES)


@dataclass(frozen=True)
class GridSpec:
    """What a named grid runs by default (each field can be narrowed on the command line)."""

    name: str
    datasets: tuple
    archs: tuple
    losses: tuple
    epochs: tuple
    seeds: int
    recipe: str
    table: int | None  # the paper's table it reproduces (None: measured here, no paper numbers)
    about: str


GRIDS = {
    "table1": GridSpec("table1", ("cifar10", "stl10"), ("resnet18",), TABLE1_LOSSES, paper_results.EPOCHS,
                       paper_results.SEEDS, "paper", 1,
                       "Table 1: 7 losses, ResNet18 (lr 0.01), CIFAR-10 and STL-10, 100/300/500 epochs, 5 seeds"),
    "table2": GridSpec("table2", ("cifar100", "cifar10", "stl10"), ("resnet18", "resnet50"), ("nce", "direct"),
                       paper_results.EPOCHS, paper_results.SEEDS, "paper", 2,
                       "Table 2: nce and direct only, ResNet18 (lr 0.01) and ResNet50 (lr 0.001), CIFAR-100/10, "
                       "STL-10, 100/300/500 epochs, 5 seeds"),
    "fashion-mnist": GridSpec("fashion-mnist", ("fashion-mnist",), ("small_cnn",), TABLE1_LOSSES, (5,), 3, "small", None,
                              "the 7 losses on Fashion-MNIST with the small CNN (the small recipe unless flags "
                              "after `--` say otherwise), 5 epochs, 3 seeds: a CPU-sized check of Table 1's ordering"),
}


@dataclass(frozen=True)
class GridRun:
    dataset: str
    arch: str
    loss: str
    epochs: int
    seed: int

    @property
    def cell(self) -> tuple:
        return (self.dataset, self.arch, self.loss, self.epochs)

    def folder(self, root: str) -> str:
        return os.path.join(root, f"{self.dataset}-{self.arch}", self.loss, f"{self.epochs}ep", f"seed{self.seed}")

    def describe(self) -> str:
        return f"{self.dataset} {self.arch} {self.loss} {self.epochs} ep seed {self.seed}"


def runs(datasets, archs, losses, epochs, seeds: int) -> list[GridRun]:
    """Every run; losses innermost, then seeds, so a stopped grid has every loss at the same seed count."""
    return [GridRun(d, a, loss, e, s) for d in datasets for a in archs for e in epochs
            for s in range(seeds) for loss in losses]


def read_summary(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def state(run: GridRun, root: str) -> str:
    folder = run.folder(root)
    summary = read_summary(folder)
    if summary and summary.get("status") == "completed" and summary.get("epochs_done") == run.epochs:
        return "done"
    if os.path.exists(os.path.join(folder, CHECKPOINT_NAME)):
        return "partial"
    return "new"


def run_argv(run: GridRun, root: str, spec: GridSpec, options: dict, resume: bool, baseline: bool = True) -> list[str]:
    """The train/run.py flags of one run; `options` holds the grid-wide settings. `baseline`:
    probe the untrained encoder (it depends on the seed and backbone only, not on the loss, so a
    grid measures it once per seed and backbone)."""
    argv = ["--loss", run.loss, "--dataset", run.dataset, "--arch", run.arch, "--recipe", spec.recipe,
            "--epochs", str(run.epochs), "--seed", str(run.seed), "--schedule", options["schedule"],
            "--device", options["device"], "--threads", str(options["threads"]), "--backend", options["backend"],
            "--eval", "both", "--eval-every", str(options["eval_every"]), "--data-root", options["data_root"],
            "--out", run.folder(root), "--progress" if options["progress"] else "--no-progress",
            "--baseline" if baseline else "--no-baseline"]
    if options.get("download"):
        argv.append("--download")
    argv += list(options.get("extra", ()))
    if resume:
        argv.append("--resume")
    return argv


class _Tee:
    """Writes to several streams (the run's log file, and the console when asked)."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()

    def isatty(self):
        return False


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def measures_baseline(run: GridRun, losses) -> bool:
    """The first loss of each (dataset, backbone, epochs, seed) probes the untrained encoder."""
    return run.loss == losses[0]


CLAIM = ".claimed"


def claim(run: GridRun, root: str) -> bool:
    """Atomically mark the run as taken by this process (several processes may share a grid).

    False when another live process holds it; a claim whose process is gone (killed by a
    session end) is taken over, and the run then resumes from its checkpoint.
    """
    folder = run.folder(root)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, CLAIM)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(run: GridRun, root: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(run.folder(root), CLAIM))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def execute(run: GridRun, root: str, spec: GridSpec, options: dict, resume: bool, echo: bool,
            baseline: bool = True) -> int:
    """One run through train.cli.main; returns its exit status."""
    from . import cli

    folder = run.folder(root)
    os.makedirs(folder, exist_ok=True)
    argv = run_argv(run, root, spec, options, resume, baseline)
    started, load_start = time.time(), _load()
    with open(os.path.join(folder, "run.log"), "a", encoding="utf-8") as log:
        log.write(f"$ python train/run.py {' '.join(argv)}\n")
        out = _Tee(log, sys.stdout) if echo else log
        err = _Tee(log, sys.stderr) if echo else log
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                status = cli.main(argv)
            except SystemExit as exit_:  # argparse errors exit 2
                status = exit_.code if isinstance(exit_.code, int) else 2
    record = {"argv": argv, "resumed": resume, "status": status, "wall_s": round(time.time() - started, 1),
              "load_1min_start": load_start, "load_1min_end": _load(), "cpu_count": os.cpu_count()}
    path = os.path.join(folder, "grid_run.json")
    history = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            history = json.load(f).get("attempts", [])
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"attempts": history + [record]}, f, indent=2)
    os.replace(path + ".tmp", path)
    return status

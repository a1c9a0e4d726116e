"""Command line of the training harness: `python train/run.py --help` explains every flag.

`main(argv)` is the whole program (tests call it in-process); it returns the exit status:

    0   finished (or --check-eager passed)
    1   --check-eager found the fused backend off the eager reference beyond the tolerance
    2   bad flags, a missing dataset or an unavailable backend (the message says which)
    3   the loss became non-finite (the run stopped; the last checkpoint is the last good state)
    130 interrupted by Ctrl-C (a checkpoint was written; resume with --resume)
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time

import torch

import fastalpha
from fastalpha import dispatch
from fastalpha import PAPER_LOSSES
from fastalpha.rules import make_spec

from . import checkpoint, data as datasets, distributed, recipes, records
from .check_eager import DEFAULT_TOLERANCE, check_against_eager
from .config import RESUMABLE_CHANGES, RunConfig, grouped_positives_error, positives_label
from .models import ARCHS
from .trainer import CHECKPOINT_NAME, SCHEDULES, Interrupted, NonFiniteLoss, Trainer

#: The rule parameters each Table-1 loss reads; giving another one is an error.
LOSS_PARAMETERS = {
    "quadratic": (),
    "nce": ("temperature", "eps"),
    "backprop": ("temperature", "eps"),
    "entropy": ("temperature", "eps"),
    "inverse": ("temperature", "gamma"),
    "square": ("temperature",),
    "direct": ("temperature", "p", "eps"),
}
LOSS_HELP = {
    "quadratic": "L_quadratic: constant α = 1/(M−2)",
    "nce": "L_nce: InfoNCE (τ 0.5, ε 1 = SimCLR's NT-Xent); the loss is L_nce/(τ·M) of Eqn 2",
    "backprop": "α-CL-r_H with gradient through α (τ 0.5)",
    "entropy": "α-CL-r_H: α = softmax(−d²/τ), stop-gradient (τ 0.5)",
    "inverse": "α-CL-r_γ as the authors' code sets it: α ∝ (d² + τ)^(−1/γ) (τ 0.5, γ 2)",
    "square": "α-CL-r_s: sparsemax α (τ 5)",
    "direct": "α-CL-direct: α ∝ exp(−d^p/τ) (p 4, τ 0.5)",
}
BACKEND_CHOICES = ("auto",) + dispatch.BACKENDS
AMP_CHOICES = ("none", "bf16")


def _auto_or(kind):
    """argparse type: the literal 'auto' (→ None) or a value of `kind`."""
    def parse(text: str):
        if text == "auto":
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a{'n integer' if kind is int else ' number'}, got {text!r}")
    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    losses = "\n".join(f"  {name:<10} {text}" for name, text in LOSS_HELP.items())
    parser = argparse.ArgumentParser(
        prog="python train/run.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pre-train an encoder with a Table-1 loss of Tian (NeurIPS 2022, α-CL) and report "
                    "linear-evaluation and kNN accuracy of its frozen features.",
        epilog=f"losses (--loss):\n{losses}\n\n"
               "'auto' values come from the recipe: the paper's (Table 1: ResNet18, Adam 0.01, batch 128, 100 epochs;\n"
               "Table 2: lr 0.001 for resnet50) on"
               "CIFAR/STL-10, a small CNN and a few epochs on the embedded sets; the run prints what it resolved.\n"
               "Exit status: 0 done, 1 --check-eager failed, 2 bad flags/missing data, 3 non-finite loss, 130 Ctrl-C.\n"
               "Multi-GPU: torchrun --nproc_per_node K train/run.py ... (--batch is the global batch).",
    )
    g = parser.add_argument_group("loss")
    g.add_argument("--loss", choices=tuple(PAPER_LOSSES), default="direct",
                   help="which Table-1 loss (presets in fastalpha.PAPER_LOSSES; list below). Default: direct")
    g.add_argument("--temperature", type=float, default=None, help="τ of the loss (default: the loss's preset)")
    g.add_argument("--p", type=float, default=None, help="exponent p of --loss direct, α ∝ exp(−d^p/τ) (default 4)")
    g.add_argument("--gamma", type=float, default=None,
                   help="γ of --loss inverse, α ∝ (d²+τ)^(−1/γ) as in the authors' code (default 2)")
    g.add_argument("--eps", type=float, default=None,
                   help="ε in the normaliser of direct/entropy/backprop (default 0) and nce (default 1: today's "
                        "SimCLR NT-Xent, whose denominator holds the positive pair; the paper's Eqn 2 calls ε = 0 "
                        "the SimCLR setting)")
    g.add_argument("--negatives", choices=("all", "cross", "none"), default="all",
                   help="each anchor's negatives among the batch: all = every other row of both views (SimCLR), "
                        "cross = the other view's rows (two towers), none = only the queue's rows (needs "
                        "--queue-size). Default: all")
    g.add_argument("--queue-size", type=int, default=0, metavar="K",
                   help="keep the last K second-view embeddings (detached, first in first out) as extra negatives "
                        "of every anchor, a memory bank as in MoCo; with --supervised the bank keeps their labels "
                        "and a bank row is a positive of the anchors of its label (XBM); 0 = no queue. Default: 0")
    g.add_argument("--supervised", action="store_true",
                   help="pre-train with the labels of the pre-training images (SupCon style): the positives of a "
                        "row are every other row of its label (in every view), its negatives the rows of the other "
                        "labels; the Table-1 rule sees the mean positive distance (docs/design.md, 'Positive sets'). "
                        "With --queue-size the bank's rows are labelled too. Needs --negatives all, one process. "
                        "Default: off (self-supervised)")
    g.add_argument("--views", type=int, default=2, metavar="V",
                   help="augmented views of every image per step (multi-view SimCLR): the positives of a row are the "
                        "other V-1 views of its image (with --supervised also the other images of its label). "
                        "V > 2 needs --negatives all, one process. Default: 2")
    g.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="loss implementation: auto = cpp on CPU / triton on CUDA when available, else eager "
                        "(the dense reference). An explicit backend never falls back. Default: auto")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", choices=datasets.DATASETS, default="auto",
                   help="auto = CIFAR-10 if under --data-root (or downloadable with --download), else Fashion-MNIST "
                        "if installed, else scikit-learn's digits. synthetic = random images for smoke tests. Default: auto")
    g.add_argument("--data-root", default="data", help="folder of torchvision datasets (default: ./data)")
    g.add_argument("--download", action="store_true", help="download a missing torchvision dataset (needs network)")
    g.add_argument("--pretrain-images", type=int, default=None, metavar="N",
                   help="pre-train on a fixed draw of N images (the same for every run; 0 = all). Default: 0")
    g.add_argument("--probe-images", type=int, default=None, metavar="N",
                   help="train the linear and kNN probes on a fixed draw of N labelled images; the test set stays "
                        "complete (0 = all). Default: 0")
    g = parser.add_argument_group("recipe (auto = from --recipe)")
    g.add_argument("--recipe", choices=recipes.RECIPES, default="auto",
                   help="paper = ResNet18, Adam lr 0.01 (0.001 with --arch resnet50, Table 2), batch 128, 100 epochs; "
                        "wd 0 from the authors' code; small = small CNN, Adam 3e-3, a few epochs; auto = paper on "
                        "CIFAR/STL-10, small on embedded data. Default: auto")
    g.add_argument("--arch", choices=("auto",) + ARCHS, default="auto",
                   help="encoder: resnet18/resnet50 (CIFAR stem below 64 px), small_cnn (3 stride-2 conv layers, 128-d)")
    g.add_argument("--epochs", type=_auto_or(int), default=None, metavar="N|auto", help="pre-training epochs")
    g.add_argument("--batch", type=_auto_or(int), default=None, metavar="B|auto",
                   help="images per step (the global batch; each image gives V views (--views, default 2), so "
                        "M = V·B rows in the loss)")
    g.add_argument("--optimizer", choices=("auto", "adam", "sgd"), default="auto", help="adam, or sgd with momentum 0.9")
    g.add_argument("--lr", type=_auto_or(float), default=None, metavar="LR|auto", help="learning rate")
    g.add_argument("--wd", type=_auto_or(float), default=None, metavar="WD|auto", help="weight decay")
    g.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="learning-rate schedule: constant; cosine = cosine decay to 0 over all steps; authors = as "
                        "the authors' code (lr constant for 10 epochs, then a per-epoch cosine whose period is "
                        "counted in steps of one epoch; the paper states no schedule). Default: constant")
    g.add_argument("--seed", type=int, default=0, help="seeds weights, data order, augmentation and probes (default 0)")
    g = parser.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (torch.set_num_threads). 0 = auto: torch's default (one per core), "
                        "or 1 when the 1-minute load average is already >= the number of cores. Default: 0")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="deprecated alias of --threads (it never set data-loader processes: the data pipeline "
                        "runs as tensor ops on the training device)")
    g.add_argument("--amp", choices=AMP_CHOICES, default="none",
                   help="bf16 = autocast the encoder and projector to bfloat16 (the loss gets bf16 inputs). Default: none")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval", choices=("linear", "knn", "both"), default="both",
                   help="final probes of the trained and the untrained encoder: the linear protocol of the authors' code "
                        "(StandardScaler, Linear, Adam 3e-4, wd 1e-3, 50 epochs) and/or weighted kNN. Default: both")
    g.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="probe the untrained encoder (same seed) before pre-training; --no-baseline skips it, e.g. "
                        "when other runs of a grid already measured that seed's untrained encoder. Default: on")
    g.add_argument("--eval-every", type=int, default=1, metavar="N",
                   help="run the kNN monitor every N epochs and after the last (0 = never). Default: 1")
    g.add_argument("--linear-epochs", type=int, default=50, help="epochs of the linear probe (the authors' code: 50)")
    g.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN probe (default 200)")
    g.add_argument("--knn-t", type=float, default=0.1, help="temperature of the kNN vote weights exp(s/t) (default 0.1)")
    g = parser.add_argument_group("run folder and checks")
    g.add_argument("--out", default=None,
                   help="run folder for config.json, metrics.csv, summary.json, plots, checkpoint.pt "
                        "(default: runs/<loss>-<dataset>-<time>)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue the run in --out (or in PATH: a run folder or a checkpoint file) from its checkpoint; "
                        "flags not given are taken from the checkpoint; only --epochs, --threads, --eval-every, "
                        "--progress, --data-root, --download, --device may change")
    g.add_argument("--check-eager", type=int, default=0, metavar="K",
                   help="instead of training: K steps from the same weights, batches and augmentation with the chosen "
                        "backend and with the eager reference. Lockstep (both evaluated at the same weights each step): "
                        "largest relative deviation of the loss and of the parameter gradients, exit 1 above --check-tol. "
                        "Free-running (each backend its own K steps): loss and parameter deviations, reported only, "
                        "because Adam amplifies rounding differences even for an exact kernel")
    g.add_argument("--check-tol", type=float, default=None,
                   help=f"tolerance of the lockstep --check-eager deviations (default {DEFAULT_TOLERANCE['none']:g}; "
                        f"{DEFAULT_TOLERANCE['bf16']:g} with --amp bf16)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    return parser


def explicit_flags(argv) -> set[str]:
    """Destinations of the flags actually written on the command line."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _check_args(args, parser) -> None:
    def positive(name, value, allow_zero=False):
        if value is not None and (value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value)):
            parser.error(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("epochs", args.epochs)
    positive("lr", args.lr)
    positive("wd", args.wd, allow_zero=True)
    positive("eval-every", args.eval_every, allow_zero=True)
    positive("linear-epochs", args.linear_epochs)
    positive("knn-k", args.knn_k)
    positive("knn-t", args.knn_t)
    positive("check-eager", args.check_eager, allow_zero=True)
    positive("check-tol", args.check_tol)
    positive("threads", args.threads, allow_zero=True)
    positive("pretrain-images", args.pretrain_images, allow_zero=True)
    positive("probe-images", args.probe_images, allow_zero=True)
    if args.batch is not None and args.batch < 2:
        parser.error(f"--batch must be >= 2 (each anchor needs a negative), got {args.batch}")
    unused = [f"--{name}" for name in ("temperature", "p", "gamma", "eps")
              if getattr(args, name) is not None and name not in LOSS_PARAMETERS[args.loss]]
    if unused:
        uses = ", ".join(f"--{n}" for n in LOSS_PARAMETERS[args.loss]) or "no rule parameter"
        parser.error(f"{' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect on --loss {args.loss} (it uses {uses})")
    positive("queue-size", args.queue_size, allow_zero=True)
    if args.negatives == "none" and not args.queue_size:
        parser.error("--negatives none takes the negatives from the queue only: give --queue-size K > 0")
    if args.views < 2:
        parser.error(f"--views must be >= 2 (a positive is another view of the image), got {args.views}")
    problem = grouped_positives_error(args.supervised, args.views, args.negatives)
    if problem:
        parser.error(problem)
    try:
        loss_kwargs(args.loss, args)
    except (ValueError, TypeError) as err:
        parser.error(f"invalid loss parameter: {err}")


def loss_kwargs(loss: str, args) -> dict:
    """The AlphaCLLoss keywords of `loss`: the fastalpha.PAPER_LOSSES preset with the flags' overrides.

    A parameter neither the preset nor a flag gives is left to the library's default. The
    keywords are validated by building the public AlphaCLLoss (ValueError/TypeError when invalid).
    """
    kwargs = dict(PAPER_LOSSES[loss])
    for name in LOSS_PARAMETERS[loss]:
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    kwargs.setdefault("detach_alpha", True)
    kwargs["negatives"] = getattr(args, "negatives", "all")
    fastalpha.AlphaCLLoss(**kwargs)
    return kwargs


def resolve_device(text: str, topology) -> torch.device:
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {text} asked for CUDA, but torch sees no GPU (torch {torch.__version__})")
        device = torch.device("cuda", device.index if device.index is not None else topology.local_rank)
    elif device.type != "cpu":
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return device


def resolve_threads(args, parser) -> None:
    """Fold the deprecated --workers into --threads (warning once), then default to 0 = auto."""
    if args.workers is not None:
        import warnings

        warnings.warn("--workers is deprecated: it sets torch's CPU threads; use --threads", FutureWarning, stacklevel=2)
        print("warning: --workers is deprecated; use --threads (same meaning: torch's CPU threads)", file=sys.stderr)
        if args.threads is not None and args.threads != args.workers:
            parser.error(f"--workers {args.workers} (deprecated alias) contradicts --threads {args.threads}")
        args.threads = args.workers
    if args.threads is None:
        args.threads = 0


def set_threads(threads: int, device: torch.device) -> str:
    """Apply --threads; returns why that many threads (for the log)."""
    if threads:
        torch.set_num_threads(threads)
        return "--threads"
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and cores > 1 and load >= cores:
        torch.set_num_threads(1)
        return f"auto: the machine is busy (load {load:.1f} on {cores} cores), so 1 thread; --threads N overrides"
    return "auto: torch's default"


def resolve_config(args, data, spec, device, topology) -> RunConfig:
    recipe = recipes.choose(args.recipe, data.name, args.arch)
    out = args.out or os.path.join("runs", f"{args.loss}-{data.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    return RunConfig(
        loss=args.loss, loss_kwargs=loss_kwargs(args.loss, args), dataset=data.name, data_root=args.data_root,
        download=args.download, recipe=recipe.name, arch=recipe.arch if args.arch == "auto" else args.arch,
        epochs=args.epochs or recipe.epochs, batch=args.batch or recipe.batch,
        optimizer=recipe.optimizer if args.optimizer == "auto" else args.optimizer,
        lr=recipe.lr if args.lr is None else args.lr, wd=recipe.wd if args.wd is None else args.wd,
        schedule=args.schedule, seed=args.seed, threads=args.threads, device=str(device), amp=args.amp,
        backend=args.backend, eval=args.eval, eval_every=args.eval_every, linear_epochs=args.linear_epochs,
        knn_k=args.knn_k, knn_t=args.knn_t, out=out, progress=args.progress, world_size=topology.world_size,
        queue_size=args.queue_size, supervised=args.supervised, views=args.views,
        augment=dict(vars(spec)), baseline=args.baseline, pretrain_images=args.pretrain_images or 0,
        probe_images=args.probe_images or 0,
    )


def _checkpoint_path(args, parser) -> str:
    if args.resume:
        return os.path.join(args.resume, CHECKPOINT_NAME) if os.path.isdir(args.resume) else args.resume
    if not args.out:
        parser.error("--resume without a PATH needs --out (the run folder to continue)")
    return os.path.join(args.out, CHECKPOINT_NAME)


def take_unset_flags_from(saved: dict, args, given: set) -> None:
    """--resume: the flags of the run's maths that the command line leaves out take the checkpoint's
    values, so that the flag checks and the comparison with the checkpoint see the run's settings
    and not a new run's defaults (--loss direct and its preset τ, ε, p). The loss parameters are
    taken only when the loss is the checkpoint's: another loss is a conflict."""
    for name in ("dataset", "loss", "supervised", "views", "queue_size"):
        if name not in given and name in saved:
            setattr(args, name, saved[name])
    if args.loss == saved["loss"]:
        for name in LOSS_PARAMETERS[args.loss]:
            if name not in given:
                setattr(args, name, saved["loss_kwargs"].get(name))


def _resumed_config(saved: dict, args, given: set, parser, ckpt_path: str) -> RunConfig:
    """The checkpoint's config with the resumable flags the user gave; other given flags must agree."""
    cfg = RunConfig.from_saved(saved)
    if "workers" in given:  # the deprecated alias was folded into args.threads
        given = given | {"threads"}
    cfg.out = args.out or os.path.dirname(os.path.abspath(ckpt_path))
    overrides = {"epochs": args.epochs, "threads": args.threads, "eval_every": args.eval_every,
                 "progress": args.progress, "data_root": args.data_root, "download": args.download}
    for key, value in overrides.items():
        if key in given and value is not None:
            setattr(cfg, key, value)
    conflicts = []
    comparable = {"loss": args.loss, "dataset": args.dataset, "arch": args.arch, "batch": args.batch, "optimizer": args.optimizer,
                  "lr": args.lr, "wd": args.wd, "schedule": args.schedule, "seed": args.seed, "amp": args.amp,
                  "backend": args.backend, "eval": args.eval, "linear_epochs": args.linear_epochs, "knn_k": args.knn_k,
                  "knn_t": args.knn_t, "recipe": args.recipe, "pretrain_images": args.pretrain_images,
                  "probe_images": args.probe_images, "supervised": args.supervised, "views": args.views,
                  "queue_size": args.queue_size}
    for key, value in comparable.items():
        # Against the loaded config, whose defaults stand in for fields older checkpoints lack.
        if key in given and value not in (None, "auto") and value != getattr(cfg, key):
            conflicts.append(f"--{key.replace('_', '-')} {value} (the checkpoint has {getattr(cfg, key)!r})")
    saved_negatives = saved["loss_kwargs"].get("negatives", "all")
    if "negatives" in given and args.negatives != saved_negatives:
        conflicts.append(f"--negatives {args.negatives} (the checkpoint has {saved_negatives!r})")
    # Compared as resolved specs: a parameter the preset leaves to the rule's default (ε of
    # --loss entropy) given as that default is the same loss.
    had = make_spec(**saved["loss_kwargs"])
    wanted = make_spec(**loss_kwargs(saved["loss"], args))
    for name in ("temperature", "p", "gamma", "eps"):
        if name in given and getattr(wanted, name) != getattr(had, name):
            conflicts.append(f"--{name} {getattr(args, name)} (the checkpoint has {getattr(had, name)!r})")
    if conflicts:
        parser.error("cannot resume with changed settings: " + "; ".join(conflicts) +
                     f". Only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)} may change.")
    return cfg


def _banner(log, data) -> None:
    line = "=" * 78
    log(line)
    log(f" DATASET: {data.describe()}")
    log(f" source : {data.source}")
    for note in data.notes:
        log(f" note   : {note}")
    log(line)


def _describe(cfg: RunConfig, backend: str, log, threads_note: str = "") -> None:
    kw = ", ".join(f"{k}={v}" for k, v in cfg.loss_kwargs.items())
    log(f"recipe {cfg.recipe}: arch={cfg.arch} epochs={cfg.epochs} batch={cfg.batch} optimizer={cfg.optimizer} "
        f"lr={cfg.lr:g} wd={cfg.wd:g} schedule={cfg.schedule} seed={cfg.seed}")
    log(f"loss {cfg.loss}: {kw}; backend {cfg.backend} → {backend}")
    log(f"positives: {describe_positives(cfg)}")
    log(f"device {cfg.device} ({torch.get_num_threads()} CPU threads, {threads_note}), amp={cfg.amp}, processes={cfg.world_size}")
    log(f"eval: {cfg.eval} (linear {cfg.linear_epochs} epochs, kNN k={cfg.knn_k} t={cfg.knn_t}); kNN monitor every "
        f"{cfg.eval_every or '—'} epoch(s)")
    log(f"out: {cfg.out}")


def describe_positives(cfg: RunConfig) -> str:
    """What a row's positives are in this run (for the run's log)."""
    if cfg.supervised:
        bank = f", and the memory bank's rows of that label (K = {cfg.queue_size})" if cfg.queue_size else ""
        return f"supervised: every other row of the same label{bank}, {cfg.views} views per image"
    return f"self-supervised: the other {'view' if cfg.views == 2 else f'{cfg.views - 1} views'} of the same image"


def resolve_loss_backend(cfg: RunConfig, device: torch.device) -> str:
    """The backend `auto` (or the named one) gives for this run's loss: labels and more than two views
    need a backend with group-defined positives, a queue one that takes it (ValueError if the named
    backend cannot)."""
    kw = cfg.loss_kwargs
    spec = make_spec(kw["rule"], kw.get("temperature"), kw.get("p"), kw.get("gamma"), kw.get("eps"),
                     kw.get("normalize", True), kw.get("detach_alpha", True), kw.get("negatives", "all"))
    return dispatch.resolve_backend(cfg.backend, device, spec, has_queue=cfg.queue_size > 0,
                                    has_groups=cfg.supervised or cfg.views != 2)


def _checkpoint_note(trainer) -> str:
    """What the checkpoint on disk holds: the last state known to be good."""
    path = trainer.checkpoint_path
    if not os.path.exists(path):
        return "no checkpoint was written yet"
    saved = checkpoint.load(path)
    where = f"{saved['epochs_done']} epoch(s)" + (f" and {saved['step_in_epoch']} step(s)" if saved["step_in_epoch"] else "")
    return f"the last good state is the checkpoint {path} ({where} done; continue with --resume)"


def _install_interrupt(trainer, log):
    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        log("\nCtrl-C: stopping at the next step boundary and writing a checkpoint (press again to abort at once)")

    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: keep Python's default KeyboardInterrupt
        return None


def _summary(cfg, data, backend, trainer, status, final=None) -> dict:
    trained = [r for r in trainer.history if r.get("loss") is not None]
    summary = {
        "status": status, "dataset": data.name, "dataset_source": data.source, "dataset_notes": data.notes,
        "backend": backend, "device": cfg.device,
        "device_name": torch.cuda.get_device_name(torch.device(cfg.device)) if cfg.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "fastalpha": fastalpha.__version__, "world_size": cfg.world_size,
        "cpu_threads": torch.get_num_threads(),
        "epochs_done": trainer.epochs_done, "train_time_s": round(sum(r["epoch_time_s"] for r in trained), 2),
        "final_epoch_loss": trained[-1]["loss"] if trained else None,
        "supervised": cfg.supervised, "views": cfg.views,
        "untrained": trainer.probes.get("untrained"), "trained": final,
    }
    if final and final.get("linear"):
        lin = final["linear"]
        summary["reported"] = {"linear_top1_final": lin["final"], "linear_top1_best": lin["best"],
                               "linear_best_epoch": lin["best_epoch"], "knn_top1": final.get("knn_top1"),
                               "note": "final = after the last linear-probe epoch; best = max over its epochs"}
    summary["config"] = cfg.as_dict()
    return summary


def _write_outputs(cfg, data, backend, trainer, status, final=None, plots=True) -> None:
    records.write_metrics(os.path.join(cfg.out, "metrics.csv"), trainer.history)
    records.write_json(os.path.join(cfg.out, "summary.json"), _summary(cfg, data, backend, trainer, status, final))
    if plots:
        from .plots import plot_run

        probes = {"untrained": trainer.probes.get("untrained")}
        if final:
            probes[f"trained ({trainer.epochs_done} ep)"] = final
        positives = positives_label(cfg.supervised, cfg.views)
        plot_run(cfg.out, trainer.history, probes,
                 f"{cfg.loss} ({positives}) on {data.name}, {cfg.arch}, batch {cfg.batch}, seed {cfg.seed}")


def main(argv=None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    resolve_threads(args, parser)
    topology = distributed.from_environment()
    state = None
    if args.resume is not None:
        try:
            state = checkpoint.load(_checkpoint_path(args, parser))
        except FileNotFoundError as err:
            parser.error(f"--resume: {err}")
        take_unset_flags_from(state["config"], args, explicit_flags(argv))
    _check_args(args, parser)
    log = print if topology.is_main else (lambda *a, **k: None)
    try:
        device = resolve_device(args.device, topology)
    except ValueError as err:
        parser.error(str(err))
    threads_note = set_threads(args.threads, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest kernels once
    distributed.init(topology, device)
    try:
        return _run(args, argv, parser, topology, device, state, log, threads_note)
    finally:
        distributed.shutdown(topology)


def _run(args, argv, parser, topology, device, state, log, threads_note="") -> int:
    try:
        data = datasets.load(args.dataset, args.data_root, args.download)
    except datasets.DatasetMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    saved = state["config"] if state is not None else {}
    data = datasets.subset(data, args.pretrain_images if args.pretrain_images is not None else saved.get("pretrain_images", 0),
                           args.probe_images if args.probe_images is not None else saved.get("probe_images", 0))
    _banner(log, data)
    spec = recipes.augment_spec(data)
    if state is not None:
        cfg = _resumed_config(state["config"], args, explicit_flags(argv), parser, _checkpoint_path(args, parser))
        cfg.device, cfg.world_size = str(device), topology.world_size
    else:
        cfg = resolve_config(args, data, spec, device, topology)
    try:
        backend = resolve_loss_backend(cfg, device)
    except (RuntimeError, ValueError) as err:
        print(f"error: --backend {cfg.backend}: {err}", file=sys.stderr)
        return 2
    _describe(cfg, backend, log, threads_note)
    log(f"augmentation: {spec.describe()}")
    if topology.is_main:
        os.makedirs(cfg.out, exist_ok=True)

    if args.check_eager:
        tol = args.check_tol or DEFAULT_TOLERANCE[cfg.amp]
        if backend == "eager":
            log("note: the backend resolves to 'eager', so this compares the eager reference with itself; "
                "pass --backend cpp/triton/cuda to check a fused kernel")
        try:
            report = check_against_eager(cfg, data, spec, device, backend, args.check_eager, tol, topology, log)
        except ValueError as err:
            parser.error(str(err))
        if topology.is_main:
            records.write_json(os.path.join(cfg.out, "check_eager.json"), report)
        return 0 if report["passed"] else 1

    if state is None and os.path.exists(os.path.join(cfg.out, CHECKPOINT_NAME)):
        parser.error(f"--out {cfg.out} already holds a run; add --resume to continue it or choose another --out")
    try:
        trainer = Trainer(cfg, data, spec, device, topology, log)
    except ValueError as err:
        parser.error(str(err))
    if state is not None:
        trainer.load_state_dict(state)
        log(f"resumed from {trainer.checkpoint_path}: {trainer.epochs_done} epoch(s) done"
            + (f", epoch {trainer.epochs_done + 1} at step {trainer.step_in_epoch}" if trainer.step_in_epoch else ""))
    if topology.is_main:
        records.write_json(os.path.join(cfg.out, "config.json"), cfg.as_dict())

    from tqdm.auto import tqdm

    def progress(iterable, **kwargs):
        return tqdm(iterable, disable=not (cfg.progress and topology.is_main), mininterval=1.0, dynamic_ncols=True, **kwargs)

    def on_epoch(row):
        knn = "" if row["knn_top1"] is None else f", kNN {row['knn_top1']:.2f}% ({row['eval_time_s']:.1f}s)"
        log(f"epoch {row['epoch']}: loss {row['loss']:.5f}{knn}, {row['epoch_time_s']:.1f}s, {row['images_per_s']:.0f} img/s")
        if topology.is_main:
            records.write_metrics(os.path.join(cfg.out, "metrics.csv"), trainer.history)

    previous = _install_interrupt(trainer, log)
    try:
        if not trainer.history and cfg.baseline:
            start = time.perf_counter()
            trainer.baseline()
            log(f"untrained encoder ({time.perf_counter() - start:.1f}s):\n"
                + records.accuracy_table([("untrained (epoch 0)", trainer.probes.get("untrained") or {})]))
        trainer.fit(progress, on_epoch)
    except Interrupted as stop:
        if topology.is_main:
            _write_outputs(cfg, data, backend, trainer, "interrupted", plots=False)
        log(f"interrupted ({stop}); checkpoint: {trainer.checkpoint_path}\n"
            f"continue with: python train/run.py --out {cfg.out} --resume")
        return 130
    except NonFiniteLoss as err:
        if topology.is_main:
            _write_outputs(cfg, data, backend, trainer, f"stopped: {err}", plots=False)
        print(f"error: {err}. The run stopped before applying this step; {_checkpoint_note(trainer)}. "
              "Try a lower --lr, or --amp none.", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        log(f"\naborted; {_checkpoint_note(trainer)}")
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    if not topology.is_main:
        distributed.barrier(topology)
        return 0
    start = time.perf_counter()
    final = trainer.final_probes().as_dict()
    log(f"final probes: {time.perf_counter() - start:.1f}s")
    _write_outputs(cfg, data, backend, trainer, "completed", final)
    trained_label = f"trained (epoch {trainer.epochs_done}), {positives_label(cfg.supervised, cfg.views)}"
    table = records.accuracy_table([("untrained (epoch 0)", trainer.probes.get("untrained") or {}), (trained_label, final)])
    log("\n" + table)
    log(f"\nrun folder: {cfg.out} (config.json, metrics.csv, summary.json, loss.png, accuracy.png, checkpoint.pt)")
    distributed.barrier(topology)
    return 0

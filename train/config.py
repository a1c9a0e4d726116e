"""The fully resolved settings of a run (no `auto` left): what config.json records."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

#: Settings that may differ when a run is resumed: they change neither the maths nor the data
#: (a different device or process count changes only the rounding).
RESUMABLE_CHANGES = ("epochs", "threads", "eval_every", "progress", "data_root", "download", "out", "device", "world_size")


@dataclass
class RunConfig:
    loss: str
    loss_kwargs: dict
    dataset: str
    data_root: str
    download: bool
    recipe: str
    arch: str
    epochs: int
    batch: int
    optimizer: str
    lr: float
    wd: float
    schedule: str
    seed: int
    threads: int
    device: str
    amp: str
    backend: str
    eval: str
    eval_every: int
    linear_epochs: int
    knn_k: int
    knn_t: float
    out: str
    progress: bool
    world_size: int = 1
    baseline: bool = True
    pretrain_images: int = 0
    probe_images: int = 0
    augment: dict = field(default_factory=dict)
    queue_size: int = 0
    # Label-defined positives and views per image (docs/design.md, "Positive sets"); the
    # defaults are the self-supervised two-view run, which older checkpoints hold.
    supervised: bool = False
    views: int = 2

    @classmethod
    def from_saved(cls, saved: dict) -> "RunConfig":
        """A config read from a checkpoint; checkpoints written before `--threads` say `workers`."""
        saved = dict(saved)
        if "workers" in saved:
            saved.setdefault("threads", saved.pop("workers"))
        return cls(**saved)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def positives_label(supervised: bool, views: int) -> str:
    """A short name of a run's positive set: 'self-supervised, 2 views', 'supervised, 3 views'."""
    return f"{'supervised' if supervised else 'self-supervised'}, {views} views"


def grouped_positives_error(supervised: bool, views: int, negatives: str) -> str | None:
    """Why `--supervised` / `--views V > 2` cannot run with these settings, or None if they can.

    Label-defined positives and more than two views take every row of another group (another
    label, another image) as a negative: the loss supports them with negatives "all" only
    (fastalpha.alpha_cl_loss raises a ValueError otherwise), so the harness refuses the
    combination before loading anything. Any number of processes works (the loss gathers the
    rows and their labels across ranks), and so does a memory bank (--queue-size): its rows
    are extra columns, labelled with --supervised (docs/training.md, "Supervised pre-training").
    """
    if not supervised and views == 2:
        return None
    what = " with ".join(part for part in ("--supervised" if supervised else "", f"--views {views}" if views != 2 else "") if part)
    if negatives != "all":
        rows = "labels" if supervised else "images"
        return f"{what} needs --negatives all: its negatives are the rows of the other {rows} (got --negatives {negatives})"
    return None

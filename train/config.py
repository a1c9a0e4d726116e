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

    @classmethod
    def from_saved(cls, saved: dict) -> "RunConfig":
        """A config read from a checkpoint; checkpoints written before `--threads` say `workers`."""
        saved = dict(saved)
        if "workers" in saved:
            saved.setdefault("threads", saved.pop("workers"))
        return cls(**saved)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

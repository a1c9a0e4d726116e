"""Recipes: the paper's (ResNet18, Adam 0.01, batch 128, 100 epochs) and a small one for embedded data.

Every flag left at `auto` is filled in from the recipe; a flag given explicitly always wins.

    recipe   used for            arch       epochs  batch  optimizer  lr     wd
    paper    cifar10/100, stl10  resnet18   100     128    adam       0.01   0
    paper    --arch resnet50     resnet50   100     128    adam       0.001  0
    small    fashion-mnist       small_cnn  2       512    adam       0.003  0
    small    digits              small_cnn  30      256    adam       0.003  0
    small    synthetic           small_cnn  1       32     adam       0.003  0

Where the paper's values come from: ResNet18, batch 128, τ 0.5, lr 0.01 and Adam from Table 1's
caption and Sec. 6; lr 0.001 for ResNet-50 from Table 2's caption; 100 epochs is the first column of
both tables (they also report 300 and 500). Weight decay 0 is the authors' code
(facebookresearch/luckmatters, ssl/real-dataset); the paper does not state it. The small recipe
exists so that `python train/run.py --loss direct --batch 1024` finishes in minutes on two CPU
cores; its lr and epochs were picked from a few seeded runs (docs/training.md).

Augmentation depends on the dataset only: CIFAR as SimCLR (crop scale 0.08–1, flip, jitter
0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2), STL-10 with jitter 0.8/0.8/0.8/0.2 and a 9-tap Gaussian
blur (p 0.5), the grayscale sets with brightness/contrast jitter only, milder crops (scale
0.2–1 / 0.3–1 on 28 px / 16 px images) and no flip for digits. The paper does not list its
augmentation; these follow SimCLR's CIFAR/STL-10 pipelines as the authors' code does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .augment import AugmentSpec
from .data import EMBEDDED, ImageData

RECIPES = ("auto", "paper", "small")


@dataclass(frozen=True)
class Recipe:
    name: str
    arch: str
    epochs: int
    batch: int
    optimizer: str
    lr: float
    wd: float


PAPER = Recipe("paper", arch="resnet18", epochs=100, batch=128, optimizer="adam", lr=0.01, wd=0.0)
#: Table 2's caption: "for ResNet50, learning rate is 0.001".
PAPER_RESNET50 = Recipe("paper", arch="resnet50", epochs=100, batch=128, optimizer="adam", lr=0.001, wd=0.0)

#: (epochs, batch, lr) of the small recipe per dataset: a few minutes on two CPU cores.
SMALL = {"fashion-mnist": (2, 512, 3e-3), "digits": (30, 256, 3e-3), "synthetic": (1, 32, 3e-3)}


def small(dataset: str) -> Recipe:
    epochs, batch, lr = SMALL.get(dataset, (10, 512, 3e-3))
    return Recipe("small", arch="small_cnn", epochs=epochs, batch=batch, optimizer="adam", lr=lr, wd=0.0)


def paper(arch: str = "auto") -> Recipe:
    """The paper's recipe for `arch` (its lr depends on the backbone: Table 2)."""
    return PAPER_RESNET50 if arch == "resnet50" else PAPER


def choose(recipe: str, dataset: str, arch: str = "auto") -> Recipe:
    if recipe == "paper":
        return paper(arch)
    if recipe == "small":
        return small(dataset)
    if recipe != "auto":
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    return small(dataset) if dataset in EMBEDDED else paper(arch)


def channel_stats(images: torch.Tensor, chunk: int = 512) -> tuple[tuple, tuple]:
    """Per-channel mean and std of uint8 images in [0, 1] units (chunked: STL-10 is 2.9 GB)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for lo in range(0, len(images), chunk):
        x = images[lo: lo + chunk].to(torch.float64) / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def augment_spec(data: ImageData) -> AugmentSpec:
    """The augmentation of `data` (normalised with its own pre-training channel statistics)."""
    mean, std = channel_stats(data.pretrain)
    base = dict(channels=data.channels, mean=mean, std=std)
    if data.name in ("cifar10", "cifar100"):
        return AugmentSpec(size=32, **base)
    if data.name == "stl10":
        return AugmentSpec(size=96, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, blur_kernel=9, **base)
    if data.name == "fashion-mnist":
        return AugmentSpec(size=28, crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.0, 0.0), **base)
    if data.name == "digits":
        return AugmentSpec(size=16, crop_scale=(0.3, 1.0), flip_p=0.0, jitter=(0.4, 0.4, 0.0, 0.0), **base)
    return AugmentSpec(size=data.image_size, crop_scale=(0.3, 1.0), **base)

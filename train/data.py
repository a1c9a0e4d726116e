"""Datasets as whole uint8 tensors (N, C, H, W), which the batch pipeline indexes on the device.

    cifar10 / cifar100   torchvision, under --data-root (--download fetches them)
    stl10                torchvision; pre-training on `train+unlabeled` (105k), probes on `train`;
                         100k of the pre-training images have no label, so no --supervised
    fashion-mnist        gzip'd IDX files: --data-root, or Debian's dataset-fashion-mnist package
                         (/usr/share/datasets/fashion-mnist), or --download (torchvision)
    digits               scikit-learn's 8×8 digits (1797 images, always installed): a fixed
                         stratified 80/20 split (random_state=0)
    synthetic            random class-dependent images, for smoke tests only

`--dataset auto` takes CIFAR-10 if it is under --data-root (or can be downloaded with
--download), else Fashion-MNIST if its files exist, else digits, and says which and why.
An explicitly named dataset never falls back: a missing one raises `DatasetMissing`.
"""
from __future__ import annotations

import gzip
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass, field

import numpy as np
import torch

DATASETS = ("auto", "cifar10", "cifar100", "stl10", "fashion-mnist", "digits", "synthetic")
EMBEDDED = ("fashion-mnist", "digits", "synthetic")
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetMissing(RuntimeError):
    """A dataset that was asked for is not on disk (the message says how to get it)."""


@dataclass
class ImageData:
    """Pre-training images plus the labelled train/test sets of the probes (uint8, NCHW).

    `pretrain_labels` are the class ids of the pre-training images, which `--supervised` turns
    into positives; None where the pre-training images are unlabelled (STL-10's train+unlabeled).
    """

    name: str
    source: str
    pretrain: torch.Tensor
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    notes: list = field(default_factory=list)
    pretrain_labels: torch.Tensor | None = None

    @property
    def channels(self) -> int:
        return self.pretrain.shape[1]

    @property
    def image_size(self) -> int:
        return self.pretrain.shape[-1]

    def describe(self) -> str:
        c, h, w = self.pretrain.shape[1:]
        extra = "" if self.pretrain is self.train else f" ({len(self.pretrain)} for pre-training)"
        return f"{self.name}: {len(self.train)} train / {len(self.test)} test images{extra}, {c}×{h}×{w}, {self.num_classes} classes"


def _nhwc_to_nchw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array.transpose(0, 3, 1, 2)))


def _labels(values) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))


def reachable(url: str, timeout: float = 4.0) -> bool:
    """Whether a TCP connection to the URL's host opens within `timeout` seconds (DNS included)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result = []

    def probe():
        try:
            with socket.create_connection((parsed.hostname, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return bool(result and result[0])


def _torchvision_dataset(cls, root: str, download: bool, **kwargs):
    """Instantiate a torchvision dataset, downloading only if asked and the host answers."""
    try:
        return cls(root, download=False, **kwargs)
    except RuntimeError:
        if not download:
            raise
    url = getattr(cls, "url", None) or cls.mirrors[0]
    if not reachable(url):
        raise DatasetMissing(f"cannot download {cls.__name__}: {urllib.parse.urlparse(url).hostname} is not reachable")
    return cls(root, download=True, **kwargs)


def _missing(name: str, root: str, err: Exception) -> DatasetMissing:
    how = f"run with --download (and network access), or put torchvision's {name} files under --data-root {root}"
    if name == "fashion-mnist":
        how = f"apt-get install dataset-fashion-mnist (files in {FASHION_SYSTEM_DIR}), or run with --download"
    return DatasetMissing(f"dataset {name!r} not found ({err}); {how}")


def load_cifar(name: str, root: str, download: bool) -> ImageData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = _torchvision_dataset(cls, root, download, train=True)
        test = _torchvision_dataset(cls, root, download, train=False)
    except RuntimeError as err:
        raise _missing(name, root, err) from err
    images, labels = _nhwc_to_nchw(train.data), _labels(train.targets)
    return ImageData(name, os.path.join(root, train.base_folder), images, images, labels,
                     _nhwc_to_nchw(test.data), _labels(test.targets), 10 if name == "cifar10" else 100,
                     pretrain_labels=labels)


def load_stl10(root: str, download: bool) -> ImageData:
    import torchvision

    cls = torchvision.datasets.STL10
    try:
        pretrain = _torchvision_dataset(cls, root, download, split="train+unlabeled")
        train = cls(root, split="train")
        test = cls(root, split="test")
    except RuntimeError as err:
        raise _missing("stl10", root, err) from err
    return ImageData("stl10", os.path.join(root, cls.base_folder), torch.from_numpy(pretrain.data), torch.from_numpy(train.data),
                     _labels(train.labels), torch.from_numpy(test.data), _labels(test.labels), 10)


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip'd or not: magic 0x0000 08 <ndim>, big-endian sizes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} bytes")
    return data.reshape(shape)


def fashion_mnist_dirs(root: str) -> list[str]:
    return [os.path.join(root, "FashionMNIST", "raw"), os.path.join(root, "fashion-mnist"), FASHION_SYSTEM_DIR]


def _find_fashion_files(root: str) -> dict | None:
    for folder in fashion_mnist_dirs(root):
        found = {}
        for key, stem in _FASHION_FILES.items():
            for candidate in (stem + ".gz", stem):
                if os.path.isfile(os.path.join(folder, candidate)):
                    found[key] = os.path.join(folder, candidate)
                    break
        if len(found) == len(_FASHION_FILES):
            return found
    return None


def load_fashion_mnist(root: str, download: bool) -> ImageData:
    files = _find_fashion_files(root)
    if files is None and download:
        import torchvision

        try:
            _torchvision_dataset(torchvision.datasets.FashionMNIST, root, True, train=True)
        except RuntimeError as err:
            raise _missing("fashion-mnist", root, err) from err
        files = _find_fashion_files(root)
    if files is None:
        raise _missing("fashion-mnist", root, FileNotFoundError("no IDX files in " + ", ".join(fashion_mnist_dirs(root))))
    arrays = {key: read_idx(path) for key, path in files.items()}
    train, labels = torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1), _labels(arrays["train_labels"])
    return ImageData("fashion-mnist", os.path.dirname(files["train_images"]), train, train, labels,
                     torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1), _labels(arrays["test_labels"]), 10,
                     pretrain_labels=labels)


def load_digits() -> ImageData:
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(images, bunch.target, test_size=0.2, stratify=bunch.target, random_state=0)
    train, labels = torch.from_numpy(x_train), _labels(y_train)
    return ImageData("digits", "sklearn.datasets.load_digits", train, train, labels, torch.from_numpy(x_test),
                     _labels(y_test), 10, pretrain_labels=labels)


def load_synthetic(n_train: int = 96, n_test: int = 48, classes: int = 4, size: int = 16) -> ImageData:
    """Class prototypes (smooth random RGB images) plus noise; fixed seed, for smoke tests."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.rand(classes, 3, 4, 4, generator=gen)
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(n):
        labels = torch.arange(n) % classes
        x = prototypes[labels] + 0.15 * torch.randn(n, 3, size, size, generator=gen)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train, train_labels = draw(n_train)
    test, test_labels = draw(n_test)
    return ImageData("synthetic", "generated (seed 0)", train, train, train_labels, test, test_labels, classes,
                     pretrain_labels=train_labels)


def load(name: str, root: str, download: bool = False) -> ImageData:
    """Load `name`; `auto` chooses as described in the module docstring and records why in `notes`."""
    if name == "auto":
        return _load_auto(root, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download)
    if name == "stl10":
        return load_stl10(root, download)
    if name == "fashion-mnist":
        return load_fashion_mnist(root, download)
    if name == "digits":
        return load_digits()
    if name == "synthetic":
        return load_synthetic()
    raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")


def _load_auto(root: str, download: bool) -> ImageData:
    notes = []
    try:
        data = load_cifar("cifar10", root, download)
        data.notes = ["--dataset auto: CIFAR-10 found" + (" or downloaded" if download else "") + f" under {root}"]
        return data
    except DatasetMissing as err:
        reason = str(err).split(";")[0]
        notes.append(f"CIFAR-10 not used: {reason}" + ("" if download else " (no --download given)"))
    try:
        data = load_fashion_mnist(root, False)
        data.notes = notes + [f"--dataset auto fell back to Fashion-MNIST from {data.source}"]
        return data
    except DatasetMissing:
        notes.append(f"Fashion-MNIST not used: no IDX files in {', '.join(fashion_mnist_dirs(root))}")
    data = load_digits()
    data.notes = notes + ["--dataset auto fell back to scikit-learn's digits (8×8, 1797 images)"]
    return data


def subset(data: ImageData, pretrain_images: int = 0, probe_images: int = 0) -> ImageData:
    """The same data with fewer pre-training and/or probe-training images (0 = all).

    Each subset is one fixed draw (a permutation seeded with 0, the same for every run and
    seed), so that runs of a grid differ only in what they are meant to differ in. The test
    set is always complete.
    """
    def draw(n_total, n):
        return torch.randperm(n_total, generator=torch.Generator().manual_seed(0))[:n]

    notes = list(data.notes)
    pretrain, pretrain_labels, train, train_labels = data.pretrain, data.pretrain_labels, data.train, data.train_labels
    if pretrain_images and pretrain_images < len(pretrain):
        idx = draw(len(pretrain), pretrain_images)
        pretrain = pretrain[idx]
        pretrain_labels = pretrain_labels[idx] if pretrain_labels is not None else None
        notes.append(f"pre-training on a fixed draw of {pretrain_images} of the {len(data.pretrain)} images (--pretrain-images)")
    if probe_images and probe_images < len(train):
        idx = draw(len(train), probe_images)
        train, train_labels = train[idx], train_labels[idx]
        notes.append(f"probes trained on a fixed draw of {probe_images} of the {len(data.train)} labelled images "
                     "(--probe-images); the test set is complete")
    return ImageData(data.name, data.source, pretrain, train, train_labels, data.test, data.test_labels,
                     data.num_classes, notes, pretrain_labels)


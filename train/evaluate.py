r"""Probes of a frozen encoder: weighted kNN (the cheap monitor) and the authors' linear protocol.

Features are the encoder's pooled outputs h (512-d for ResNet18) of the *un-augmented* images,
computed in eval mode (BatchNorm uses its running statistics).

* kNN (Wu et al. 2018, as in solo-learn): cosine similarities s to the k = 200 nearest training
  features, each neighbour votes for its label with weight exp(s / t), t = 0.1.
* linear (the authors' code, facebookresearch/luckmatters, linear_feature_eval.py; the paper
  names "linear evaluation protocol" without details): StandardScaler fitted on the training
  features, one Linear layer, cross-entropy, Adam lr 3e-4, weight decay 1e-3, batch 128,
  50 epochs; test top-1 after every epoch. Both the *final* (after the last epoch) and the
  *best* (max over epochs, which is what the authors' code reports) accuracies are returned.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler

from . import augment


@torch.no_grad()
def extract_features(model, images: torch.Tensor, spec, device: torch.device, batch: int = 1024, amp_dtype=None) -> torch.Tensor:
    """(N, F) float32 features of the un-augmented `images` (uint8, any device) on `device`."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for lo in range(0, len(images), batch):
            x = augment.plain(images[lo: lo + batch].to(device, non_blocking=True), spec)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out.append(model.features(x).float())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int, k: int = 200,
                 temperature: float = 0.1, chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of similarity-weighted kNN voting on L2-normalised features."""
    bank = F.normalize(train_features, dim=1)
    bank_labels = train_labels.to(bank.device)
    k = min(k, len(bank))
    correct = 0
    for lo in range(0, len(test_features), chunk):
        query = F.normalize(test_features[lo: lo + chunk], dim=1)
        sims, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=bank.device, dtype=sims.dtype)
        votes.scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += (votes.argmax(1) == test_labels[lo: lo + chunk].to(bank.device)).sum().item()
    return 100.0 * correct / len(test_features)


@dataclass
class LinearResult:
    final: float
    best: float
    best_epoch: int
    curve: list = field(default_factory=list)  # test top-1 (%) after each epoch

    def as_dict(self) -> dict:
        return {"final": self.final, "best": self.best, "best_epoch": self.best_epoch, "curve": self.curve}


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device):
    """The probe's steps are tiny (B×F times F×classes): a second CPU thread only adds OpenMP
    synchronisation, which cost 6-20× on a busy 2-core machine (3 probe epochs on 60k×128
    features: 0.8-1.9 s with one thread, 11-18 s with two). One thread also makes the probe's
    result independent of --workers."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int, device: torch.device,
                 epochs: int = 50, lr: float = 3e-4, weight_decay: float = 1e-3, batch: int = 128, seed: int = 0) -> LinearResult:
    """The paper's linear evaluation on frozen features; seeded, so it is reproducible."""
    scaler = StandardScaler().fit(train_features.cpu().numpy())
    x_train = torch.from_numpy(scaler.transform(train_features.cpu().numpy()).astype(np.float32)).to(device)
    x_test = torch.from_numpy(scaler.transform(test_features.cpu().numpy()).astype(np.float32)).to(device)
    y_train, y_test = train_labels.to(device), test_labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(x_train.shape[1], num_classes)
    bound = 1.0 / x_train.shape[1] ** 0.5  # nn.Linear's default init, drawn from our generator
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.uniform_(-bound, bound, generator=gen)
    linear.to(device)
    # fused: one kernel per step instead of a Python loop over tensors (~20% faster probe on CPU).
    optimizer = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))
    with _one_thread_on_cpu(device):
        curve = _train_linear(linear, optimizer, x_train, y_train, x_test, y_test, epochs, batch, gen)
    best_epoch = int(np.argmax(curve)) + 1
    return LinearResult(final=curve[-1], best=curve[best_epoch - 1], best_epoch=best_epoch, curve=curve)


def _train_linear(linear, optimizer, x_train, y_train, x_test, y_test, epochs, batch, gen) -> list[float]:
    """Minibatch training; returns the test top-1 (%) after each epoch."""
    device = x_train.device
    curve = []
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=gen).to(device)
        for lo in range(0, len(order), batch):
            idx = order[lo: lo + batch]
            loss = F.cross_entropy(linear(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            curve.append(100.0 * (linear(x_test).argmax(1) == y_test).sum().item() / len(y_test))
    return curve


@dataclass
class ProbeResult:
    knn: float | None = None
    linear: LinearResult | None = None

    def as_dict(self) -> dict:
        return {"knn_top1": self.knn, "linear": None if self.linear is None else self.linear.as_dict()}


def probe(model, data, spec, device, which: str, knn_k: int, knn_t: float, linear_epochs: int, seed: int,
          amp_dtype=None, features=None) -> ProbeResult:
    """Run the probes named by `which` (knn | linear | both) on `model`'s frozen features."""
    if features is None:
        features = (extract_features(model, data.train, spec, device, amp_dtype=amp_dtype),
                    extract_features(model, data.test, spec, device, amp_dtype=amp_dtype))
    train_f, test_f = features
    result = ProbeResult()
    if which in ("knn", "both"):
        result.knn = knn_accuracy(train_f, data.train_labels, test_f, data.test_labels, data.num_classes, knn_k, knn_t)
    if which in ("linear", "both"):
        result.linear = linear_probe(train_f, data.train_labels, test_f, data.test_labels, data.num_classes, device,
                                     epochs=linear_epochs, seed=seed)
    return result

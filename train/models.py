r"""Encoders and the projector of the paper's recipe.

    x ──encoder──▶ h (F-d pooled features: what the probes see) ──projector──▶ z (128-d, into the loss)

* resnet18 / resnet50: torchvision's, without the classifier. For small images (≤ 64 px) the
  CIFAR stem of SimCLR (Appendix B.9) and of the authors' code: conv1 = 3×3, stride 1, no
  max-pool; STL-10 (96 px) keeps the ImageNet stem (7×7 stride 2 + max-pool). F = 512 / 2048.
* small_cnn: three 3×3 conv–BN–ReLU layers of stride 2 (16, 32, 128 channels), global average
  pool, F = 128 (28 px → 14 → 7 → 4). Sized for two busy CPU cores (docs/training.md): a full
  Fashion-MNIST epoch (60k images × 2 views) in well under a minute. Measured there: an earlier
  4-layer version with a stride-1 first layer cost 4.5× more CPU time per image, and widths
  (32, 64, 128) ~1.4× more time per epoch than these for the same kNN accuracy after 2 epochs.
* projector: Linear(F, 512) → BatchNorm1d(affine=False) → ReLU → Linear(512, 128). The loss
  L2-normalises z (normalize=True), so z itself is not normalised here. The first Linear has
  no bias: BatchNorm subtracts the batch mean, so a bias there has an exactly zero gradient
  and Adam would turn its rounding noise (~1e-8) into ±lr steps, a random walk that makes two
  otherwise identical runs (e.g. --check-eager) drift apart at once.
"""
from __future__ import annotations

import torch
import torchvision
from torch import nn

ARCHS = ("resnet18", "resnet50", "small_cnn")


def _resnet(arch: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    net = getattr(torchvision.models, arch)(weights=None)
    if image_size <= 64:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    features = net.fc.in_features
    net.fc = nn.Identity()
    return net, features


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Sequential):
    """conv(C→16, s2) · conv(16→32, s2) · conv(32→128, s2) · avg-pool → 128."""

    widths = (16, 32, 128)

    def __init__(self, in_channels: int):
        layers, cin = [], in_channels
        for cout in self.widths:
            layers += _conv_bn_relu(cin, cout, 2)
            cin = cout
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = cin


def build_encoder(arch: str, in_channels: int, image_size: int) -> tuple[nn.Module, int]:
    """(encoder, F): the encoder maps (B, C, S, S) images to (B, F) pooled features."""
    if arch in ("resnet18", "resnet50"):
        return _resnet(arch, in_channels, image_size)
    if arch == "small_cnn":
        net = SmallCNN(in_channels)
        return net, net.out_features
    raise ValueError(f"unknown arch={arch!r}; expected one of {ARCHS}")


def projector(in_features: int, hidden: int = 512, out: int = 128) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden, bias=False), nn.BatchNorm1d(hidden, affine=False), nn.ReLU(inplace=True),
        nn.Linear(hidden, out)
    )


class ContrastiveModel(nn.Module):
    """Encoder + projector; `forward` gives z for the loss, `features` the probes' h."""

    def __init__(self, arch: str, in_channels: int, image_size: int, hidden: int = 512, out: int = 128):
        super().__init__()
        self.encoder, self.feature_dim = build_encoder(arch, in_channels, image_size)
        self.projector = projector(self.feature_dim, hidden, out)
        self.embedding_dim = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

"""Validation of the embedding tensors handed to the public API (clear errors, named arguments)."""
from __future__ import annotations

import torch


def check_views(z1, z2, names=("z1", "z2")) -> None:
    """Two views of one batch: 2-D float tensors of equal shape (N ≥ 1, D ≥ 1), one dtype, one device."""
    for name, z in zip(names, (z1, z2)):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {z.dtype}")
        if z.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(z.shape)}")
    a, b = names
    if z1.dtype != z2.dtype:
        raise TypeError(f"{a} and {b} must have the same dtype, got {z1.dtype} and {z2.dtype}")
    if z1.device != z2.device:
        raise ValueError(f"{a} and {b} must be on the same device, got {z1.device} and {z2.device}")
    if z1.shape != z2.shape:
        raise ValueError(f"{a} and {b} must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] == 0:
        raise ValueError(f"{a}/{b} need N >= 1 rows, got N = 0")
    if z1.shape[1] == 0:
        raise ValueError(f"{a}/{b} need D >= 1 columns, got D = 0")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value

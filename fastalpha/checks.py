"""Validation of the embedding tensors handed to the public API (clear errors, named arguments)."""
from __future__ import annotations

import torch


def check_views(z1, z2, names=("z1", "z2")) -> None:
    """Two views of one batch: 2-D float tensors of equal shape (N ≥ 1, D ≥ 1), one dtype, one device."""
    for name, z in zip(names, (z1, z2)):
        check_embedding(name, z, sizes=False)
    a, b = names
    _check_alike(z1, a, z2, b)
    if z1.shape[0] == 0:
        raise ValueError(f"{a}/{b} need N >= 1 rows, got N = 0")
    if z1.shape[1] == 0:
        raise ValueError(f"{a}/{b} need D >= 1 columns, got D = 0")


def _check_alike(first, a: str, view, b: str) -> None:
    """Two views of one batch: one dtype, one device, one shape."""
    if view.dtype != first.dtype:
        raise TypeError(f"{a} and {b} must have the same dtype, got {first.dtype} and {view.dtype}")
    if view.device != first.device:
        raise ValueError(f"{a} and {b} must be on the same device, got {first.device} and {view.device}")
    if view.shape != first.shape:
        raise ValueError(f"{a} and {b} must have the same shape (views of one batch), got "
                         f"{tuple(first.shape)} and {tuple(view.shape)}")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_embedding(name: str, z, sizes: bool = True, rows: str = "N") -> None:
    """One (rows, D) float tensor; with `sizes`, at least one row and one column too. `rows` names
    the row count in the messages (N samples of a view, B rows of a batch)."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {z.dtype}")
    if z.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({rows}, D), got shape {tuple(z.shape)}")
    if not sizes:
        return
    if z.shape[0] == 0:
        raise ValueError(f"{name} needs {rows} >= 1 rows, got {rows} = 0")
    if z.shape[1] == 0:
        raise ValueError(f"{name} needs D >= 1 columns, got D = 0")


def views_of(z1, z2, labels) -> tuple[list, list]:
    """The views of a call and their names: z1 and z2, a (V, N, D) tensor, a list of V views,
    or one labelled (M, D) view (z2 None and labels given). All of one shape, dtype and device."""
    if z2 is not None:
        views, names = [z1, z2], ["z1", "z2"]
    elif isinstance(z1, (list, tuple)) or (isinstance(z1, torch.Tensor) and z1.dim() == 3):
        views = list(z1.unbind(0)) if isinstance(z1, torch.Tensor) else list(z1)
        names = [f"views[{k}]" for k in range(len(views))]
        if len(views) < 2 and labels is None:
            raise ValueError(f"need V >= 2 views of each sample (or labels= to take the positives from labels), got V = {len(views)}")
        if not views:
            raise ValueError("need at least one view, got an empty list")
    else:
        if labels is None:
            raise ValueError("alpha_cl_loss needs a second view z2, V >= 2 views as a (V, N, D) tensor or a list, "
                             "or labels= to take the positives of one view from its labels")
        views, names = [z1], ["z1"]
    for name, view in zip(names, views):
        check_embedding(name, view)
    first, a = views[0], names[0]
    for name, view in zip(names[1:], views[1:]):
        _check_alike(first, a, view, name)
    return views, names


def check_labels(labels, n: int, m: int, device, name: str = "labels") -> None:
    """labels: a 1-D integer tensor of length N (one per sample) or M (one per row), on the views' device."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] not in (n, m):
        lengths = f"K = {n}" if n == m else f"N = {n} (one per sample) or M = {m} (one per row)"
        raise ValueError(f"{name} must be 1-D of length {lengths}, got shape {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on the device of the embeddings ({device}), got {labels.device}")

"""Checkpoints that survive a crash at any moment, and the RNG state a bit-for-bit resume needs.

`save` writes to `<path>.tmp` and then `os.replace`s it over `<path>`: the rename is atomic on
POSIX file systems, so `<path>` is always either the previous complete checkpoint or the new
one, never a torn file.
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def save(state: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    # Our own file: it holds numpy/python RNG states, which weights_only loading refuses.
    return torch.load(path, map_location="cpu", weights_only=False)


def capture_rng() -> dict:
    """The global RNG states of python, numpy, torch (CPU) and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

"""What the theory scripts share on their command line: --seed, --out, and one thread."""
from __future__ import annotations

import argparse
import os
import time

import torch

FIGURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "figures")


def parser(doc: str) -> argparse.ArgumentParser:
    """The parser of a script whose module doc is `doc` (its first line describes the script),
    with --seed and --out (default: figures/ beside the scripts)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=FIGURES)
    return ap


def start(ap: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, float]:
    """The parsed arguments and the start time, torch on one thread (tiny matrices: more
    threads only add contention)."""
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    return args, time.time()

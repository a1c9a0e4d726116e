"""What the training-harness tests (test_train*.py) share: running train/ in-process on the
synthetic set, reading what a run wrote, and the test doubles they install.

Importing it puts the repository on sys.path (train/ is not part of the package) and gives the
importing module the autouse fixture `restore_threads`.
"""
import json
import os
import signal
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from fastalpha import dispatch  # noqa: E402
from fastalpha.backends import eager as eager_backend  # noqa: E402
from train import augment, cli, trainer as trainer_mod  # noqa: E402

#: Small, fast runs. One thread: bit-for-bit comparisons need the same reduction order in every run.
SYNTHETIC = ["--dataset", "synthetic", "--threads", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def restore_threads():
    """`--threads` sets torch's thread count for the process; give the next test the old one."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def run_in_process(small: list, out, *flags) -> int:
    """The exit status of `train/run.py` with the flags `small` then `flags`, writing into `out`."""
    return cli.main([*small, "--out", str(out), *flags])


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics(out):
    from train.records import read_metrics

    return read_metrics(os.path.join(out, "metrics.csv"))


def state(out):
    """The checkpoint a run left in `out`."""
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)


def fake_backend(perturb: float, groups: bool = False, grouped_queue: bool = False):
    """A replacement of dispatch._module whose 'cpp' backend is the eager one with its gradient
    scaled by (1 + perturb); `groups`: it also claims group-defined positives (`grouped_queue`:
    with a labelled queue too)."""

    class Fake:
        status = device_status = staticmethod(lambda *args: (True, "test double"))
        supports = staticmethod(eager_backend.supports)
        supports_groups = groups
        supports_grouped_queue = grouped_queue

        @staticmethod
        def alpha_cl_fused(*args, **kwargs):
            loss_rows, grad = eager_backend.alpha_cl_fused(*args, **kwargs)
            return loss_rows, grad * (1 + perturb)

    real = dispatch._module
    return lambda name: Fake if name == "cpp" else real(name)


def record_views(monkeypatch) -> list:
    """Every tuple of views the trainer draws, in order (the wrapper calls the real augment.views)."""
    calls = []
    real = augment.views

    def recording(*args, **kwargs):
        views = real(*args, **kwargs)
        calls.append(tuple(v.clone() for v in views))
        return views

    monkeypatch.setattr(augment, "views", recording)
    return calls


def assert_same_run(a, b):
    """Runs in folders `a` and `b` agree bit for bit: metrics, weights, optimizer state, summary."""
    rows_a, rows_b = metrics(a), metrics(b)
    assert len(rows_a) == len(rows_b)
    for ra, rb in zip(rows_a, rows_b):
        for column in ("epoch", "steps", "loss", "lr", "knn_top1"):
            assert ra[column] == rb[column], f"epoch {ra['epoch']}: {column} {ra[column]} != {rb[column]}"
    sa, sb = state(a), state(b)
    for key, value in sa["model"].items():
        assert torch.equal(value, sb["model"][key]), f"weights differ in {key}"
    for (ka, va), (kb, vb) in zip(sa["optimizer"]["state"].items(), sb["optimizer"]["state"].items()):
        for name in va:
            assert torch.equal(va[name], vb[name]), f"optimizer state {ka}.{name} differs"
    assert read_json(os.path.join(a, "summary.json"))["trained"] == read_json(os.path.join(b, "summary.json"))["trained"]


def press_ctrl_c_at(monkeypatch, epoch: int, step: int):
    """Send the process SIGINT (Ctrl-C) as the trainer starts `step` (from 0) of `epoch`; the
    trainer's real handler sets its stop flag. Returns the unpatched Trainer.train_step, to put back."""
    original = trainer_mod.Trainer.train_step

    def interrupted(self, at_epoch, at_step, order):
        if (at_epoch, at_step) == (epoch, step):
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, at_epoch, at_step, order)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", interrupted)
    return original

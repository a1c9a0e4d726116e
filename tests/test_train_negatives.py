"""train/run.py with two-tower negatives and a memory bank: the flags reach the loss, the bank
holds the previous steps' second views, and it is part of the checkpoint (bit-for-bit resume)."""
import json

import pytest
import torch

from train_helpers import SYNTHETIC, run_in_process, state

from train import cli, trainer as trainer_mod

SMALL = [*SYNTHETIC, "--linear-epochs", "2", "--no-baseline"]


def run(out, *flags) -> int:
    return run_in_process(SMALL, out, *flags)


def test_negatives_and_queue_reach_the_loss(tmp_path, monkeypatch):
    seen = []
    original = trainer_mod.Trainer.train_step

    def spy(self, epoch, step, order):
        queue_rows = len(self.queue) if self.queue is not None else None
        seen.append((self.loss_fn.kwargs["negatives"], queue_rows))
        return original(self, epoch, step, order)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", spy)
    assert run(tmp_path / "q", "--batch", "16", "--epochs", "1", "--negatives", "cross", "--queue-size", "40") == 0
    # The bank starts empty and grows by one batch of second views per step, up to its size.
    assert [rows for _, rows in seen[:4]] == [0, 16, 32, 40]
    assert all(neg == "cross" for neg, _ in seen)
    bank = state(tmp_path / "q")["queue"]
    assert bank["bank"].shape == (40, 128) and int(bank["count"]) == 16 * len(seen)


def test_resume_with_a_queue_is_bit_for_bit(tmp_path):
    flags = ["--batch", "16", "--seed", "2", "--negatives", "none", "--queue-size", "48", "--loss", "nce"]
    assert run(tmp_path / "full", *flags, "--epochs", "2") == 0
    assert run(tmp_path / "split", *flags, "--epochs", "1") == 0
    assert cli.main(["--out", str(tmp_path / "split"), "--resume", "--epochs", "2", "--threads", "1", "--no-progress"]) == 0
    a, b = state(tmp_path / "full"), state(tmp_path / "split")
    assert torch.equal(a["queue"]["bank"], b["queue"]["bank"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"weights differ in {key}"


@pytest.mark.parametrize("flags,message", [
    (["--negatives", "none"], "--queue-size"),
    (["--queue-size", "-3"], "--queue-size must be >= 0"),
])
def test_bad_negative_flags_exit_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "bad", "--epochs", "1", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_check_eager_compares_with_the_memory_bank(tmp_path):
    """--check-eager with --queue-size: both backends see the bank the trainer fills. With
    negatives="none" the first step has no negatives (empty bank, loss 0) and the next ones the
    previous steps' second views; the check passes on the real backend."""
    assert run(tmp_path / "c", "--batch", "16", "--negatives", "none", "--queue-size", "40", "--check-eager", "3") == 0
    report = json.loads((tmp_path / "c" / "check_eager.json").read_text())
    losses = [row["loss_eager"] for row in report["lockstep"]]
    assert losses[0] == 0 and all(loss != 0 for loss in losses[1:]), losses
    assert report["passed"], report

"""train/run.py --supervised (label-defined positives, SupCon style) and --views V (multi-view
SimCLR): the flags are validated when parsed, the labels and the V views reach the loss,
--check-eager compares with them, and a resumed run equals the uninterrupted one bit for bit.

CPU only, in-process (`train.cli.main(argv)`), on the synthetic set (96 images, 4 classes)
except the end-to-end digits run.
"""
import os

import pytest
import torch

from train_helpers import (SYNTHETIC, assert_same_run, fake_backend, press_ctrl_c_at, read_json,  # noqa: F401
                           record_views, restore_threads, run_in_process, state)

import fastalpha
from fastalpha import dispatch
from fastalpha.backends import eager as eager_backend
from train import cli, data as datasets, trainer as trainer_mod
from train.batches import BatchPlan

SMALL = [*SYNTHETIC, "--linear-epochs", "2", "--no-baseline"]


def run(out, *flags) -> int:
    return run_in_process(SMALL, out, *flags)


def _record_loss_calls(monkeypatch, banks=None):
    """Every call of AlphaCLLoss.forward: (z1, z2, labels, the loss it returned), inputs detached;
    `banks`, a list, also gets every call's (queue, queue_labels)."""
    calls = []
    forward = fastalpha.AlphaCLLoss.forward

    def recording(self, z1, z2=None, queue=None, labels=None, queue_labels=None):
        loss = forward(self, z1, z2, queue=queue, labels=labels, queue_labels=queue_labels)
        views = [v.detach().clone() for v in z1] if isinstance(z1, list) else z1.detach().clone()
        calls.append((views, None if z2 is None else z2.detach().clone(), labels, loss.detach().clone(), self.kwargs))
        if banks is not None:
            banks.append(tuple(None if t is None else t.detach().clone() for t in (queue, queue_labels)))
        return loss

    monkeypatch.setattr(fastalpha.AlphaCLLoss, "forward", recording)
    return calls


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flags, message", [
    (["--supervised", "--negatives", "cross"], "--supervised needs --negatives all"),
    (["--supervised", "--negatives", "none", "--queue-size", "16"], "--supervised needs --negatives all"),
    (["--views", "3", "--negatives", "cross"], "--views 3 needs --negatives all"),
    (["--supervised", "--views", "3", "--negatives", "cross"], "--supervised with --views 3 needs --negatives all"),
    (["--views", "1"], "--views must be >= 2"),
    (["--views", "0", "--supervised"], "--views must be >= 2"),
])
def test_bad_positive_flags_exit_2_when_parsed(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "bad", "--epochs", "1", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists(), "refused before the run folder was made"


def test_supervised_needs_labelled_pretraining_images(tmp_path, capsys, monkeypatch):
    real = datasets.load_synthetic

    def unlabelled(*args, **kwargs):  # as STL-10's train+unlabeled
        data = real(*args, **kwargs)
        data.pretrain_labels = None
        return data

    monkeypatch.setattr(datasets, "load_synthetic", unlabelled)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "u", "--supervised", "--epochs", "1")
    assert exit_info.value.code == 2
    assert "--supervised needs labels of the pre-training images" in capsys.readouterr().err
    assert not (tmp_path / "u" / "checkpoint.pt").exists()


def test_a_backend_without_grouped_positives_is_refused_before_training(tmp_path, capsys, monkeypatch):
    class NoGroups:  # a fused backend that computes the two-view SimCLR set only
        status = device_status = staticmethod(lambda *args: (True, "test double"))
        supports = staticmethod(eager_backend.supports)
        alpha_cl_fused = staticmethod(eager_backend.alpha_cl_fused)

    real = dispatch._module
    monkeypatch.setattr(dispatch, "_module", lambda name: NoGroups if name == "cpp" else real(name))
    assert run(tmp_path / "g", "--backend", "cpp", "--supervised", "--epochs", "1") == 2
    err = capsys.readouterr().err
    assert "--backend cpp" in err and "does not support" in err and "labels or more than two views" in err
    assert not (tmp_path / "g" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- labels reach the loss
def test_supervised_passes_the_batch_labels_to_the_loss(tmp_path, monkeypatch):
    """The first step's loss is alpha_cl_loss with the labels of that step's images, drawn here
    from the data order independently of the trainer, and differs from the unlabelled loss."""
    calls = _record_loss_calls(monkeypatch)
    steps = []
    original = trainer_mod.Trainer.train_step
    monkeypatch.setattr(trainer_mod.Trainer, "train_step",
                        lambda self, *a: steps.append(original(self, *a)) or steps[-1])
    batch, seed = 48, 4
    assert run(tmp_path / "s", "--supervised", "--batch", str(batch), "--seed", str(seed), "--epochs", "1",
               "--eval", "knn", "--eval-every", "0") == 0
    data = datasets.load_synthetic()
    order = BatchPlan(len(data.pretrain), batch, seed).epoch_order()
    expected_labels = data.pretrain_labels[order[:batch]]
    z1, z2, labels, loss, kwargs = calls[0]
    assert labels is not None and torch.equal(labels.cpu(), expected_labels)
    kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    labelled = fastalpha.alpha_cl_loss(z1, z2, labels=expected_labels, **kwargs)
    unlabelled = fastalpha.alpha_cl_loss(z1, z2, **kwargs)
    assert steps[0] == pytest.approx(labelled.item(), rel=1e-6, abs=1e-7)
    assert loss.item() == pytest.approx(labelled.item(), rel=1e-6, abs=1e-7)
    assert abs(labelled.item() - unlabelled.item()) > 1e-3, "the labels must change the loss of this batch"
    summary = read_json(tmp_path / "s" / "summary.json")
    assert summary["supervised"] is True and summary["views"] == 2 and summary["config"]["supervised"] is True


def test_self_supervised_run_passes_no_labels(tmp_path, monkeypatch):
    calls = _record_loss_calls(monkeypatch)
    assert run(tmp_path / "u", "--batch", "48", "--epochs", "1", "--eval", "knn", "--eval-every", "0") == 0
    assert calls and all(labels is None and z2 is not None for _, z2, labels, _, _ in calls)
    summary = read_json(tmp_path / "u" / "summary.json")
    assert summary["supervised"] is False and summary["views"] == 2


# ----------------------------------------------------------------------------- V views
def test_three_views_reach_the_loss_and_extend_the_two_view_draws(tmp_path, monkeypatch):
    """V = 3: the loss gets a list of 3 views of the same images; the first two are the views a
    two-view run draws at the same step (the draws are per (seed, epoch, step, view)); every
    epoch draws new views."""
    calls = _record_loss_calls(monkeypatch)
    drawn = record_views(monkeypatch)
    flags = ["--batch", "32", "--seed", "1", "--eval", "knn", "--eval-every", "0"]
    assert run(tmp_path / "v3", *flags, "--views", "3", "--epochs", "2") == 0
    three = list(drawn)
    steps = 96 // 32
    assert len(three) == 2 * steps and all(len(v) == 3 for v in three)
    views, z2, labels, _, _ = calls[0]
    assert isinstance(views, list) and len(views) == 3 and z2 is None and labels is None
    assert all(v.shape == (32, 128) for v in views)
    for step in range(steps):
        for v in range(3):
            assert not torch.equal(three[step][v], three[steps + step][v]), (step, v)
        assert not torch.equal(three[step][2], three[step][1]), "the third view is a new draw"
    drawn.clear()
    assert run(tmp_path / "v2", *flags, "--epochs", "1") == 0
    for step in range(steps):
        assert len(drawn[step]) == 2
        for v in range(2):
            assert torch.equal(drawn[step][v], three[step][v]), (step, v)
    summary = read_json(tmp_path / "v3" / "summary.json")
    assert summary["views"] == 3 and summary["supervised"] is False and summary["status"] == "completed"


def test_supervised_three_views_pass_labels_per_image(tmp_path, monkeypatch):
    calls = _record_loss_calls(monkeypatch)
    assert run(tmp_path / "sv3", "--supervised", "--views", "3", "--batch", "32", "--epochs", "1", "--eval", "knn",
               "--eval-every", "0") == 0
    views, _, labels, loss, kwargs = calls[0]
    assert len(views) == 3 and labels.shape == (32,)
    kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    assert loss.item() == pytest.approx(fastalpha.alpha_cl_loss(views, labels=labels, **kwargs).item(), rel=1e-6)
    assert loss.item() != pytest.approx(fastalpha.alpha_cl_loss(views, **kwargs).item(), rel=1e-3)


def test_supervised_and_self_supervised_on_digits_end_to_end(tmp_path, capsys):
    """A short digits run of each: both finish, record what they were, and print linear and kNN
    accuracy of the trained encoder next to the untrained one."""
    common = ["--dataset", "digits", "--batch", "256", "--epochs", "2", "--threads", "1", "--no-progress",
              "--linear-epochs", "3", "--eval-every", "0", "--seed", "0"]
    for name, flags in (("ssl", []), ("sup", ["--supervised", "--views", "3"])):
        assert cli.main([*common, *flags, "--out", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        label = "supervised, 3 views" if flags else "self-supervised, 2 views"
        assert f"trained (epoch 2), {label}" in out and "untrained (epoch 0)" in out
        summary = read_json(tmp_path / name / "summary.json")
        assert summary["supervised"] is bool(flags) and summary["views"] == (3 if flags else 2)
        assert summary["trained"]["linear"]["final"] is not None and summary["trained"]["knn_top1"] is not None
        assert summary["untrained"]["linear"]["final"] is not None
        assert "positives: " + ("supervised" if flags else "self-supervised") in out
    from train.plots import accuracy_bars, compare_runs

    runs = [str(tmp_path / "ssl"), str(tmp_path / "sup")]
    for png in (compare_runs(runs, str(tmp_path / "cmp.png")), accuracy_bars(runs, str(tmp_path / "bars.png"))):
        assert os.path.getsize(png) > 0


# ----------------------------------------------------------------------------- --check-eager
def test_check_eager_with_labels_and_three_views_passes_exact_and_fails_wrong(tmp_path, monkeypatch, capsys):
    calls = _record_loss_calls(monkeypatch)
    flags = ["--backend", "cpp", "--supervised", "--views", "3", "--batch", "32", "--check-eager", "3"]
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.0, groups=True))
    assert run(tmp_path / "ok", *flags) == 0
    report = read_json(tmp_path / "ok" / "check_eager.json")
    assert report["passed"] and len(report["lockstep"]) == 3
    assert report["max_grad_rel_dev"] < 1e-4 and report["max_loss_rel_dev"] < 1e-4
    # Lockstep and both free runs: every loss saw the 3 views and the batch's labels.
    assert len(calls) == 2 * 3 + 3 + 3
    assert all(isinstance(views, list) and len(views) == 3 and labels is not None and labels.shape == (32,)
               for views, _, labels, _, _ in calls)
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.05, groups=True))
    assert run(tmp_path / "bad", *flags) == 1
    assert "FAILED" in capsys.readouterr().out


def test_check_eager_supervised_on_the_real_backend(tmp_path):
    """`auto` resolves to a backend with group-defined positives (chunked on CPU while cpp has none)."""
    assert run(tmp_path / "auto", "--supervised", "--batch", "32", "--check-eager", "2") == 0
    report = read_json(tmp_path / "auto" / "check_eager.json")
    assert report["passed"] and report["max_loss_rel_dev"] <= 1e-3 and report["max_grad_rel_dev"] <= 1e-3
    assert dispatch.supports(report["backend"], "all", False, True)[0]


# ----------------------------------------------------------------------------- resume
def test_resumed_supervised_three_view_run_equals_the_uninterrupted_run(tmp_path):
    flags = ["--supervised", "--views", "3", "--batch", "32", "--seed", "3", "--eval", "knn"]
    assert run(tmp_path / "full", *flags, "--epochs", "3") == 0
    assert run(tmp_path / "split", *flags, "--epochs", "1") == 0
    assert state(tmp_path / "split")["epochs_done"] == 1
    # No --supervised/--views on the command line: they come from the checkpoint.
    assert cli.main(["--out", str(tmp_path / "split"), "--resume", "--epochs", "3", "--threads", "1", "--no-progress"]) == 0
    config = read_json(tmp_path / "split" / "config.json")
    assert config["supervised"] is True and config["views"] == 3
    assert_same_run(tmp_path / "full", tmp_path / "split")


def test_ctrl_c_mid_epoch_of_a_supervised_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    flags = ["--supervised", "--views", "3", "--batch", "32", "--seed", "6", "--epochs", "2", "--eval", "knn"]
    assert run(tmp_path / "full", *flags) == 0
    original = press_ctrl_c_at(monkeypatch, epoch=2, step=0)
    assert run(tmp_path / "cut", *flags) == 130
    saved = state(tmp_path / "cut")
    assert saved["epochs_done"] == 1 and saved["step_in_epoch"] in (1, 2)
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    assert cli.main(["--resume", str(tmp_path / "cut"), "--threads", "1", "--no-progress"]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")


@pytest.mark.parametrize("first, resume_flags, message", [
    ([], ["--supervised"], "--supervised True (the checkpoint has False)"),
    ([], ["--views", "3"], "--views 3 (the checkpoint has 2)"),
    (["--supervised", "--views", "3"], ["--views", "2"], "--views 2 (the checkpoint has 3)"),
    ([], ["--negatives", "cross"], "--negatives cross (the checkpoint has 'all')"),
    ([], ["--queue-size", "16"], "--queue-size 16 (the checkpoint has 0)"),
])
def test_resume_refuses_a_changed_positive_set(tmp_path, capsys, first, resume_flags, message):
    assert run(tmp_path / "r", *first, "--batch", "48", "--epochs", "1", "--eval", "knn", "--eval-every", "0") == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path / "r"), "--resume", "--epochs", "2", *resume_flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cannot resume with changed settings" in err and message in err


def test_checkpoints_from_before_the_flags_resume_as_self_supervised_two_view_runs(tmp_path):
    assert run(tmp_path / "old", "--batch", "48", "--epochs", "1", "--eval", "knn", "--eval-every", "0") == 0
    path = tmp_path / "old" / "checkpoint.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    del saved["config"]["supervised"], saved["config"]["views"]
    torch.save(saved, path)
    assert cli.main(["--out", str(tmp_path / "old"), "--resume", "--epochs", "2", "--threads", "1", "--no-progress"]) == 0
    config = read_json(tmp_path / "old" / "config.json")
    assert config["supervised"] is False and config["views"] == 2


# ----------------------------------------------------------------------------- --supervised --queue-size
def _fifo(batches, size):
    """The (rows, labels) a FIFO bank of `size` slots holds after `batches` of (rows, labels), in
    fastalpha.Queue's slots: of a batch, its last `size` rows are kept, row r of them in slot
    (count + r) mod size, count = rows kept so far. Written independently of LabelledQueue."""
    rows = torch.zeros(size, batches[0][0].shape[1]) if batches else None
    labels = torch.zeros(size, dtype=torch.long)
    count = 0
    for z, y in batches:
        z, y = z[-size:], y[-size:]
        for r in range(z.shape[0]):
            rows[(count + r) % size], labels[(count + r) % size] = z[r], y[r]
        count += z.shape[0]
    filled = min(count, size)
    return (rows[:filled] if rows is not None else None), labels[:filled]


def test_labelled_queue_keeps_each_label_in_its_rows_slot_and_refuses_bad_labels():
    """Batches of 3, 7 (wraps) and 13 (> size: its last 5 rows) rows against the independent
    FIFO; bad labels raise before anything is written."""
    from train.labelled_queue import LabelledQueue

    gen = torch.Generator().manual_seed(11)
    bank, seen = LabelledQueue(5, 4), []
    for n in (3, 7, 13):
        z, y = torch.randn(n, 4, generator=gen), torch.randint(0, 9, (n,), generator=gen)
        bank.enqueue(z, y)
        seen.append((z, y))
        rows, labels = _fifo(seen, 5)
        assert torch.equal(bank.rows(), rows) and torch.equal(bank.labels(), labels), n
    before = {k: v.clone() for k, v in bank.state_dict().items()}
    for labels, error in ((torch.zeros(2, dtype=torch.long), ValueError), (torch.zeros(3), TypeError),
                          (torch.zeros(3, dtype=torch.bool), TypeError), ([0, 1, 2], TypeError)):
        with pytest.raises(error):
            bank.enqueue(torch.randn(3, 4), labels)
    with pytest.raises(ValueError):
        bank.enqueue(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    assert all(torch.equal(v, before[k]) for k, v in bank.state_dict().items()), "a refused enqueue wrote"
    copy = LabelledQueue(5, 4)
    copy.load_state_dict(bank.state_dict())
    assert torch.equal(copy.rows(), bank.rows()) and torch.equal(copy.labels(), bank.labels())


@pytest.mark.parametrize("views", [2, 3])
def test_supervised_queue_holds_the_earlier_second_views_with_their_labels(tmp_path, monkeypatch, views):
    """Each step's loss gets the bank of the earlier steps' second views (detached) with their
    images' labels, in FIFO slots, and is alpha_cl_loss of the views, labels, bank and bank labels;
    relabelling the bank changes it."""
    banks = []
    calls = _record_loss_calls(monkeypatch, banks)
    assert run(tmp_path / "sq", "--supervised", "--views", str(views), "--queue-size", "40", "--batch", "16",
               "--epochs", "1", "--eval", "knn", "--eval-every", "0") == 0
    assert len(calls) == 96 // 16
    seen = []
    for k, ((zs, z2, labels, loss, kwargs), (queue, queue_labels)) in enumerate(zip(calls, banks)):
        zs = [zs, z2] if z2 is not None else zs
        assert len(zs) == views and labels.shape == (16,)
        rows, expected_labels = _fifo(seen, 40)
        assert queue.shape == (min(16 * k, 40), 128) and torch.equal(queue_labels, expected_labels), k
        if k:
            assert torch.equal(queue, rows), f"step {k}: the bank is not the earlier second views"
        kwargs = {key: v for key, v in kwargs.items() if key != "backend"}
        expected = fastalpha.alpha_cl_loss(zs, labels=labels, queue=queue, queue_labels=queue_labels, **kwargs)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7), k
        if k >= 2:
            other = fastalpha.alpha_cl_loss(zs, labels=labels, queue=queue, queue_labels=(queue_labels + 1) % 4, **kwargs)
            assert abs(other.item() - loss.item()) > 1e-4, f"step {k}: the bank's labels must matter"
        seen.append((zs[1], labels))
    saved = state(tmp_path / "sq")["queue"]
    rows, expected_labels = _fifo(seen, 40)
    assert torch.equal(saved["bank"], rows) and torch.equal(saved["label_bank"], expected_labels)
    assert int(saved["count"]) == 96
    summary = read_json(tmp_path / "sq" / "summary.json")
    assert summary["config"]["queue_size"] == 40 and summary["config"]["supervised"] is True


def test_ctrl_c_mid_epoch_of_a_supervised_queue_run_on_digits_resumes_bit_for_bit(tmp_path, monkeypatch):
    """--supervised --queue-size 24 --views 3 on 64 digits images (4 steps an epoch): Ctrl-C in
    epoch 2, when the bank has wrapped around, then --resume; weights, optimizer, bank rows, bank
    labels and metrics equal the uninterrupted run's bit for bit."""
    flags = ["--dataset", "digits", "--pretrain-images", "64", "--probe-images", "64", "--supervised", "--views", "3",
             "--queue-size", "24", "--batch", "16", "--seed", "5", "--epochs", "2", "--eval", "knn"]
    assert run(tmp_path / "full", *flags) == 0
    original = press_ctrl_c_at(monkeypatch, epoch=2, step=0)
    assert run(tmp_path / "cut", *flags) == 130
    cut = state(tmp_path / "cut")
    assert cut["epochs_done"] == 1 and cut["step_in_epoch"] in (1, 2)
    assert int(cut["queue"]["count"]) > 24, "the interrupted bank has wrapped around"
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    assert cli.main(["--resume", str(tmp_path / "cut"), "--threads", "1", "--no-progress"]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")
    a, b = state(tmp_path / "full")["queue"], state(tmp_path / "cut")["queue"]
    assert set(a) == {"bank", "count", "label_bank"}
    for key in a:
        assert torch.equal(a[key], b[key]), f"the bank's {key} differs"


def test_check_eager_compares_with_the_labelled_bank(tmp_path, monkeypatch):
    """Both trajectories fill the labelled bank; the exact fake passes, the wrong one fails."""
    banks = []
    _record_loss_calls(monkeypatch, banks)
    flags = ["--backend", "cpp", "--supervised", "--queue-size", "40", "--batch", "16", "--check-eager", "3"]
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.0, groups=True, grouped_queue=True))
    assert run(tmp_path / "ok", *flags) == 0
    assert read_json(tmp_path / "ok" / "check_eager.json")["passed"]
    lockstep = banks[:6]  # fused then eager at each of the 3 steps
    assert [q.shape[0] for q, _ in lockstep] == [0, 0, 16, 16, 32, 32]
    assert all(q_labels is not None and q_labels.shape == (q.shape[0],) for q, q_labels in banks)
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.05, groups=True, grouped_queue=True))
    assert run(tmp_path / "bad", *flags) == 1


def test_three_unlabelled_views_with_a_queue_take_the_bank_as_negatives(tmp_path, monkeypatch):
    banks = []
    calls = _record_loss_calls(monkeypatch, banks)
    assert run(tmp_path / "vq", "--views", "3", "--queue-size", "24", "--batch", "16", "--epochs", "1", "--eval", "knn",
               "--eval-every", "0") == 0
    assert [q.shape[0] for q, _ in banks] == [0, 16, 24, 24, 24, 24]
    assert all(q_labels is None for _, q_labels in banks)
    views, _, labels, loss, kwargs = calls[3]
    kwargs = {k: v for k, v in kwargs.items() if k != "backend"}
    assert labels is None
    assert loss.item() == pytest.approx(fastalpha.alpha_cl_loss(views, queue=banks[3][0], **kwargs).item(), rel=1e-5)
    assert loss.item() != pytest.approx(fastalpha.alpha_cl_loss(views, **kwargs).item(), rel=1e-4)


# ----------------------------------------------------------------------------- resume and loss parameters
@pytest.mark.parametrize("first, again", [
    (["--loss", "nce", "--temperature", "0.2", "--eps", "0.5"], ["--temperature", "0.2"]),
    (["--loss", "nce", "--temperature", "0.2", "--eps", "0.5"], ["--eps", "0.5"]),
    (["--temperature", "0.2", "--negatives", "cross"], ["--temperature", "0.2"]),
    (["--supervised", "--queue-size", "32", "--temperature", "0.2"], ["--temperature", "0.2", "--supervised"]),
    (["--loss", "inverse", "--gamma", "3"], ["--gamma", "3"]),
    (["--loss", "entropy"], ["--eps", "0"]),  # the rule's default, which the preset leaves out
    (["--loss", "nce", "--negatives", "none", "--queue-size", "32"], ["--negatives", "none"]),
])
def test_resume_repeating_the_runs_loss_parameters_is_no_conflict(tmp_path, first, again):
    """Flags not given on --resume come from the checkpoint: repeating some of the original loss
    parameters (the others, the loss and the negatives left out) resumes the same run."""
    flags = ["--batch", "48", "--eval", "knn", "--eval-every", "0", *first]
    assert run(tmp_path / "r", *flags, "--epochs", "1") == 0
    saved = read_json(tmp_path / "r" / "config.json")["loss_kwargs"]
    assert cli.main(["--out", str(tmp_path / "r"), "--resume", "--epochs", "2", "--threads", "1", "--no-progress",
                     *again]) == 0
    resumed = read_json(tmp_path / "r" / "config.json")
    assert resumed["loss_kwargs"] == saved and resumed["epochs"] == 2
    assert state(tmp_path / "r")["epochs_done"] == 2


@pytest.mark.parametrize("first, again, message", [
    (["--loss", "nce", "--temperature", "0.2"], ["--temperature", "0.3"], "--temperature 0.3"),
    (["--loss", "nce", "--temperature", "0.2", "--eps", "0.5"], ["--temperature", "0.2", "--eps", "0"], "--eps 0.0"),
    (["--loss", "inverse", "--gamma", "3"], ["--gamma", "2"], "--gamma 2.0"),
    (["--loss", "inverse"], ["--p", "2"], "--p has no effect on --loss inverse"),
])
def test_resume_refuses_changed_loss_parameters(tmp_path, capsys, first, again, message):
    assert run(tmp_path / "r", "--batch", "48", "--epochs", "1", "--eval", "knn", "--eval-every", "0", *first) == 0
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--out", str(tmp_path / "r"), "--resume", "--epochs", "2", *again])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err

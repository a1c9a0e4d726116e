"""Tests of the training harness (train/): CPU only, small, in-process (`train.cli.main(argv)`),
except the digits quick start and the torchrun run, processes started beside the suite.

What is checked, and against what:
* augmentation against torchvision's own functional ops (an independent implementation);
* every Table-1 loss trains end to end (2 steps) and moves the weights;
* a resumed run (after an epoch boundary and after a mid-epoch Ctrl-C) equals the
  uninterrupted run bit for bit: metrics, weights and optimizer state; every epoch draws new
  views of the same images, and a resumed epoch draws those of the uninterrupted run;
* the `authors` lr schedule against torch's CosineAnnealingLR driven as the authors' code does;
* --check-eager passes for an exact backend and fails (exit 1) for one whose gradient is 5% off;
* bad flags give exit status 2 with a message naming the flag;
* a non-finite loss stops the run with exit 3 and keeps the last good checkpoint;
* the digits quick start beats the untrained encoder by a clear margin.
"""
import gzip
import math
import os
import struct
import subprocess
import sys

import pytest
import torch

import background
from train_helpers import (REPO, SYNTHETIC, assert_same_run, fake_backend, metrics, press_ctrl_c_at,  # noqa: F401
                           read_json, record_views, restore_threads, run_in_process, state)

import fastalpha
from fastalpha import dispatch
from train import augment, cli, data as datasets, evaluate, trainer as trainer_mod
from train.batches import BatchPlan

SMALL = [*SYNTHETIC, "--linear-epochs", "3"]


def run(out, *flags) -> int:
    return run_in_process(SMALL, out, *flags)


# ----------------------------------------------------------------------------- augmentation
def _spec(channels=3, size=12, **kw):
    return augment.AugmentSpec(size=size, channels=channels, mean=(0.0,) * channels, std=(1.0,) * channels, **kw)


def _params(spec, n, gen, **overrides):
    params = augment.sample_params(spec, n, gen)
    ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    off = torch.zeros(n, dtype=torch.bool)
    params.update(w=ones, h=ones, x0=zeros, y0=zeros, flip=off, jitter=off.clone(), gray=off.clone(), blur=off.clone())
    params.update(overrides)
    return params


def test_full_crop_is_identity_and_flip_mirrors(gen):
    x = torch.rand(5, 3, 12, 12, generator=gen)
    spec = _spec()
    p = _params(spec, 5, gen)
    torch.testing.assert_close(augment.apply(x, p, spec), x, atol=2e-6, rtol=0)
    p["flip"] = torch.tensor([True, False, True, False, True])
    expected = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    torch.testing.assert_close(augment.apply(x, p, spec), expected, atol=2e-6, rtol=0)


def test_crop_matches_torchvision_resized_crop_inside_the_crop(gen):
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(4, 3, 12, 12, generator=gen)
    spec = _spec()
    half = torch.full((4,), 0.5, dtype=torch.float64)
    p = _params(spec, 4, gen, w=half, h=half, x0=torch.full((4,), 0.25, dtype=torch.float64), y0=half)
    ours = augment.apply(x, p, spec)
    ref = TF.resized_crop(x, top=6, left=3, height=6, width=6, size=[12, 12], antialias=False)
    # The outermost output pixels differ by design: we interpolate with the real neighbours
    # outside the crop where torchvision replicates the crop's edge.
    torch.testing.assert_close(ours[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=2e-6, rtol=0)


def test_color_jitter_and_grayscale_match_torchvision(gen):
    import torchvision.transforms.v2.functional as TF

    n = 8
    x = torch.rand(n, 3, 10, 10, generator=gen)
    spec = _spec(size=10, jitter=(0.4, 0.4, 0.4, 0.1))
    on = torch.ones(n, dtype=torch.bool)
    p = _params(spec, n, gen, jitter=on)
    ours = augment.apply(x, p, spec)
    ops = {0: ("brightness", TF.adjust_brightness), 1: ("contrast", TF.adjust_contrast),
           2: ("saturation", TF.adjust_saturation), 3: ("hue", TF.adjust_hue)}
    for i in range(n):
        ref = x[i]
        for op in p["order"][i].tolist():
            name, fn = ops[op]
            ref = fn(ref, float(p[name][i]))
        torch.testing.assert_close(ours[i], ref, atol=2e-4, rtol=0, msg=f"image {i}, order {p['order'][i].tolist()}")
    p = _params(spec, n, gen, gray=on)
    gray = augment.apply(x, p, spec)
    for i in range(n):
        torch.testing.assert_close(gray[i], TF.rgb_to_grayscale(x[i], num_output_channels=3), atol=2e-4, rtol=0)


def test_views_of_a_rank_slice_equal_the_slice_of_the_global_views(gen):
    images = (torch.rand(12, 3, 16, 16, generator=gen) * 255).to(torch.uint8)
    spec = _spec(size=16, blur_p=0.5, blur_kernel=5)
    full = augment.two_views(images, spec, augment.step_generator(3, 2, 1), 12, 0)
    part = augment.two_views(images[4:8], spec, augment.step_generator(3, 2, 1), 12, 4)
    for whole, piece in zip(full, part):
        torch.testing.assert_close(piece, whole[4:8], atol=0, rtol=0)
    other = augment.two_views(images, spec, augment.step_generator(3, 2, 2), 12, 0)
    assert not torch.equal(other[0], full[0]), "a different step must draw different augmentations"


def test_batch_plan_ranks_tile_the_global_batch():
    single = BatchPlan(50, 12, seed=7)
    ranks = [BatchPlan(50, 12, seed=7, world_size=3, rank=r) for r in range(3)]
    order = single.epoch_order()
    orders = [plan.epoch_order() for plan in ranks]
    for step in range(single.steps_per_epoch):
        whole, _ = single.local_indices(order, step)
        pieces = [plan.local_indices(o, step) for plan, o in zip(ranks, orders)]
        assert torch.equal(torch.cat([idx for idx, _ in pieces]), whole)
        assert [offset for _, offset in pieces] == [0, 4, 8]
    assert single.steps_per_epoch == 4
    with pytest.raises(ValueError, match="divisible"):
        BatchPlan(50, 12, seed=0, world_size=5)
    with pytest.raises(ValueError, match="larger than the dataset"):
        BatchPlan(10, 12, seed=0)


# ----------------------------------------------------------------------------- data
def test_read_idx_round_trip_and_bad_magic(tmp_path, gen):
    images = (torch.rand(3, 4, 5, generator=gen) * 255).to(torch.uint8).numpy()
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">III", 3, 4, 5) + images.tobytes())
    assert (datasets.read_idx(str(path)) == images).all()
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([0, 0, 9, 1]) + struct.pack(">I", 2) + b"ab")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        datasets.read_idx(str(bad))


def test_auto_falls_back_to_digits_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", str(tmp_path / "nothing"))
    monkeypatch.setattr(datasets, "reachable", lambda url, timeout=4.0: False)
    data = datasets.load("auto", str(tmp_path), download=True)
    assert data.name == "digits"
    text = " ".join(data.notes)
    assert "CIFAR-10 not used" in text and "not reachable" in text and "Fashion-MNIST not used" in text
    assert data.train.shape[1:] == (1, 8, 8) and len(data.train) + len(data.test) == 1797


def test_auto_prefers_fashion_mnist_files(tmp_path, monkeypatch, gen):
    folder = tmp_path / "fm"
    folder.mkdir()
    for stem, shape in (("train-images-idx3-ubyte", (6, 28, 28)), ("t10k-images-idx3-ubyte", (4, 28, 28)),
                        ("train-labels-idx1-ubyte", (6,)), ("t10k-labels-idx1-ubyte", (4,))):
        payload = (torch.rand(shape, generator=gen) * 9).to(torch.uint8).numpy().tobytes()
        header = bytes([0, 0, 8, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape)
        with gzip.open(folder / (stem + ".gz"), "wb") as f:
            f.write(header + payload)
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", str(folder))
    data = datasets.load("auto", str(tmp_path / "empty"))
    assert data.name == "fashion-mnist" and data.train.shape == (6, 1, 28, 28) and data.test.shape == (4, 1, 28, 28)
    assert any("fell back to Fashion-MNIST" in note for note in data.notes)


def test_explicit_missing_dataset_is_an_error_that_says_how(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_SYSTEM_DIR", str(tmp_path / "nothing"))
    assert cli.main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--download" in capsys.readouterr().err
    assert cli.main(["--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def _fake_cifar10(root, gen, n_train=10, n_test=6):
    """torchvision's CIFAR-10 layout: pickled batches of (n, 3072) uint8 rows, channel-major."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    raw = {}
    for name, n in [(f"data_batch_{i}", n_train // 5) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = (torch.rand(n, 3072, generator=gen) * 255).to(torch.uint8).numpy()
        labels = torch.randint(0, 10, (n,), generator=gen).tolist()
        raw[name] = (rows, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    return raw


def _trust_files(monkeypatch):
    import torchvision.datasets.cifar
    import torchvision.datasets.stl10

    # The fake files cannot have the real MD5 sums; accept any existing file instead.
    for module in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(module, "check_integrity", lambda path, md5=None: os.path.isfile(path))


def test_cifar10_files_become_nchw_tensors(tmp_path, monkeypatch, gen):
    import numpy as np

    _trust_files(monkeypatch)
    raw = _fake_cifar10(tmp_path, gen)
    data = datasets.load("cifar10", str(tmp_path))
    expected = np.concatenate([raw[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert data.train.dtype == torch.uint8 and (data.train.numpy() == expected).all()
    assert data.test_labels.tolist() == raw["test_batch"][1] and data.num_classes == 10


def test_stl10_pretrains_on_train_plus_unlabeled(tmp_path, monkeypatch, gen):
    _trust_files(monkeypatch)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = {}
    for name, n in (("train", 3), ("unlabeled", 4), ("test", 2)):
        # STL-10 stores each image column-major: (3, 96 columns, 96 rows).
        stored = (torch.rand(n, 3, 96, 96, generator=gen) * 255).to(torch.uint8)
        (folder / f"{name}_X.bin").write_bytes(stored.numpy().tobytes())
        images[name] = stored.transpose(2, 3)
    (folder / "train_y.bin").write_bytes(bytes([1, 2, 10]))
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    data = datasets.load("stl10", str(tmp_path))
    assert torch.equal(data.pretrain, torch.cat([images["train"], images["unlabeled"]]))
    assert torch.equal(data.train, images["train"]) and torch.equal(data.test, images["test"])
    assert data.train_labels.tolist() == [0, 1, 9] and data.test_labels.tolist() == [2, 3]


def test_auto_uses_cifar10_when_present_with_the_paper_recipe(tmp_path, monkeypatch, gen):
    _trust_files(monkeypatch)
    _fake_cifar10(tmp_path / "data", gen)
    out = tmp_path / "run"
    assert cli.main(["--data-root", str(tmp_path / "data"), "--batch", "4", "--epochs", "1", "--eval-every", "0",
                     "--linear-epochs", "2", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    config = read_json(out / "config.json")
    assert (config["dataset"], config["recipe"], config["arch"], config["optimizer"], config["lr"], config["wd"]) == \
        ("cifar10", "paper", "resnet18", "adam", 0.01, 0.0)
    model = state(out)["model"]
    assert model["encoder.conv1.weight"].shape == (64, 3, 3, 3), "CIFAR stem: 3x3 stride-1 first convolution"
    assert model["projector.0.weight"].shape == (512, 512) and model["projector.3.weight"].shape == (128, 512)
    assert read_json(out / "summary.json")["trained"]["linear"]["final"] is not None


def test_augmentation_keeps_tensors_on_the_images_device():
    # The meta device stands in for a GPU: any CPU tensor mixed into the batch ops raises.
    spec = _spec(size=16, blur_p=0.5, blur_kernel=5)
    images = torch.zeros(8, 3, 20, 20, dtype=torch.uint8, device="meta")
    for view in augment.two_views(images, spec, augment.step_generator(0, 0, 0), 8, 0):
        assert view.device.type == "meta" and view.shape == (8, 3, 16, 16)
    assert augment.plain(images, spec).shape == (8, 3, 16, 16)


# ----------------------------------------------------------------------------- probes
def test_knn_matches_a_direct_vote(gen):
    train_f, test_f = torch.randn(40, 6, generator=gen), torch.randn(9, 6, generator=gen)
    train_y, test_y = torch.randint(0, 3, (40,), generator=gen), torch.randint(0, 3, (9,), generator=gen)
    k, t = 7, 0.1
    correct = 0
    for q, label in zip(test_f, test_y):
        sims = [float(torch.dot(q, f) / (q.norm() * f.norm())) for f in train_f]
        nearest = sorted(range(40), key=lambda j: -sims[j])[:k]
        votes = [0.0] * 3
        for j in nearest:
            votes[int(train_y[j])] += math.exp(sims[j] / t)
        correct += int(max(range(3), key=votes.__getitem__) == int(label))
    assert evaluate.knn_accuracy(train_f, train_y, test_f, test_y, 3, k=k, temperature=t, chunk=4) == pytest.approx(100 * correct / 9)


def test_linear_probe_learns_separable_features_and_reports_final_and_best(gen):
    centers = 5.0 * torch.eye(3, 5)  # 7 noise standard deviations apart: nearly separable
    y_train, y_test = torch.randint(0, 3, (8000,), generator=gen), torch.randint(0, 3, (90,), generator=gen)
    x_train = centers[y_train] + torch.randn(8000, 5, generator=gen)
    x_test = centers[y_test] + torch.randn(90, 5, generator=gen)
    # lr 3e-4 (the protocol) needs a few thousand steps to overturn an unlucky initialisation.
    result = evaluate.linear_probe(x_train, y_train, x_test, y_test, 3, torch.device("cpu"), epochs=12, batch=32)
    assert len(result.curve) == 12 and result.final == result.curve[-1]
    assert result.best == max(result.curve) == result.curve[result.best_epoch - 1]
    assert result.final > 90.0


# ----------------------------------------------------------------------------- runs
@pytest.mark.parametrize("loss", sorted(fastalpha.PAPER_LOSSES))
def test_every_table1_loss_trains_two_steps(tmp_path, loss):
    out = tmp_path / loss
    assert run(out, "--loss", loss, "--batch", "48", "--epochs", "1", "--eval", "knn") == 0
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[1]["steps"] == "2"
    assert math.isfinite(float(rows[1]["loss"]))
    summary = read_json(out / "summary.json")
    assert summary["status"] == "completed" and summary["trained"]["knn_top1"] is not None
    config = read_json(out / "config.json")
    preset = fastalpha.PAPER_LOSSES[loss]
    assert config["loss_kwargs"]["rule"] == preset["rule"]
    assert config["loss_kwargs"]["detach_alpha"] == preset.get("detach_alpha", True)
    for name in ("temperature", "p", "gamma", "eps"):
        if name in preset:
            assert config["loss_kwargs"][name] == preset[name]
    torch.manual_seed(0)  # the run's seed: the same initial weights
    from train.models import ContrastiveModel

    initial = ContrastiveModel(config["arch"], 3, 16).state_dict()
    trained = state(out)["model"]
    moved = [k for k in initial if initial[k].is_floating_point() and not torch.equal(initial[k], trained[k])]
    assert "encoder.0.weight" in moved, "two optimizer steps must change the first convolution"
    for name in ("loss.png", "accuracy.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0


def test_resume_after_an_epoch_equals_the_uninterrupted_run(tmp_path):
    flags = ["--batch", "32", "--seed", "3"]
    assert run(tmp_path / "full", *flags, "--epochs", "3") == 0
    assert run(tmp_path / "split", *flags, "--epochs", "1") == 0
    assert state(tmp_path / "split")["epochs_done"] == 1
    assert cli.main(["--out", str(tmp_path / "split"), "--resume", "--epochs", "3", "--threads", "1", "--no-progress"]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "split")


def test_ctrl_c_mid_epoch_checkpoints_and_resume_is_bit_for_bit(tmp_path, monkeypatch):
    flags = ["--batch", "32", "--seed", "5", "--epochs", "2"]
    assert run(tmp_path / "full", *flags) == 0
    original = press_ctrl_c_at(monkeypatch, epoch=2, step=0)
    assert run(tmp_path / "cut", *flags) == 130
    saved = state(tmp_path / "cut")
    # The flag is read by the step that follows the signal (or the one after): a mid-epoch stop.
    assert saved["epochs_done"] == 1 and saved["step_in_epoch"] in (1, 2), "stop at a step boundary after Ctrl-C"
    assert read_json(tmp_path / "cut" / "summary.json")["status"] == "interrupted"
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    assert cli.main(["--resume", str(tmp_path / "cut"), "--threads", "1", "--no-progress"]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "cut")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = fastalpha.AlphaCLLoss.forward

    def nan_on_fifth_step(self, z1, z2, *args, **kwargs):
        calls["n"] += 1
        loss = forward(self, z1, z2, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(fastalpha.AlphaCLLoss, "forward", nan_on_fifth_step)
    out = tmp_path / "nan"
    assert run(out, "--batch", "32", "--epochs", "3") == 3  # 3 steps per epoch: step 5 is in epoch 2
    assert "non-finite loss" in capsys.readouterr().err
    saved = state(out)
    assert saved["epochs_done"] == 1 and saved["step_in_epoch"] == 0
    assert read_json(out / "summary.json")["status"].startswith("stopped: non-finite loss")


def test_check_eager_passes_for_an_exact_backend_and_fails_for_a_wrong_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.0))
    assert run(tmp_path / "ok", "--backend", "cpp", "--batch", "32", "--check-eager", "4") == 0
    report = read_json(tmp_path / "ok" / "check_eager.json")
    assert report["passed"] and len(report["lockstep"]) == 4 and len(report["free_run"]["losses_fused"]) == 4
    assert report["max_grad_rel_dev"] < 1e-4 and report["max_loss_rel_dev"] < 1e-4  # rounding level
    monkeypatch.setattr(dispatch, "_module", fake_backend(0.05))
    assert run(tmp_path / "bad", "--backend", "cpp", "--batch", "32", "--check-eager", "4") == 1
    assert "FAILED" in capsys.readouterr().out
    assert not read_json(tmp_path / "bad" / "check_eager.json")["passed"]


def test_check_eager_with_the_automatic_backend(tmp_path):
    """With the real backend `auto` resolves to (cpp when built, else eager itself)."""
    assert run(tmp_path / "auto", "--batch", "32", "--check-eager", "3") == 0
    report = read_json(tmp_path / "auto" / "check_eager.json")
    assert report["backend"] == dispatch.resolve_backend("auto", torch.device("cpu"))
    assert report["passed"] and report["max_loss_rel_dev"] <= 1e-3 and report["max_grad_rel_dev"] <= 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--loss", "nope"], "invalid choice"),
    (["--loss", "nce", "--p", "3"], "--p has no effect on --loss nce"),
    (["--loss", "direct", "--gamma", "2"], "--gamma has no effect on --loss direct"),
    (["--temperature", "-1"], "temperature"),
    (["--p", "0"], "p must be finite and > 0"),
    (["--batch", "1"], "--batch must be >= 2"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--epochs", "ten"], "expected 'auto' or an integer"),
    (["--lr", "-0.1"], "--lr must be > 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--resume"], "--resume without a PATH needs --out"),
    (["--dataset", "synthetic", "--batch", "500"], "larger than the dataset"),
])
def test_bad_flags_exit_2_with_a_clear_message(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*flags, "--out", str(tmp_path / "x"), "--no-progress"] if "--resume" not in flags else flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_existing_run_folder_needs_resume_and_resume_rejects_changed_maths(tmp_path, capsys):
    assert run(tmp_path / "r", "--batch", "48", "--epochs", "1", "--eval", "knn") == 0
    with pytest.raises(SystemExit):
        run(tmp_path / "r", "--batch", "48", "--epochs", "1")
    assert "already holds a run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--out", str(tmp_path / "r"), "--resume", "--lr", "0.5"])
    assert "cannot resume with changed settings: --lr 0.5" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings} has no help"


DIGITS_TEST = "test_digits_quick_start_beats_the_untrained_encoder"
DIGITS_RUN = ["--dataset", "digits", "--loss", "direct", "--batch", "256", "--lr", "0.003", "--epochs", "12",
              "--eval-every", "0", "--seed", "0", "--threads", "1", "--no-progress"]


def _digits_run(out):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train", "run.py"), *DIGITS_RUN, "--out", str(out)],
                          capture_output=True, text=True, env=background.environment(), timeout=600)
    return out, proc


@pytest.mark.background
def test_digits_quick_start_beats_the_untrained_encoder(tmp_path):
    # Seeded small config; over seeds 0-2 it gained +2.8 to +4.5 linear and +8.1 to +11.1 kNN
    # points (seed 0: +4.45 and +8.06, README.md, "Training"); the margins leave room for rounding
    # differences across machines.
    out, proc = background.result(DIGITS_TEST, _digits_run, tmp_path / "digits")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_json(out / "summary.json")
    before, after = summary["untrained"], summary["trained"]
    assert after["linear"]["final"] >= before["linear"]["final"] + 2.0, (before, after)
    assert after["knn_top1"] >= before["knn_top1"] + 4.0, (before, after)
    assert summary["reported"]["linear_top1_final"] == after["linear"]["final"]


TORCHRUN_TEST = "test_torchrun_two_processes_with_global_negatives"
TORCHRUN_SUPERVISED_TEST = "test_torchrun_two_processes_supervised_three_views_and_a_labelled_bank"
TORCHRUN_SUPERVISED = ["--supervised", "--views", "3", "--queue-size", "48"]


def start_in_background(tmp_path_factory, items) -> None:
    """Start the digits run and the torchrun run beside the other tests (tests/background.py)."""
    selected = {item.name for item in items}
    if DIGITS_TEST in selected:
        background.start(DIGITS_TEST, _digits_run, tmp_path_factory.mktemp("digits") / "digits")
    if TORCHRUN_TEST in selected:
        background.start(TORCHRUN_TEST, _torchrun_two_processes, tmp_path_factory.mktemp("torchrun") / "ddp")
    if TORCHRUN_SUPERVISED_TEST in selected:
        background.start(TORCHRUN_SUPERVISED_TEST, _torchrun_two_processes, tmp_path_factory.mktemp("torchrun") / "ddp",
                         TORCHRUN_SUPERVISED)


def _torchrun_two_processes(out, flags=()):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "train", "run.py"), *SMALL, "--batch", "32", "--epochs", "1", *flags,
                           "--out", str(out)], capture_output=True, text=True,
                          env=dict(background.environment(), OMP_NUM_THREADS="1"), timeout=600)
    return out, proc


@pytest.mark.slow
@pytest.mark.background
def test_torchrun_two_processes_with_global_negatives(tmp_path):
    out, proc = background.result(TORCHRUN_TEST, _torchrun_two_processes, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("DATASET:") == 1, "only rank 0 prints"
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert math.isfinite(summary["final_epoch_loss"])


@pytest.mark.slow
@pytest.mark.background
def test_torchrun_two_processes_supervised_three_views_and_a_labelled_bank(tmp_path):
    """--supervised --views 3 --queue-size under torchrun: the loss gathers rows and labels
    across the ranks (the library's equality with one process is tests/test_distributed.py's);
    here the harness runs it to the end, and the checkpoint's bank holds the global batches'
    rows with their labels."""
    out, proc = background.result(TORCHRUN_SUPERVISED_TEST, _torchrun_two_processes, tmp_path / "ddp",
                                  TORCHRUN_SUPERVISED)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["supervised"] is True and summary["views"] == 3
    assert math.isfinite(summary["final_epoch_loss"])
    bank = torch.load(out / "checkpoint.pt", weights_only=False)["queue"]
    assert int(bank["count"]) >= 48 and bank["bank"].shape[0] == 48 and bank["bank"].norm(dim=1).min() > 0
    assert bank["label_bank"].shape == (48,) and len(bank["label_bank"].unique()) > 1


# ----------------------------------------------------------------------------- views per epoch
def test_each_epoch_draws_new_views_of_the_same_images(tmp_path, monkeypatch):
    """All pre-training images are one image, so the data order cannot make the views differ:
    only the augmentation can. Epoch 2's views must not repeat epoch 1's."""
    real_load = datasets.load_synthetic

    def one_image(*args, **kwargs):
        data = real_load(*args, **kwargs)
        data.pretrain = data.pretrain[:1].expand_as(data.pretrain).clone()
        return data

    monkeypatch.setattr(datasets, "load_synthetic", one_image)
    calls = record_views(monkeypatch)
    assert run(tmp_path / "run", "--batch", "32", "--epochs", "2", "--eval", "knn", "--eval-every", "0") == 0
    steps = 96 // 32
    assert len(calls) == 2 * steps
    for step in range(steps):
        first, second = calls[step], calls[steps + step]
        assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1]), step


def test_resumed_run_draws_the_views_of_the_uninterrupted_run(tmp_path, monkeypatch):
    calls = record_views(monkeypatch)
    flags = ("--batch", "32", "--eval", "knn", "--eval-every", "0", "--seed", "3")
    assert run(tmp_path / "straight", *flags, "--epochs", "2") == 0
    straight = list(calls)
    calls.clear()
    assert run(tmp_path / "split", *flags, "--epochs", "1") == 0
    calls.clear()
    assert cli.main(["--out", str(tmp_path / "split"), "--resume", "--epochs", "2", "--threads", "1", "--no-progress"]) == 0
    steps = 96 // 32
    assert len(straight) == 2 * steps and len(calls) == steps
    for step in range(steps):  # epoch 2 of the resumed run = epoch 2 of the uninterrupted run
        assert torch.equal(calls[step][0], straight[steps + step][0])
        assert torch.equal(calls[step][1], straight[steps + step][1])


# ----------------------------------------------------------------------------- flags and recipes
def test_workers_is_a_deprecated_alias_of_threads(tmp_path, capsys):
    with pytest.warns(FutureWarning, match="--workers is deprecated"):
        assert cli.main(["--dataset", "synthetic", "--workers", "1", "--no-progress", "--linear-epochs", "1",
                         "--eval", "knn", "--out", str(tmp_path / "w")]) == 0
    assert read_json(tmp_path / "w" / "config.json")["threads"] == 1
    assert torch.get_num_threads() == 1
    with pytest.raises(SystemExit) as exit_, pytest.warns(FutureWarning):
        cli.main(["--dataset", "synthetic", "--workers", "1", "--threads", "2", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "contradicts --threads" in capsys.readouterr().err


def test_authors_schedule_is_torchs_cosine_annealing_stepped_per_epoch_after_epoch_10():
    """Against torch's own CosineAnnealingLR driven as the authors' trainer drives it: T_max = the
    steps of one epoch, scheduler.step() once per epoch from the end of epoch 10 (0-based) on."""
    from types import SimpleNamespace

    steps_per_epoch, epochs, lr = 7, 40, 0.01
    cfg = SimpleNamespace(schedule="authors", lr=lr)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_per_epoch, eta_min=0)
    for epoch in range(epochs):
        expected = opt.param_groups[0]["lr"]
        for step in range(steps_per_epoch):
            got = trainer_mod.learning_rate(cfg, epoch * steps_per_epoch + step, epochs * steps_per_epoch, steps_per_epoch)
            assert math.isclose(got, expected, rel_tol=1e-9, abs_tol=1e-15), (epoch, step, got, expected)
        opt.step()  # no gradient: a no-op, but the order torch expects before scheduler.step()
        if epoch >= 10:
            sched.step()
    assert trainer_mod.learning_rate(cfg, 0, 1, steps_per_epoch) == lr


def test_paper_recipe_uses_lr_0_001_for_resnet50_and_0_01_for_resnet18():
    from train import recipes

    assert recipes.choose("paper", "cifar10", "resnet50").lr == 0.001
    assert recipes.choose("auto", "cifar100", "resnet50").lr == 0.001
    assert recipes.choose("paper", "cifar10", "resnet18").lr == 0.01
    assert recipes.choose("paper", "stl10").lr == 0.01


def test_pretrain_and_probe_subsets_are_one_fixed_draw(gen):
    data = datasets.load_synthetic()
    a = datasets.subset(data, 50, 40)
    b = datasets.subset(data, 50, 40)
    assert a.pretrain.shape[0] == 50 and a.train.shape[0] == 40 and a.test.shape[0] == data.test.shape[0]
    assert torch.equal(a.pretrain, b.pretrain) and torch.equal(a.train_labels, b.train_labels)
    # Drawn, not the first N: the subset is spread over the whole set.
    assert not torch.equal(a.pretrain, data.pretrain[:50])
    same = datasets.subset(data, 0, 0)
    assert torch.equal(same.pretrain, data.pretrain) and torch.equal(same.train, data.train)

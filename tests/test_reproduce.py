"""train/reproduce.py: the paper's grids as run lists, resumable run folders, and the aggregation.

CPU only and small: the runs are synthetic-data runs of a few steps, in-process."""
import json
import math
import os
import statistics
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from train import grid, grid_report, paper_results, reproduce  # noqa: E402
from train.records import read_metrics  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _dry(capsys, *argv):
    assert reproduce.main([*argv, "--dry-run"]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if "train/run.py" in line]


def test_table1_dry_run_lists_the_papers_grid(tmp_path, capsys):
    lines = _dry(capsys, "table1", "--out", str(tmp_path))
    assert len(lines) == 7 * 2 * 3 * 5
    for loss in grid.TABLE1_LOSSES:
        assert sum(f"--loss {loss} " in line for line in lines) == 2 * 3 * 5
    assert all("--recipe paper" in line and "--arch resnet18" in line and "--schedule authors" in line for line in lines)
    assert sum("--epochs 500 " in line for line in lines) == 70 and sum("--seed 4 " in line for line in lines) == 42
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_table2_dry_run_is_nce_and_direct_on_both_backbones(tmp_path, capsys):
    lines = _dry(capsys, "table2", "--out", str(tmp_path), "--epochs", "100", "--seeds", "2", "--device", "cuda")
    assert len(lines) == 2 * 3 * 2 * 2
    assert all(("--loss nce " in line) != ("--loss direct " in line) for line in lines)
    assert sum("--arch resnet50" in line for line in lines) == 12
    assert all("--device cuda" in line and "--lr" not in line for line in lines)  # lr from the paper recipe


def _tiny(root, *extra):
    return ["fashion-mnist", "--datasets", "synthetic", "--losses", "nce", "direct", "--seeds", "1", "--epochs", "2",
            "--threads", "1", "--out", str(root), *extra, "--", "--batch", "32", "--linear-epochs", "2", "--eval", "knn"]


def test_grid_resumes_an_interrupted_run_and_skips_finished_ones(tmp_path, monkeypatch, capsys):
    from train import cli

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert reproduce.main(_tiny(straight)) == 0
    # An interrupted run: the grid's run folder with one of its two epochs done.
    spec = grid.GRIDS["fashion-mnist"]
    options = {"schedule": "authors", "device": "auto", "threads": 1, "backend": "auto", "eval_every": 0,
               "data_root": "data", "download": False, "progress": False,
               "extra": ["--batch", "32", "--linear-epochs", "2", "--eval", "knn"]}
    run = grid.GridRun("synthetic", "small_cnn", "nce", 2, 0)
    argv = grid.run_argv(run, str(resumed), spec, options, resume=False)
    argv[argv.index("--epochs") + 1] = "1"
    assert cli.main(argv) == 0
    assert grid.state(run, str(resumed)) == "partial"
    assert reproduce.main(_tiny(resumed)) == 0
    assert "1 to resume, 1 new" in capsys.readouterr().out
    for name in ("nce", "direct"):
        a = read_metrics(os.path.join(grid.GridRun("synthetic", "small_cnn", name, 2, 0).folder(str(straight)), "metrics.csv"))
        b = read_metrics(os.path.join(grid.GridRun("synthetic", "small_cnn", name, 2, 0).folder(str(resumed)), "metrics.csv"))
        assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit for bit, as the trainer promises
    # Everything is done now: a second call runs nothing, and still writes the table.
    monkeypatch.setattr(grid, "execute", lambda *a, **k: pytest.fail("a finished run was run again"))
    assert reproduce.main(_tiny(resumed)) == 0
    assert "2 done (skipped)" in capsys.readouterr().out
    assert os.path.exists(resumed / "results.md") and os.path.exists(resumed / "results.png")


def _fake_summary(folder, best, final, knn, untrained=None):
    os.makedirs(folder, exist_ok=True)
    summary = {"status": "completed", "epochs_done": 100, "reported": {"linear_top1_best": best, "linear_top1_final": final,
                                                                       "knn_top1": knn},
               "untrained": {"knn_top1": 10.0, "linear": {"best": untrained}} if untrained else None,
               "train_time_s": 1.0, "cpu_threads": 1, "backend": "eager", "device_name": "cpu", "torch": torch.__version__}
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_report_aggregates_mean_and_sample_std_next_to_the_paper(tmp_path, gen):
    spec = grid.GRIDS["table1"]
    runs = grid.runs(["cifar10"], ["resnet18"], ["nce", "direct"], [100], 3)
    values = {}
    for run in runs:
        best = float(80 + 10 * torch.rand((), generator=gen))
        values.setdefault(run.loss, []).append(best)
        if not (run.loss == "direct" and run.seed == 2):  # one run unfinished: n = 2 for direct
            _fake_summary(run.folder(str(tmp_path)), best, best - 1, best - 5, untrained=50.0)
    rows = grid_report.report(spec, runs, str(tmp_path), "python train/reproduce.py table1")
    assert len(rows) == 5
    text = (tmp_path / "results.md").read_text()
    nce = values["nce"]
    expected = f"{statistics.fmean(nce):.2f} ± {statistics.stdev(nce):.2f} (3)"
    direct = values["direct"][:2]
    mean, std = sum(direct) / 2, math.sqrt(sum((v - sum(direct) / 2) ** 2 for v in direct) / 1)
    assert expected in text and f"{mean:.2f} ± {std:.2f} (2)" in text
    paper = paper_results.lookup("cifar10", "resnet18", "direct", 100, table=1)
    assert f"{paper.mean:.2f} ± {paper.std:.2f}" in text
    assert "Runs finished: 5 of 6" in text
    assert (tmp_path / "runs.csv").read_text().count("\n") == 6  # header + 5 runs


def test_claims_keep_two_processes_off_one_run(tmp_path):
    run = grid.GridRun("synthetic", "small_cnn", "nce", 1, 0)
    assert grid.claim(run, str(tmp_path))
    claim_file = os.path.join(run.folder(str(tmp_path)), grid.CLAIM)
    with open(claim_file, "w") as f:
        f.write(str(os.getppid()))  # a live process that is not this one
    assert not grid.claim(run, str(tmp_path))
    with open(claim_file, "w") as f:
        f.write("2147483646")  # a process that does not exist: a stale claim is taken over
    assert grid.claim(run, str(tmp_path))
    grid.release(run, str(tmp_path))
    assert not os.path.exists(claim_file)


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        reproduce.main(["table1", "--losses", "nce", "typo"])
    assert exit_.value.code == 2 and "typo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["table3"])

"""The benchmark's supervised (SupCon) set-up: `--preset supcon` plans what issue 27 asks,
its machinery runs at tiny M and writes the rows, ratio columns and plot, the providers agree
in value on the benchmark's own inputs, and a provider that cannot run the set-up is a row
with its reason.

No timing is asserted, only structure and agreement (as in tests/test_bench.py).
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import background  # noqa: E402
from bench import agreement, compare, presets, providers, report, runner  # noqa: E402
from fastalpha import testing  # noqa: E402

HAVE_PML = providers.status("pml", torch.device("cpu"))[0]
needs_pml = pytest.mark.skipif(not HAVE_PML, reason="pytorch-metric-learning is not installed")

TINY_SIZES = [64, 256]
TINY_TEST = "test_supcon_preset_at_tiny_sizes_writes_rows_ratios_and_plot"


def _tiny_preset_argv() -> list[str]:
    """The supcon preset's labelled group as selection flags, with TINY_SIZES for its sizes
    (eager added: the ratio columns against it are checked too)."""
    group = presets.expand("supcon")[0]
    flags = dict(providers=group["providers"] + ["eager"], rules=group["rules"], sizes=TINY_SIZES, dims=group["dims"],
                 dtypes=group["dtypes"], modes=group["modes"], setups=group["setups"])
    argv = [arg for key, values in flags.items() for arg in (f"--{key}", ",".join(map(str, values)))]
    return argv + ["--repeats", "2", "--budget-s", "0", "--threads", "1", "--memory", "pinned", "--name", "supcon-tiny"]


def _compare_command_line(argv, out):
    proc = subprocess.run([sys.executable, "-m", "bench.compare", *argv, "--out", str(out)], cwd=REPO,
                          env=background.environment(), capture_output=True, text=True, timeout=600)
    return out, proc


def start_in_background(tmp_path_factory, items) -> None:
    """Start the tiny preset run beside the other tests (tests/background.py)."""
    if TINY_TEST in {item.name for item in items}:
        background.start(TINY_TEST, _compare_command_line, _tiny_preset_argv(), tmp_path_factory.mktemp("bench-supcon"))


def test_labels_are_classes_of_eight_and_singletons():
    m = 1000
    labels = providers.supcon_labels(m, torch.Generator().manual_seed(0))
    assert labels.shape == (m,) and labels.dtype == torch.int64
    counts = torch.bincount(labels)
    counts = counts[counts > 0]
    singletons = m // providers.SINGLETON_EVERY
    assert (counts == providers.ROWS_PER_CLASS).sum() == (m - singletons) // providers.ROWS_PER_CLASS
    # the last class holds the remainder; (1000 - 15) % 8 = 1 row: one more singleton
    assert (counts == 1).sum() == singletons + 1
    assert torch.equal(labels, providers.supcon_labels(m, torch.Generator().manual_seed(0)))
    assert not torch.equal(labels, torch.sort(labels).values), "rows of a class should not be adjacent"


def test_supcon_preset_plans_every_provider_and_size_under_its_cap():
    """Issue 35's table: cpp, chunked and pml labelled, cpp's SimCLR call at the same M (and the
    same SupCon parameters), cpp labelled at SUPCON_LARGE_M; the targets cover every ratio; and
    the cross-batch memory rows (cpp, chunked, pml at memories of 4096 … 65536 slots)."""
    args = compare.parse_args(["--preset", "supcon"])
    tasks = compare.plan(args)
    memory_rows = {t for t in tasks if t.positives == "memory"}
    assert {(t.provider, t.m, t.queue) for t in memory_rows} == \
        {(p, presets.XBM_BATCH, k) for p in ("cpp", "chunked", "pml") for k in presets.XBM_MEMORY_SIZES}
    assert presets.XBM_MEMORY_SIZES[0] == 4096 and presets.XBM_MEMORY_SIZES[-1] == 65536
    tasks = [t for t in tasks if t not in memory_rows]
    assert {(t.provider, t.m, t.positives) for t in tasks} == \
        {(p, m, "labels") for p in ("cpp", "chunked", "pml") for m in presets.SUPCON_SIZES} | \
        {("cpp", m, "pair") for m in presets.SUPCON_SIZES} | {("cpp", presets.SUPCON_LARGE_M, "labels")}
    assert {(t.rule, t.d, t.dtype, t.mode, t.negatives, t.queue) for t in tasks} == \
        {("infonce", 128, "float32", "fwdbwd", "all", 0)}
    assert {(t.rule, t.d, t.dtype, t.mode, t.negatives) for t in memory_rows} == {("infonce", 128, "float32", "fwdbwd", "all")}
    assert presets.SUPCON_SIZES == [8192, 16384] and presets.PRESETS["supcon"]["rule_params"] == "supcon"
    assert providers.rule_kwargs("infonce", "pair", supcon=True) == providers.SUPCON
    assert providers.rule_kwargs("infonce", "pair") == {} and providers.rule_kwargs("direct", "pair", supcon=True) == {}
    assert args.mem_cap_gb == presets.SUPCON_MEM_CAP_GB and args.memory == "both"
    whats = [t.what for t in presets.TARGETS["supcon"]]
    for m in presets.SUPCON_SIZES:
        for part in ("over chunked", "over pml", "labelled / unlabelled time", "labelled / unlabelled RSS"):
            assert any(part in w and f"M={m}" in w for w in whats), (part, m)
    # The largest size of the dense providers is predicted to fit the preset's cap, so it runs.
    cap = presets.SUPCON_MEM_CAP_GB * 2**30
    for name in ("pml", "eager"):
        assert providers.predicted_peak_bytes(name, max(presets.SUPCON_SIZES), 128, torch.float32, "fwdbwd") < cap
    # A smaller cap given on the command line wins over the preset's: pml's largest size is then
    # a row that says why it was not run.
    small = compare.parse_args(["--preset", "supcon", "--mem-cap-gb", "4"])
    assert small.mem_cap_gb == 4
    settings = runner.Settings(threads=1, cap_bytes=int(small.mem_cap_gb * 2**30))
    task = runner.Task("pml", "infonce", max(presets.SUPCON_SIZES), 128, "float32", "fwdbwd", positives="labels")
    result = runner.run(task, settings)
    assert result["status"] == "OOM" and "predicted peak" in result["reason"] and "cap 4.0 GiB" in result["reason"], result
    cuda = presets.expand("supcon-cuda")[0]
    assert cuda["setups"] == ["labels"] and set(cuda["providers"]) == {"triton", "cuda", "chunked", "pml"}


def test_providers_that_cannot_run_the_set_up_say_why():
    assert providers.setup_support("pml", "direct", "all", 0, "labels")[0] == "unavailable"
    status, reason = providers.setup_support("pml", "infonce", "all", 0, "pair")
    assert status == "unavailable" and "labels" in reason
    for name in ("eager", "chunked"):
        assert providers.setup_support(name, "infonce", "all", 0, "labels") == ("ok", "")
    # cpp may or may not take labels in this checkout: either it runs, or the reason is the dispatcher's.
    status, reason = providers.setup_support("cpp", "infonce", "all", 0, "labels")
    assert (status, reason) == ("ok", "") or (status == "unavailable" and "cpp" in reason), (status, reason)


@needs_pml
def test_pml_agrees_with_fastalpha_supcon_and_a_wrong_temperature_does_not(gen):
    cpu = torch.device("cpu")
    fn = providers.loss_fn("pml", "infonce", "labels")
    assert agreement.check_agreement(fn, "infonce", cpu, torch.float32, gen, positives="labels")[0] == "ok"
    from pytorch_metric_learning.losses import SupConLoss

    status, reason = agreement.check_agreement(SupConLoss(temperature=0.2), "infonce", cpu, torch.float32, gen,
                                               positives="labels")
    assert status == "wrong" and "loss" in reason, reason


def test_providers_agree_in_value_on_the_benchmark_inputs():
    # The inputs compare.py times (runner._inputs: one view, supcon_labels), forward only.
    cpu = torch.device("cpu")
    settings = runner.Settings(threads=1)
    names = [p for p in ("eager", "chunked", "cpp", "pml")
             if providers.status(p, cpu)[0] and providers.setup_support(p, "infonce", "all", 0, "labels")[0] == "ok"]
    assert {"eager", "chunked"} <= set(names)
    values = {}
    for name in names:
        task = runner.Task(name, "infonce", 256, 32, "float32", "fwd", positives="labels")
        _, call = runner._inputs(task, settings, cpu, torch.float32)
        values[name] = call()
    for name, value in values.items():
        testing.assert_close(value, values["eager"], testing.precision_of(torch.float32, False), f"{name} loss")


@pytest.mark.background
def test_supcon_preset_at_tiny_sizes_writes_rows_ratios_and_plot(tmp_path):
    out, proc = background.result(TINY_TEST, _compare_command_line, _tiny_preset_argv(), tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    printed = proc.stdout
    assert "threads of" in printed and "1-min load" in printed and "set-up=labels" in printed, printed
    with open(out / "supcon-tiny.csv", newline="") as f:
        header = csv.DictReader(f).fieldnames
    assert {"positives", "speedup_vs_pml", "speedup_vs_eager", "memory_saving_vs_pml", "memory_saving_vs_eager"} <= set(header)
    assert (out / "supcon-tiny.png").stat().st_size > 0
    rows = report.read_csv(str(out / "supcon-tiny.csv"))
    group = presets.expand("supcon")[0]
    assert {(r["provider"], r["M"]) for r in rows} == {(p, m) for p in group["providers"] + ["eager"] for m in TINY_SIZES}
    by = {(r["provider"], r["M"]): r for r in rows}
    for r in rows:
        assert r["positives"] == "labels" and r["rule"] == "infonce" and r["mode"] == "fwdbwd", r
        assert r["device"] and r["threads"] == 1 and r["cores"] >= 1 and r["timestamp"], r
        # ok (the agreement check passed: the value and gradient equal the float64 SupCon), or a
        # provider that cannot run here with its reason; never an error.
        assert r["status"] in ("ok", "unavailable"), r
        assert r["status"] == "ok" or r["reason"], r
        if r["status"] == "ok":
            assert r["load_start"] is not None and r["load_end"] is not None and r["peak_mb"] is not None
    for m in TINY_SIZES:
        for name in ("eager", "chunked") + (("pml",) if HAVE_PML else ()):
            assert by[name, m]["status"] == "ok", by[name, m]
        # Ratios are computed in the run from the rows beside them.
        pml, eager = by["pml", m], by["eager", m]
        for r in (row for row in rows if row["M"] == m and row["status"] == "ok"):
            for column, base, field in (("speedup_vs_pml", pml, "median_ms"), ("speedup_vs_eager", eager, "median_ms"),
                                        ("memory_saving_vs_pml", pml, "peak_mb"), ("memory_saving_vs_eager", eager, "peak_mb")):
                if base["status"] != "ok" or not r[field]:
                    assert r[column] is None, (column, r)
                else:
                    assert r[column] == pytest.approx(base[field] / r[field], rel=1e-4), (column, r)
        if HAVE_PML:
            assert pml["speedup_vs_pml"] == pytest.approx(1.0)
    # At M = 256 the O(M²) providers hold M × M matrices: pml's memory is counted.
    if HAVE_PML:
        assert by["pml", max(TINY_SIZES)]["peak_mb"] > max(TINY_SIZES) ** 2 * 4 / 2**20
        assert "x pml" in printed and "mem x pml" in printed


def test_supcon_targets_report_every_ratio():
    """The target report of a synthetic run: each ratio from the rows it names, PASS/FAIL by its
    bound, MISSING where a row is absent."""
    def row(provider, positives, m, ms, rss=10.0):
        return dict(provider=provider, positives=positives, M=m, rule="infonce", mode="fwdbwd", D=128, dtype="float32",
                    negatives="all", queue=0, status="ok", median_ms=ms, rss_growth_mb=rss)
    rows = []
    for m in presets.SUPCON_SIZES:
        rows += [row("cpp", "labels", m, 100.0, 11.0), row("chunked", "labels", m, 250.0), row("pml", "labels", m, 1400.0),
                 row("cpp", "pair", m, 90.0, 10.0)]
    text = presets.target_report("supcon", rows, dict(device="cpu", threads=2, cores=2), None)
    lines = {line.split("  ")[0]: line for line in text.splitlines()}
    assert "2.50x" in next(v for k, v in lines.items() if "over chunked" in k and "8192" in k) and "PASS" in text
    assert "FAIL" in next(v for k, v in lines.items() if "over pml" in k and "16384" in k)   # 14x < 15x
    assert "1.11x" in next(v for k, v in lines.items() if "unlabelled time" in k and "8192" in k)
    assert "MISSING" in next(v for k, v in lines.items() if "completes" in k)


@needs_pml
def test_memory_set_up_checks_agreement_and_fills_the_memory(monkeypatch):
    """The memory set-up: each provider's module agrees with the float64 reference step after
    step (a provider computing another loss is "wrong"); `fill_memory` leaves pml's and
    fastalpha's memories full with the same rows and labels, so that the measured call of both
    sees the same state and computes the same loss; the set-up parses and names itself."""
    cpu, gen = torch.device("cpu"), torch.Generator().manual_seed(5)
    for name in ("cpp", "chunked", "pml"):
        status, reason = agreement.check_memory_agreement(name, cpu, torch.float32, gen)
        assert status == "ok", (name, reason)
    real = providers.memory_loss_fn
    monkeypatch.setattr(agreement, "memory_loss_fn",
                        lambda name, d, k: real(name, d, k) if name == "eager" else
                        providers.fastalpha.CrossBatchMemory(providers.fastalpha.SupConLoss(temperature=0.5), d, k))
    status, reason = agreement.check_memory_agreement("cpp", cpu, torch.float32, gen)
    assert status == "wrong" and "step 0" in reason, reason
    monkeypatch.undo()

    m, d, k = 24, 8, 60
    modules = {name: providers.memory_loss_fn(name, d, k) for name in ("pml", "cpp")}
    for module in modules.values():
        providers.fill_memory(module, m, seed=3)
    pml, fused = modules["pml"], modules["cpp"]
    assert pml.has_been_filled and fused.has_been_filled and int(fused.queue_idx) == pml.queue_idx == 0
    assert torch.equal(pml.embedding_memory, fused.embedding_memory) and torch.equal(pml.label_memory, fused.label_memory)
    assert len(pml.label_memory.unique()) < k, "the classes should recur across the memory's batches"
    rows = torch.randn(m, d, generator=gen)
    labels = providers.supcon_labels(m, gen)
    testing.assert_close(fused(rows, labels=labels), pml(rows, labels=labels), "float32", "loss on a filled memory")

    assert compare.parse_setup("labels+memory4096", 77) == ("all", 4096, "memory")
    assert compare.parse_setup("labels+memory", 77) == ("all", 77, "memory")
    for bad in ("labels+memory0", "labels+memoryx"):
        with pytest.raises(ValueError, match="labels\\+memory"):
            compare.parse_setup(bad, 77)
    assert report.setup_name(dict(negatives="all", queue=4096, positives="memory")) == "labels+memory4096"
    from bench import plots
    rows = [dict(negatives="all", queue=k, positives="memory", M=1024) for k in (4096, 65536)]
    assert plots._panel_setup(rows[0]) == plots._panel_setup(rows[1]) and [plots._x(r) for r in rows] == [4096, 65536]
    assert plots._panel_setup(dict(negatives="all", queue=0, positives="labels", M=1024)) == "labels"
    assert report.true_flops("pml", 1024, 128, "fwdbwd", queue=4096, positives="memory") == 6 * 1024 * 4096 * 128
    assert report.true_flops("chunked", 1024, 128, "fwdbwd", queue=4096, positives="memory") == 6 * 1024 * 5120 * 128

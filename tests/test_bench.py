"""The benchmark harness (bench/): its agreement check catches a wrong provider, a tiny
compare.py run writes the documented CSV and plot, set-ups run or are skipped with a reason,
memory is measured, old CSVs are read, and the presets' target report says PASS and FAIL.
The chunked baseline is the library's chunked backend, tested with the others in
tests/test_backends.py.

No timing is asserted (speed lives in the benchmark itself), only that the harness measures
and reports what it says it does.
"""
import csv
import inspect
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import background  # noqa: E402
import fastalpha  # noqa: E402
from bench import agreement, compare, presets, report, runner  # noqa: E402

#: The CSV columns docs/benchmarks.md documents (bench/report.py may add more).
DOCUMENTED_COLUMNS = ("provider", "rule", "M", "D", "dtype", "mode", "negatives", "queue", "positives", "median_ms", "p20_ms",
                      "p80_ms", "repeats", "peak_mb", "rss_growth_mb", "gflops", "true_gflops", "ceiling_gflops", "ceiling_fraction",
                      "fma_peak_gflops", "peak_fraction", "speedup_vs_eager",
                      "speedup_vs_chunked", "speedup_vs_pml", "memory_saving_vs_eager", "memory_saving_vs_pml", "status", "reason", "device", "threads", "cores", "torch", "triton",
                      "git_commit", "timestamp", "load_start", "load_end")


def test_agreement_check_flags_wrong_and_failing_providers(gen):
    cpu = torch.device("cpu")

    def eager(z1, z2):
        return fastalpha.alpha_cl_loss(z1, z2, rule="infonce", backend="eager")

    def off_by_a_little(z1, z2):
        return eager(z1, z2) * (1 + 1e-3)

    def gradient_wrong(z1, z2):
        # Same value, gradient of z1 shifted by 1e-3 in every entry.
        return eager(z1, z2) + 1e-3 * (z1.sum() - z1.sum().detach())

    def broken(z1, z2):
        raise RuntimeError("kernel not built")

    assert agreement.check_agreement(eager, "infonce", cpu, torch.float32, gen)[0] == "ok"
    status, reason = agreement.check_agreement(off_by_a_little, "infonce", cpu, torch.float32, gen)
    assert status == "wrong" and "loss" in reason
    status, reason = agreement.check_agreement(gradient_wrong, "infonce", cpu, torch.float32, gen)
    assert status == "wrong" and "grad z1" in reason
    status, reason = agreement.check_agreement(broken, "infonce", cpu, torch.float32, gen)
    assert status == "error" and "kernel not built" in reason
    if "negatives" in inspect.signature(fastalpha.alpha_cl_loss).parameters:
        def ignores_negatives(z1, z2, **setup):
            return eager(z1, z2)

        status, reason = agreement.check_agreement(ignores_negatives, "infonce", cpu, torch.float32, gen, negatives="cross")
        assert status == "wrong" and "loss" in reason


def test_runner_predicts_oom_without_running():
    settings = runner.Settings(threads=1, cap_bytes=1 << 20)
    result = runner.run(runner.Task("eager", "direct", 4096, 8, "float32", "fwdbwd"), settings)
    assert result["status"] == "OOM" and "predicted" in result["reason"], result
    assert result["median_ms"] is None


class _Progress:
    def update(self, n):
        pass

    def set_postfix_str(self, text):
        pass


def _worker_failure_run(folder):
    # An unknown provider makes the timing worker raise outside the per-task guard.
    bad = runner.Task("no-such-provider", "direct", 16, 4, "float32", "fwd")
    good = runner.Task("chunked", "direct", 16, 4, "float32", "fwd")
    results = compare.Results([bad, good], {}, {}, str(folder / "partial.csv"), _Progress())
    compare.run_cpu([bad, good], runner.Settings(threads=1, repeats=1, budget_s=0.0), results, background.environment())
    return folder, bad, good, results


@pytest.mark.background
def test_worker_failure_is_recorded_and_the_run_goes_on(tmp_path):
    # The task in flight must come back as an error with the worker's message, the next task
    # must be timed and get its peak memory, and the CSV on disk must already hold both.
    folder, bad, good, results = background.result(WORKER_FAILURE_TEST, _worker_failure_run, tmp_path)
    assert results.measured[bad.key()]["status"] == "error" and "no-such-provider" in results.measured[bad.key()]["reason"]
    assert results.measured[good.key()]["status"] == "ok" and results.measured[good.key()]["median_ms"] > 0
    assert results.measured[good.key()]["peak_mb"] is not None
    on_disk = report.read_csv(str(folder / "partial.csv"))
    assert [(r["provider"], r["status"]) for r in on_disk] == [("no-such-provider", "error"), ("chunked", "ok")]


TINY_RUN = ["--providers", "eager,chunked,cuda", "--rules", "direct", "--sizes", "64,512", "--dims", "32",
            "--modes", "fwd,fwdbwd", "--repeats", "2", "--budget-s", "0", "--threads", "1", "--name", "tiny"]
TINY_TEST = "test_compare_tiny_run_writes_documented_csv_and_plot"
WORKER_FAILURE_TEST = "test_worker_failure_is_recorded_and_the_run_goes_on"
RSS_TEST = "test_rss_growth_of_a_fresh_process_counts_a_providers_buffers"
SETUPS_TEST = "test_setups_run_or_are_skipped_with_a_reason"


def start_in_background(tmp_path_factory, items) -> None:
    """Start the harness's worker processes beside the other tests (tests/background.py)."""
    selected = {item.name for item in items}
    for name, *work in ((TINY_TEST, _compare_command_line, TINY_RUN), (SETUPS_TEST, _compare_command_line, SETUPS_RUN),
                        (WORKER_FAILURE_TEST, _worker_failure_run), (RSS_TEST, _rss_phase)):
        if name in selected:
            background.start(name, *work, tmp_path_factory.mktemp("bench"))


def _compare_command_line(argv, out):
    proc = subprocess.run([sys.executable, "-m", "bench.compare", *argv, "--out", str(out)], cwd=REPO,
                          env=background.environment(), capture_output=True, text=True, timeout=600)
    return out, proc


def _compare_output(name, argv, tmp_path):
    """The folder and printed output of the `python -m bench.compare` run started as `name`."""
    out, proc = background.result(name, _compare_command_line, argv, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


@pytest.mark.background
def test_compare_tiny_run_writes_documented_csv_and_plot(tmp_path):
    tmp_path, printed = _compare_output(TINY_TEST, TINY_RUN, tmp_path)
    assert "threads of" in printed and "1-min load" in printed and "at end" in printed, printed
    csv_path = tmp_path / "tiny.csv"
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        written = list(reader)
    assert set(DOCUMENTED_COLUMNS) <= set(header), f"missing columns: {set(DOCUMENTED_COLUMNS) - set(header)}"
    assert len(written) == 3 * 2 * 2
    assert (tmp_path / "tiny.png").stat().st_size > 0

    parsed = {(r["provider"], r["M"], r["mode"]): r for r in report.read_csv(str(csv_path))}
    for mode in ("fwd", "fwdbwd"):
        for m in (64, 512):
            cuda = parsed[("cuda", m, mode)]
            assert cuda["status"] == "unavailable" and cuda["reason"], cuda
            for provider in ("eager", "chunked"):
                r = parsed[(provider, m, mode)]
                assert r["status"] == "ok", r
                assert r["threads"] == 1 and r["cores"] >= 1 and r["device"] and r["torch"] == torch.__version__
                assert r["load_start"] is not None and r["load_end"] is not None
                assert r["repeats"] >= 1 and r["calls_per_block"] >= 1
                assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                flops = (8 if mode == "fwdbwd" else 2) * m * m * 32
                assert r["gflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e9, rel=1e-4)
                # eager and chunked do 6·M²·D fwd+bwd (S, ωZ, ωᵀZ; autograd's two products for eager)
                true = (6 if mode == "fwdbwd" else 2) * m * m * 32
                assert r["true_gflops"] == pytest.approx(true / (r["median_ms"] * 1e-3) / 1e9, rel=1e-4)
                assert r["ceiling_fraction"] == pytest.approx(r["true_gflops"] / r["ceiling_gflops"], rel=1e-4)
                assert r["peak_fraction"] is None or r["peak_fraction"] == pytest.approx(
                    r["true_gflops"] / r["fma_peak_gflops"], rel=1e-4)
            chunk = parsed[("chunked", m, mode)]
            eager = parsed[("eager", m, mode)]
            assert chunk["speedup_vs_eager"] == pytest.approx(eager["median_ms"] / chunk["median_ms"], rel=1e-4)
            assert chunk["speedup_vs_chunked"] == pytest.approx(1.0)
        # The dense reference holds several M x M float32 matrices at once: its measured peak
        # beyond the inputs must exceed one of them (1 MiB at M = 512); the chunked one must not
        # reach the dense one.
        dense, rows_chunked = parsed[("eager", 512, mode)], parsed[("chunked", 512, mode)]
        assert dense["peak_mb"] > 512 * 512 * 4 / 2**20, dense
        assert rows_chunked["peak_mb"] < dense["peak_mb"], (rows_chunked, dense)


SETUPS_RUN = ["--providers", "eager", "--rules", "infonce", "--sizes", "64", "--dims", "8", "--modes", "fwdbwd",
              "--setups", "all,cross,none+queue", "--queue-size", "16", "--repeats", "1", "--budget-s", "0",
              "--threads", "1", "--memory", "none", "--name", "setups", "--no-plot"]


@pytest.mark.background
def test_setups_run_or_are_skipped_with_a_reason(tmp_path):
    # CLIP-shaped (negatives="cross") and queue rows run where fastalpha.alpha_cl_loss takes
    # `negatives`/`queue`, and are reported `skipped` with the reason otherwise.
    out, printed = _compare_output(SETUPS_TEST, SETUPS_RUN, tmp_path)
    rows = report.read_csv(str(out / "setups.csv"))
    by_setup = {(r["negatives"], r["queue"]): r for r in rows}
    assert set(by_setup) == {("all", 0), ("cross", 0), ("none", 16)}
    assert by_setup["all", 0]["status"] == "ok"
    parameters = inspect.signature(fastalpha.alpha_cl_loss).parameters
    for key, needs in ((("cross", 0), ("negatives",)), (("none", 16), ("negatives", "queue"))):
        r = by_setup[key]
        if all(name in parameters for name in needs):
            assert r["status"] == "ok", r
            # nominal flops count the setup's columns: M/2 for cross, K (6 flops·D each) for a queue
            flops = 64 * 8 * (8 * 32 if key[0] == "cross" else 6 * 16)
            assert r["gflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e9, rel=1e-4)
        else:
            assert r["status"] == "skipped" and "has no" in r["reason"], r
            assert "set-ups skipped: " in printed


def _rss_phase(folder):
    # The rss phase: a fresh worker process, default allocator, three calls.
    task = runner.Task("eager", "direct", 1024, 16, "float32", "fwdbwd")
    got, deaths = {}, []
    compare._run_phase("rss", [task], runner.Settings(threads=1), lambda t, result: got.update(result),
                       lambda t, why: deaths.append(why), _Progress(), background.environment())
    return got, deaths


@pytest.mark.background
def test_rss_growth_of_a_fresh_process_counts_a_providers_buffers(tmp_path):
    # For the dense reference at M = 1024 the growth includes at least one M x M float32
    # matrix (4 MiB).
    got, deaths = background.result(RSS_TEST, _rss_phase, tmp_path)
    assert not deaths, deaths
    assert got.get("rss_growth_mb") is not None and got["rss_growth_mb"] > 4.0, got


def test_old_csv_names_are_read_as_current(tmp_path):
    path = tmp_path / "old.csv"
    path.write_text("provider,rule,M,D,dtype,mode,median_ms,p20_ms,p80_ms,repeats,peak_mb,gflops,ceiling_gflops,"
                    "ceiling_fraction,speedup_vs_eager,speedup_vs_chunked,status,reason,device,threads,torch,triton,"
                    "git_commit,timestamp,load_1min\n"
                    "eager-chunked,direct,1024,128,float32,fwd,7.4,7.1,7.9,5,9.5,36.3,310,0.12,1.88,1,ok,,cpu,2,2.14.1,,"
                    "24bd7e2,2026-11-29T15:29:01+00:00,0.65\n")
    row, = report.read_csv(str(path))
    assert row["provider"] == "chunked" and row["negatives"] == "all" and row["queue"] == 0 and row["load_end"] == 0.65


def _target_rows(cpp_ms, chunked_ms, eager_ms, cpp_rss, eager_rss, large_ok=True):
    rows = []
    for rule, mode in (("direct", "fwdbwd"), ("infonce", "fwdbwd"), ("infonce", "fwd")):
        for provider, ms, rss in (("cpp", cpp_ms, cpp_rss), ("chunked", chunked_ms, 50.0), ("eager", eager_ms, eager_rss)):
            rows.append(dict(provider=provider, rule=rule, mode=mode, M=presets.CPU_TARGET_M, D=128, dtype="float32",
                             negatives="all", queue=0, positives="pair", status="ok", median_ms=ms, rss_growth_mb=rss, peak_mb=rss))
    rows.append(dict(provider="cpp", rule="direct", mode="fwdbwd", M=presets.CPU_LARGE_M, D=128, dtype="float32", negatives="all",
                     queue=0, positives="pair", status="ok" if large_ok else "error", median_ms=3e5, rss_growth_mb=None,
                     peak_mb=None))
    return rows


def test_target_report_says_pass_and_fail():
    env = dict(device="cpu", threads=2, cores=2, torch=torch.__version__, git_commit="abc", load_start=0.1)
    good = presets.target_report("cpu-targets", _target_rows(100.0, 250.0, 5000.0, 10.0, 1500.0), env, 0.2)
    lines = [line for line in good.splitlines() if "cpp" in line and ("PASS" in line or "FAIL" in line or "MISSING" in line)]
    assert len(lines) == len(presets.CPU_TARGETS) and all("PASS" in line for line in lines), good
    assert "WARNING" not in good
    bad = presets.target_report("cpu-targets", _target_rows(100.0, 120.0, 5000.0, 100.0, 1500.0, large_ok=False),
                                dict(env, load_start=2.5), 0.2)
    assert bad.count("FAIL") == len(presets.CPU_TARGETS) - 1 and "MISSING (cpp: error)" in bad, bad
    assert "WARNING" in bad
    assert presets.target_report("setups", [], env, 0.2) == ""


def test_help_shows_defaults_and_invocations(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps to the terminal width
    assert "(default: cpu 1024,4096,8192,16384" in text and "usual invocations:" in text and "--preset cpu-targets" in text
    with pytest.raises(SystemExit):
        compare.parse_args(["--preset", "cpu-targets", "--sizes", "64"])
    assert "--sizes" in capsys.readouterr().err
    args = compare.parse_args(["--preset", "cpu-targets"])
    tasks = compare.plan(args)
    assert {(t.provider, t.rule, t.mode, t.m) for t in tasks} >= {("cpp", "direct", "fwdbwd", presets.CPU_LARGE_M),
                                                                    ("chunked", "infonce", "fwd", presets.CPU_TARGET_M)}
    assert args.memory == "both" and not any(t.provider == "eager" and t.m == presets.CPU_LARGE_M for t in tasks)


def test_true_flops_count_what_each_algorithm_does():
    """The symmetric cpp kernel does 4·M²·D fwd+bwd (each pair once for both anchors), the one
    pass and the chunked/dense providers 6·M·C·D, against the nominal 8·M²·D of every row."""
    m, d = 8192, 128
    assert report.cpp_algorithm(m, d, "fwdbwd") == "symmetric" and report.cpp_algorithm(1024, d, "fwdbwd") == "onepass"
    assert report.cpp_algorithm(m, d, "fwdbwd", positives="labels") == "symmetric"
    assert report.cpp_algorithm(m, d, "fwdbwd", rule="square", positives="labels") == "onepass"
    assert report.cpp_algorithm(m, d, "fwdbwd", queue=m) == "onepass"
    assert report.cpp_algorithm(1024, d, "fwdbwd", forced="symmetric") == "symmetric"
    assert report.true_flops("cpp", m, d, "fwdbwd") == 4 * m * m * d
    assert report.true_flops("cpp", m, d, "fwd") == m * m * d
    assert report.true_flops("cpp", m, d, "fwdbwd", negatives="cross") == 2 * m * m * d
    assert report.true_flops("cpp", m, d, "fwdbwd", queue=100) == 4 * m * m * d + 8 * m * 100 * d
    for provider in ("chunked", "eager", "pml"):
        assert report.true_flops(provider, m, d, "fwdbwd", positives="labels") == 6 * m * m * d
    assert report.true_flops("cpp", 1024, d, "fwdbwd", queue=2048) == 6 * 1024 * 3072 * d
    assert report.nominal_flops(m, d, "fwdbwd") == 8 * m * m * d


def test_compute_ceiling_and_fma_peak_are_measured_rates(monkeypatch):
    """The ceiling is a rate of tile products (positive, finite); the FMA peak multiplies the
    threads, clock, lanes, 2 flops per FMA and the pipes, or says why it cannot."""
    from bench import timing

    rate = timing.tile_gemm_ceiling_gflops(16, torch.float32, 1, budget_s=0.0, mode="fwd")
    assert 0 < rate < float("inf")
    with pytest.raises(ValueError, match="mode"):
        timing.tile_gemm_ceiling_gflops(16, torch.float32, 1, mode="bwd")
    # Workers that start apart measured partly alone: no ceiling then.
    starts = iter([0.0, 100.0])
    monkeypatch.setattr(timing.json, "loads", lambda text, _loads=timing.json.loads: dict(_loads(text), start=next(starts)))
    with pytest.raises(RuntimeError, match="apart"):
        timing.tile_gemm_ceiling_gflops(16, torch.float32, 2, budget_s=0.0, mode="fwdbwd")
    monkeypatch.setattr(timing, "_cpu_info", lambda: {"flags": "sse avx2 fma", "max MHz": "2000", "vendor_id": "GenuineIntel"})
    peak, how = timing.fma_peak_gflops(2, torch.float32)
    assert peak == pytest.approx(2 * 2.0 * 8 * 2 * timing.FMA_PIPES) and "8 lanes" in how
    monkeypatch.setattr(timing, "_cpu_info", lambda: {"flags": "avx512f avx2 fma", "cpu MHz": "1000", "vendor_id": "GenuineIntel"})
    assert timing.fma_peak_gflops(1, torch.float64)[0] == pytest.approx(1.0 * 8 * 2 * timing.FMA_PIPES)
    monkeypatch.setattr(timing, "_cpu_info", lambda: {})
    assert timing.fma_peak_gflops(1, torch.float32)[0] is None

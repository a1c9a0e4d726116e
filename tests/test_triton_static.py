"""The Triton kernels' machine code, without a GPU: the committed static report and fresh compiles.

docs/gpu-static-report.csv (python -m bench.static.report) lists what ptxas made of
every kernel variant of its matrix. These tests check that

* the report is current and complete: every variant the launcher would compile today
  (recorded, not compiled: cheap) has a row compiled from today's kernel sources (source hash),
  and the report has no other rows; it covers every negative set-up (all, cross, none; with
  and without a queue) and every autotuning candidate of every pass where the matrix asks;
* every tensor-core variant (bf16, fp16, tf32) at D ∈ {32, 64, 128, 256} is on Hopper's fast
  path: warpgroup MMAs only (HGMMA > 0, HMMA = 0) on sm_90, warp MMAs (HMMA) on sm_80, no
  spills, shared memory within a CTA's limit; IEEE float32 and float64 stay off the tensor
  cores; every autotuning candidate is among the proven rows;
* (slow) a fresh compile of the default call's kernels reproduces that, so the report is not
  just trusted: it is what the compiler on this machine makes of the code.

Compiling needs the real (not interpreted) kernels, so it runs in a subprocess without
TRITON_INTERPRET.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the report is tooling in bench/static/, not part of the package

import background  # noqa: E402
from bench.static import report  # noqa: E402
from fastalpha.backends.triton.blocks import TENSOR_CORE_TYPES, candidate_configs  # noqa: E402

REGENERATE = "python -m bench.static.report --reuse"


@pytest.fixture(scope="module")
def rows():
    found = report.read_rows()
    assert found, f"{report.CSV_PATH} is missing: run {REGENERATE}"
    return found


@pytest.fixture(scope="module")
def matrix():
    """The variants of the report's matrix, as the launcher records them today."""
    return list(report.variants())


def test_report_is_current_and_complete(rows, matrix):
    digest = report.source_hash()
    current = {report.row_key(r) for r in rows if r["source_hash"] == digest}
    missing = [v.key for v in matrix if v.key not in current]
    assert not missing, (f"{len(missing)} variants have no row compiled from today's kernel sources "
                         f"(first: {missing[0]}): run {REGENERATE}")
    assert len(rows) == len(matrix) == len({report.row_key(r) for r in rows}), "rows outside the matrix, or twice"
    with open(report.MD_PATH) as f:
        assert f"**{len(matrix)} variants**" in f.read()


def test_every_negative_set_up_and_queue_is_covered(rows):
    """Each set-up is its own compiled kernel (NEGATIVES, QUEUE constexprs): the report has, in
    each of them, every pass of each tensor-core type at D = 64, 128 and 256 on sm_90, and
    `direct` in IEEE float32, float64 and on sm_80, each row with the constexprs of its set-up."""
    assert set(report.SET_UPS) == {"all", "all+queue", "cross", "cross+queue", "none+queue", "labels"}
    modes = {"all": "constexpr[0]", "cross": "constexpr[1]", "none": "constexpr[2]"}
    seen = set()
    for r in rows:
        negatives, queue, labels = report.SET_UPS[r["set_up"]]
        flags = dict(item.split("=", 1) for item in r["constexprs"].split())
        assert (flags["NEGATIVES"], flags["QUEUE"]) == (modes[negatives], str(queue > 0)), r["set_up"]
        assert (flags["GROUPS"] != "constexpr[0]") == labels, f"{r['set_up']}: GROUPS={flags['GROUPS']}"
        seen.add((r["arch"], r["compute"], int(r["D"]), r["kernel"], r["set_up"]))
    required = [("90", compute, d, kernel) for compute in TENSOR_CORE_TYPES for d in (64, 128, 256)
                for kernel in ("row", "column", "sparsemax")]
    required += [(arch, compute, d, kernel) for arch, compute, d in [("90", "fp32", 64), ("90", "fp64", 64),
                                                                     ("80", "bf16", 128), ("80", "tf32", 128)]
                 for kernel in ("row", "column")]
    for arch, compute, d, kernel in required:
        for set_up in report.SET_UPS:
            assert (arch, compute, d, kernel, set_up) in seen, f"sm_{arch} {kernel} {compute} D={d} {set_up}"


def test_every_tensor_core_variant_is_on_the_fast_path(rows):
    checked = set()
    for r in rows:
        arch, compute, d = int(r["arch"]), r["compute"], int(r["D"])
        where = f"sm_{arch} {r['kernel']} {compute} D={d} tile {r['tile']} w{r['num_warps']} s{r['num_stages']}"
        assert int(r["spill_bytes"]) == 0, f"{where} spills {r['spill_bytes']} B"
        assert int(r["smem_bytes"]) <= report.SM_LIMITS[arch]["smem_cta"], f"{where}: shared memory {r['smem_bytes']} B"
        assert int(r["ctas_per_sm"]) >= 1, f"{where}: not even one CTA fits an SM"
        if compute in TENSOR_CORE_TYPES:
            if arch == 90:
                assert int(r["hgmma"]) > 0 and int(r["hmma"]) == 0, f"{where}: HGMMA {r['hgmma']}, HMMA {r['hmma']}"
            else:
                assert int(r["hmma"]) > 0, f"{where}: no HMMA"
            checked.add((arch, compute, d, r["kernel"]))
        else:
            assert int(r["hgmma"]) == int(r["hmma"]) == 0, f"{where}: IEEE/fp64 must stay off the tensor cores"
            assert int(r["ffma"] if compute == "fp32" else r["dfma"]) > 0, f"{where}: no FFMA/DFMA"
        assert r["fast_path"] == "yes", f"{where}: {r['fast_path']}"
    assert {kernel for *_, kernel in checked} == {"row", "column", "sparsemax"}
    for compute in TENSOR_CORE_TYPES:
        for d in report.DIMS:
            for kernel in ("row", "column"):
                assert (90, compute, d, kernel) in checked, f"sm_90 {kernel} {compute} D={d} is not in the report"


def test_every_autotuning_candidate_is_proven(rows):
    """Autotuning may launch any candidate: each must have a fast-path row in the report, for
    the light passes (α detached) and, where registers are tightest, the β passes, which
    blocks._WITHHELD may give fewer candidates, in the negative set-ups of the matrix."""
    proven = {(r["compute"], r["D"], r["set_up"], r["kernel"], "BETA=True" in r["constexprs"].split(), r["tile"],
               r["num_warps"], r["num_stages"]) for r in rows if r["arch"] == "90" and r["fast_path"] == "yes"}
    dtypes = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32")}
    # (compute, D, set-ups, β passes too?): the light passes at every D with SimCLR's set, and
    # every pass in every set-up at D = 64, 128 and 256.
    required = [(compute, d, ("all",), False) for compute in dtypes for d in report.DIMS]
    required += [(compute, d, tuple(report.SET_UPS), True) for compute in dtypes for d in (64, 128, 256)]
    for compute, d, set_ups, with_beta in required:
        dtype, precision = dtypes[compute]
        for set_up in set_ups:
            for kernel in ("row", "column"):
                for beta in (False, True) if with_beta else (False,):
                    for cfg in candidate_configs(d, dtype, precision, kernel, beta, report.SET_UPS[set_up][2]):
                        key = (compute, str(d), set_up, kernel, beta, f"{cfg.block_m}x{cfg.block_n}",
                               str(cfg.num_warps), str(cfg.num_stages))
                        assert key in proven, f"autotuning candidate not proven by the static report: {key}"
    tuned = sum(len(candidate_configs(d, dtype, precision)) > 1 for dtype, precision in dtypes.values() for d in report.DIMS)
    assert tuned == 11, "every single-chunk tensor-core shape has alternatives (tf32 at D = 256 is chunked)"


def test_markdown_report_matches_the_csv(rows):
    with open(report.MD_PATH) as f:
        text = f.read()
    misses = sum(r["fast_path"] != "yes" for r in rows)
    assert f"Variants off the fast path: {misses}." in text
    for arch in {r["arch"] for r in rows}:
        assert f"## sm_{arch}" in text


def test_occupancy_estimate():
    # 128 registers × 256 threads = half the register file: 2 CTAs of 8 warps.
    assert report.occupancy(90, 128, 16384, 8) == (2, 16)
    # 255 registers round up to 256 per thread: one 8-warp CTA (64K registers).
    assert report.occupancy(90, 255, 0, 8) == (1, 8)
    # Shared memory bound: 100 KiB + 1 KiB reserved per CTA, 228 KiB per SM → 2 CTAs.
    assert report.occupancy(90, 32, 100 * 1024, 4) == (2, 8)
    # Over the per-CTA limit: nothing fits.
    assert report.occupancy(80, 32, 200 * 1024, 4)[0] == 0


#: The fresh compile: one JSON line of resource usage per compiled kernel; `jobs` are
#: (arch, compute, D, rule, detach, weighted, kernel kinds).
FRESH_COMPILE = r'''
import json
from triton.backends.compiler import GPUTarget
from bench.static import aot_check, report
jobs = [(90, "bf16", 256, "direct", True, False, ("row", "column"), "all", 0),
        (90, "fp16", 256, "direct", True, False, ("column",), "all", 0),
        (90, "tf32", 128, "direct", True, False, ("column",), "all", 0),
        (80, "bf16", 128, "direct", True, False, ("column",), "all", 0),
        (90, "fp32", 64, "direct", True, False, ("row",), "all", 0),
        (90, "bf16", 3, "square", False, True, ("sparsemax",), "all", 0),
        (90, "tf32", 130, "direct", False, False, ("row",), "all", 0),
        (90, "bf16", 128, "direct", True, False, ("row",), "cross", report.QUEUE_ROWS),
        (80, "tf32", 128, "direct", True, False, ("column",), "cross", 0)]
for arch, compute, d, rule, detach, weighted, kinds, negatives, queue in jobs:
    for item in aot_check.record(compute, d, rule, detach, weighted, negatives=negatives, queue=queue):
        if item.kind not in kinds or (item.kind == "row" and not item.kwargs["ACCUMULATE"]):
            continue
        usage = aot_check.resource_usage(aot_check.compile_launch(item.kernel, item.args, item.launch_kwargs(item.config), GPUTarget("cuda", arch, 32)))
        usage.update(arch=arch, compute=compute, D=d, kernel=item.kind, fast_path=report.verdict(arch, compute, usage),
                     tile=f"{item.config.block_m}x{item.config.block_n}", num_stages=item.config.num_stages, constexprs=" ".join(f"{k}={v}" for k, v in sorted(item.kwargs.items())))
        print(json.dumps(usage), flush=True)
'''
FRESH_TEST = "test_fresh_compile_reproduces_the_fast_path"


def start_in_background(tmp_path_factory, items) -> None:
    """Start the fresh compile beside the other tests (tests/background.py)."""
    if any(item.name == FRESH_TEST for item in items):
        background.start(FRESH_TEST, _compile_subprocess, FRESH_COMPILE, 1500)


def _compile_subprocess(code: str, timeout: int) -> subprocess.CompletedProcess:
    env = {key: value for key, value in background.environment().items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.background
def test_fresh_compile_reproduces_the_fast_path(rows):
    """Compile, on this machine, the column passes that used to miss HGMMA (bf16/fp16 at D = 256,
    tf32 at D = 128), the bf16 row pass at D = 256, one sm_80 variant, IEEE float32, a two-tower
    row pass with a queue, the sm_80 column pass that spilled with negatives="cross", and two
    kernels outside the report's matrix (sparsemax at D = 3, the chunked-feature path at D = 130):
    the interpreter accepts code the compiler rejects, and the report must be what this
    compiler makes of the code."""
    pytest.importorskip("triton.backends.nvidia")
    out = background.result(FRESH_TEST, _compile_subprocess, FRESH_COMPILE, 1500)
    assert out.returncode == 0, out.stdout + out.stderr
    fresh = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(fresh) == 10, [(u["kernel"], u["compute"], u["D"]) for u in fresh]
    # Keyed on warps and stages too: at D = 128 the 16-bit static 64×64 (8 warps, 2 stages) and
    # its autotuning alternative (4 warps, 3 stages) share the tile.
    committed = {(r["arch"], r["kernel"], r["compute"], r["D"], r["tile"], r["num_warps"], r["num_stages"],
                  r["constexprs"]): r for r in rows}
    import triton
    for u in fresh:
        where = f"sm_{u['arch']} {u['kernel']} {u['compute']} D={u['D']}"
        if u["D"] in (3, 130):           # outside the matrix: compiles, no spills, tensor cores
            assert u["spill_bytes"] == 0 and u["hgmma"] > 0 and u["hmma"] == 0, where
            continue
        assert u["fast_path"] == "yes", f"{where}: {u['fast_path']}"
        row = committed.get((str(u["arch"]), u["kernel"], u["compute"], str(u["D"]), u["tile"], str(u["num_warps"]),
                             str(u["num_stages"]), u["constexprs"]))
        assert row is not None, f"{where} is not in the committed report: run {REGENERATE}"
        if row["triton"] == triton.__version__:
            assert (int(row["regs"]), int(row["hgmma"]), int(row["hmma"])) == (u["regs"], u["hgmma"], u["hmma"]), where

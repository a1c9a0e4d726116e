"""The Triton kernels' machine code, without a GPU: the committed static report and fresh compiles.

docs/gpu-static-report.csv (python -m bench.static.report) has one row per distinct compiled
kernel (bench/static/variants.py: the call space; Triton's specialization key). The space has
tens of thousands of kernels, hours of compiling on two cores, so these tests check, without
compiling, that

* the report is current: its inputs hash (kernel sources, launcher, tile tables, enumeration,
  sections, Triton version) is today's, and every row was compiled from today's kernel sources;
* every row is a kernel of today's space, once, and the report's statement of how many kernels
  of each section it compiled is right (a kernel without a row is not claimed);
* every row is on the fast path (no spills, shared memory within a CTA, every product of a
  bf16/fp16/tf32 kernel a warpgroup MMA on sm_90, a warp MMA on sm_80), and blocks.py agrees
  with it (every row's tile is a candidate of its pass; nothing withheld has a row);
* the key does not depend on sizes: the kernels declare their size arguments
  do_not_specialize and the launcher aligns every tensor, so calls at other batch sizes, queue
  lengths, row ranges and views of larger tensors launch the kernels of the one-size recording;
* the launch recorder agrees: real calls through the public API (alpha_cl_loss, SupConLoss,
  ops.call_fused; interpreter) launch only kernels of the enumerated space, and, in the sections
  the report has compiled completely, only kernels with a row;
* (slow) a fresh compile of some of its kernels on this machine reproduces their rows.

Compiling needs the real (not interpreted) kernels, so it runs in a subprocess without
TRITON_INTERPRET.
"""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the report is tooling in bench/static/, not part of the package

import background  # noqa: E402
from bench.static import report, variants  # noqa: E402
from fastalpha.backends.triton import blocks, launch  # noqa: E402
from fastalpha.kernels.tiles import SIZE_ARGUMENTS  # noqa: E402

REGENERATE = "python -m bench.static.report --reuse --jobs 2"


@pytest.fixture(scope="module")
def rows():
    got = report.read_rows()
    assert got, f"docs/gpu-static-report.csv is missing: run {REGENERATE}"
    return got


@pytest.fixture(scope="module")
def markdown():
    with open(report.MD_PATH) as f:
        return f.read()


@pytest.fixture(scope="module")
def planned():
    """(section index, variants.Kernel) of every kernel of the space, as recorded today (seconds)."""
    torch.set_num_threads(1)
    return report.planned()


def test_report_is_current(rows, markdown):
    assert f"Inputs hash: `{report.inputs_hash()}`" in markdown, (
        f"the kernels, the launcher, the tile tables, the enumeration or Triton changed: run {REGENERATE}")
    stale = [r["key"] for r in rows if r["source_hash"] != report.source_hash()]
    assert not stale, f"{len(stale)} rows were compiled from other kernel sources: run {REGENERATE}"


def test_rows_are_kernels_of_the_space_and_the_coverage_is_stated(rows, markdown, planned):
    committed = {report.row_key(r): r for r in rows}
    assert len(committed) == len(rows), "a kernel has two rows"
    expected = {(str(report.SECTIONS[index][1]), kernel.key): (index, kernel) for index, kernel in planned}
    extra = sorted(set(committed) - set(expected))
    assert not extra, f"{len(extra)} rows are no kernel of the space (first: {committed[extra[0]]['first_call']})"
    for key, row in committed.items():
        index, kernel = expected[key]
        assert (row["section"], row["calls"], row["first_call"]) == (
            report.SECTIONS[index][0], str(kernel.calls), kernel.call.name), key
    for line in report.coverage_lines(rows):
        assert line in markdown, f"the report misstates what it compiled ({line}): run {REGENERATE} --render-only"
    assert f"**{len(rows)} kernels compiled** of the {len(planned)} " in markdown
    coverage = {name: (kernels, done) for name, _, kernels, done in report.coverage(rows)}
    # The kernels where registers are tightest are compiled first: that section is complete.
    assert coverage["bf16 D=128"][0] == coverage["bf16 D=128"][1] > 1000, coverage["bf16 D=128"]


def test_the_first_section_holds_every_rule_flag_set_up_and_candidate(planned):
    """bf16 at D = 128 is the whole constexpr space of one compute type and D: every rule
    setting, detach_alpha, normalize, gradient mode and set-up, every pass."""
    first = [kernel for index, kernel in planned if index == 0]
    calls = {(k.call.rule, k.call.detach, k.call.unit, k.call.grad, k.call.set_up) for k in first}
    assert {c[0] for c in calls} == set(variants.RULES)
    assert {c[4] for c in calls} == set(variants.SET_UPS)
    assert {(c[1], c[2], c[3]) for c in calls} == {(d, u, g) for d in (True, False) for u in (True, False)
                                                   for g in variants.GRAD_MODES}
    assert {(k.config.num_warps, k.config.num_stages) for k in first} == {(8, 2)}, (
        "the static 64×64 w8 s2 alone at D̂ = 128 (blocks._ALTERNATIVES: the w4 s3 candidate spilled)")
    assert {k.launch.kind for k in first} == {"row", "column", "sparsemax"}
    assert {getattr(k.launch.kwargs["GROUPS"], "value", k.launch.kwargs["GROUPS"]) for k in first} == {0, 1, 2}


def test_every_row_is_on_the_fast_path(rows, markdown):
    for r in rows:
        arch, compute = int(r["arch"]), r["compute"]
        where = f"sm_{arch} {r['kernel']} {r['first_call']} tile {r['tile']} w{r['num_warps']} s{r['num_stages']}"
        assert int(r["spill_bytes"]) == 0, f"{where} spills {r['spill_bytes']} B"
        assert int(r["smem_bytes"]) <= report.SM_LIMITS[arch]["smem_cta"], f"{where}: shared memory {r['smem_bytes']} B"
        assert int(r["ctas_per_sm"]) >= 1, f"{where}: not even one CTA fits an SM"
        assert int(r["dots"]) > 0, f"{where}: no product"
        if compute in report.TENSOR_CORE and arch == 90:
            assert r["wgmma_dots"] == r["dots"] and r["ptx_mma"] == "0", (
                f"{where}: {r['wgmma_dots']} of {r['dots']} products on wgmma, {r['ptx_mma']} mma.sync")
        elif compute in report.TENSOR_CORE:
            assert int(r["ptx_mma"]) > 0, f"{where}: no mma.sync"
        else:
            assert r["ptx_wgmma"] == "0" and r["ptx_mma"] == r["ptx_dmma"], f"{where}: 16-bit/TF32 MMA in {compute}"
        assert r["fast_path"] == "yes", f"{where}: {r['fast_path']}"
    assert "Kernels off the fast path: 0." in markdown


def _constexprs(row: dict) -> dict:
    return dict(item.split("=", 1) for item in row["constexprs"].split())


def test_blocks_and_the_report_agree(rows):
    """Every row's tile is a candidate or a fallback shape blocks.py gives its pass, and no shape that blocks.py
    withholds (_WITHHELD, for a spill) has a row: the one place that decides tiles and the
    report describe the same kernels."""
    dtypes = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32"),
              "fp32": (torch.float32, "ieee"), "fp64": (torch.float64, "ieee")}
    for r in rows:
        flags = _constexprs(r)
        dtype, precision = dtypes[r["compute"]]
        beta = flags.get("BETA") == "True"
        grouped = flags["GROUPS"] != "constexpr[0]"
        arch = int(r["arch"]) // 10
        shapes = {report.shape_columns(c)
                  for c in blocks.candidate_configs(int(r["D"]), dtype, precision, r["kernel"], beta, grouped, arch)
                  + list(blocks.fallback_configs(int(r["D"]), dtype, precision, grouped, arch))}
        assert (r["tile"], r["num_warps"], r["num_stages"]) in shapes, f"{r['first_call']} {r['kernel']}: {r['tile']}"
        group = "tf32" if r["compute"] == "tf32" else "16-bit"
        for owned, streamed, warps, stages in blocks._WITHHELD.get(
                (group, blocks.padded_features(int(r["D"])), r["kernel"], beta), ()):
            assert (r["tile"], r["num_warps"], r["num_stages"]) != (f"{owned}x{streamed}", str(warps), str(stages))
    assert blocks._WITHHELD, "the withheld shape of the TF32 β row pass at D̂ = 128"


def test_size_arguments_are_not_specialized():
    """Every kernel declares C, half, row_lo, row_hi and m_bucket do_not_specialize, and its other
    integer arguments are D and the strides (whose classes follow from D)."""
    sizes = {"C", "half", "row_lo", "row_hi", "m_bucket"}
    assert set(SIZE_ARGUMENTS) == sizes
    floats = {f"{name}_{part}" for name in ("tau", "k", "inv_gamma", "log_eps") for part in ("hi", "lo")}
    for kernel in (launch.row_pass_kernel, launch.column_pass_kernel, launch.sparsemax_threshold_kernel):
        jit = variants._jit(kernel)
        scalars = [p for p in jit.params if not p.is_constexpr and not p.name.endswith("_ptr") and p.name not in floats]
        assert {p.name for p in scalars if p.do_not_specialize} == sizes, jit.fn.__name__
        assert {p.name for p in scalars if not p.do_not_specialize} <= {"D", "stride_z", "stride_acc"}, jit.fn.__name__


def _recorded_keys(fn) -> set:
    with launch.recording_launches() as recorded:
        fn()
    return {variants.kernel_key(dataclasses_replace_upcast(item), config) for item in recorded for config in item.candidates}


def dataclasses_replace_upcast(item):
    import dataclasses
    return dataclasses.replace(item, kwargs={**item.kwargs, "UPCAST": False})


@pytest.mark.parametrize("set_up", ["all", "cross+queue", "grouped-lonely"])
def test_kernel_key_does_not_depend_on_sizes(set_up):
    """Calls at other sizes (odd and divisible batch sizes, queue lengths, row ranges as a
    distributed rank has, a view at an odd offset, weights sliced from a larger gradient)
    launch exactly the kernels of the one-size recording (variants.record)."""
    torch.set_num_threads(1)
    from fastalpha.rules import make_spec
    negatives, queue, grouped = variants.SET_UPS[set_up]
    call = variants.Call("bf16", 100, "direct-eps", False, False, "weighted", set_up)
    expected = {variants.kernel_key(item, config) for item in variants.record(call) for config in item.candidates}
    spec = make_spec(**variants.RULES[call.rule], normalize=False, detach_alpha=False, negatives=negatives)
    for n, k, (lo, hi), offset in ((16, 16, (0, 32), 0), (21, 1, (3, 17), 1), (33, 48, (1, 2), 3), (64, 5, (16, 48), 16)):
        m = 2 * n
        big = torch.randn(m * 100 + offset).to(torch.bfloat16)
        z = big[offset:offset + m * 100].view(m, 100)            # a view at an odd offset when offset is
        extra = {}
        if queue:
            extra["queue"] = torch.randn(k, 100).to(torch.bfloat16)
        if grouped:
            ids = torch.arange(m) % n
            ids[1] = m
            extra["groups"] = ids
        weight = torch.rand(hi - lo + offset)[offset:]
        got = _recorded_keys(lambda: launch.fused_loss_and_grad(z, spec, lo, hi, weight, True, **extra))
        assert got == expected, f"N={n} K={k} rows [{lo}, {hi}) offset {offset}"


def test_a_misaligned_tensor_never_reaches_a_kernel():
    z = torch.randn(401).to(torch.bfloat16)[1:].view(4, 100)
    assert z.data_ptr() % 16
    aligned = launch._aligned(z)
    assert aligned.data_ptr() % 16 == 0 and torch.equal(aligned, z)
    item = launch.Launch(launch.row_pass_kernel, "row", None, (z,), {}, None, ())
    with pytest.raises(RuntimeError, match="aligned"):
        launch._run(item, False)


def _representative(d: int) -> int:
    """The feature count of the space with D's specialization class (same D̂, same divisibility)."""
    padded = blocks.padded_features(d)
    return next(f for f in variants.FEATURES
                if blocks.padded_features(f) == padded and (f % 16 == 0) == (d % 16 == 0))


#: Rule settings of the real calls, chosen apart from variants.RULES (other p, ε, γ, τ), so that
#: a rule setting the enumeration lacks shows up as a kernel outside the space.
REAL_RULES = (dict(rule="entropy"), dict(rule="entropy", eps=0.5), dict(rule="direct", p=2.0),
              dict(rule="direct", eps=0.01), dict(rule="direct", p=1.5), dict(rule="direct", p=5.0, eps=1e-3),
              dict(rule="inverse", gamma=2.0), dict(rule="square", temperature=0.3), dict(rule="infonce"),
              dict(rule="infonce", eps=0.0), dict(rule="infonce", eps=0.5, temperature=0.07), dict(rule="quadratic"))
#: (negatives, queue, labels) of the real calls: every set the API accepts.
REAL_SET_UPS = tuple((negatives, queue, labels) for negatives in ("all", "cross", "none") for queue in (False, True)
                     for labels in (None, "every", "lonely")
                     if (queue or negatives != "none") and (labels is None or negatives == "all"))


def _real_calls(rng: random.Random, count: int):
    """(compute, D, rule kwargs, detach_alpha, normalize, reduction, set-up, N, K) at random."""
    for _ in range(count):
        yield (rng.choice(("bf16", "bf16", "fp16", "tf32", "fp32")), rng.choice((128, 100, 120, 64, 33, 256, 200)),
               rng.choice(REAL_RULES), rng.choice((True, False)), rng.choice((True, False)),
               rng.choice(("mean", "sum", "none", "no_grad")), rng.choice(REAL_SET_UPS),
               rng.choice((3, 8, 16, 17)), rng.choice((1, 16, 7)))


def _run_public_call(compute, d, rule, detach, unit, reduction, set_up, n, k):
    """One call through fastalpha.alpha_cl_loss, loss and gradient (with an uneven incoming
    gradient for reduction="none")."""
    from fastalpha import alpha_cl_loss
    dtype, precision = variants.COMPUTE_TYPES[compute]
    negatives, queue, grouped = set_up
    z1, z2 = (torch.randn(n, d, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(2))
    kwargs = dict(rule, normalize=unit, detach_alpha=detach, backend="triton", negatives=negatives,
                  reduction="mean" if reduction == "no_grad" else reduction)
    if queue:
        kwargs["queue"] = torch.randn(k, d, dtype=torch.float64).to(dtype)
    if grouped:
        labels = torch.arange(2 * n) % n
        if grouped == "lonely":
            labels[0] = 2 * n
        kwargs["labels"] = labels
        if queue:
            kwargs["queue_labels"] = torch.arange(k) % (n + 1)
        z1, z2 = torch.cat([z1, z2]).detach().requires_grad_(), None
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        if reduction == "no_grad":
            with torch.no_grad():
                alpha_cl_loss(z1, z2, **kwargs)
            return
        loss = alpha_cl_loss(z1, z2, **kwargs)
        (loss * torch.rand_like(loss)).sum().backward()
    finally:
        torch.set_float32_matmul_precision(old)


def _check_launches(seen, planned, committed, what):
    space = {kernel.key for index, kernel in planned if report.SECTIONS[index][1] == 90}
    complete = {name for name, _, kernels, done in report.coverage(report.read_rows()) if kernels == done}
    first = {kernel.key: report.SECTIONS[index][0] for index, kernel in planned if report.SECTIONS[index][1] == 90}
    assert seen, "no launch recorded"
    for item, call in seen:
        for config in item.candidates:
            key = variants.kernel_key(dataclasses_replace_upcast(item), config)
            assert key in space, f"{what} {call} launches a kernel outside the enumerated space: {item.kind} {key}"
            if first[key] in complete:
                assert key in committed, f"{what} {call} launches a kernel without a row: {item.kind} {key}"


def test_public_calls_launch_only_kernels_of_the_report(rows, planned):
    """Many public calls (recorded, nothing runs: every compute type, D's classes, rules, flags,
    reductions, set-ups, odd sizes) and a few that run in the interpreter: every kernel they
    launch, with every candidate autotuning could pick, is in the enumerated space, and has a
    row where the report says its section is complete."""
    if not launch.interpreted():
        pytest.skip("records interpreted launches (TRITON_INTERPRET=1, as the suite runs)")
    torch.set_num_threads(1)
    committed = {r["key"] for r in rows if r["arch"] == "90"}
    rng = random.Random(int(os.environ.get("FASTALPHA_TEST_SEED", "0")))
    seen = []
    for call in _real_calls(rng, 80):
        with launch.recording_launches() as recorded:
            _run_public_call(*call)
        seen += [(item, call) for item in recorded]
    _check_launches(seen, planned, committed, "recorded")
    # Executed in the interpreter: the recorder sees what a running call launches.
    executed = []
    original = launch._run

    def spying(item, tune):
        executed.append((item, current))
        original(item, tune)
    for current in [("bf16", 128, dict(rule="inverse"), False, False, "none", ("cross", True, None), 3, 5),
                    ("bf16", 100, dict(rule="square"), False, True, "mean", ("all", True, "every"), 3, 2)]:
        launch._run = spying
        try:
            _run_public_call(*current)
        finally:
            launch._run = original
    _check_launches(executed, planned, committed, "executed")


def test_supcon_and_distributed_rank_launch_only_kernels_of_the_report(rows, planned):
    """SupConLoss (labels, three views) and a distributed rank's row range through ops.call_fused."""
    if not launch.interpreted():
        pytest.skip("records interpreted launches (TRITON_INTERPRET=1, as the suite runs)")
    torch.set_num_threads(1)
    import fastalpha
    from fastalpha import ops
    from fastalpha.rules import make_spec
    committed = {r["key"] for r in rows if r["arch"] == "90"}
    seen = []
    views = torch.randn(3, 7, 128).to(torch.bfloat16).requires_grad_()     # V = 3 views of N = 7
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0])
    with launch.recording_launches() as recorded:
        fastalpha.SupConLoss(backend="triton")(views, labels).backward()
    seen += [(item, "SupConLoss") for item in recorded]
    z = torch.randn(2 * 9, 100).to(torch.bfloat16)
    spec = make_spec(rule="entropy", eps=0.1, detach_alpha=False)
    weight = torch.rand(20)[3:3 + 5]
    with launch.recording_launches() as recorded:
        ops.call_fused(z, spec, "triton", 4, 9, weight, True, None, None)
    seen += [(item, "call_fused rows [4, 9)") for item in recorded]
    _check_launches(seen, planned, committed, "")


def test_occupancy_estimate():
    # 128 registers × 256 threads = half the register file: 2 CTAs of 8 warps.
    assert report.occupancy(90, 128, 16384, 8) == (2, 16)
    # 255 registers round up to 256 per thread: one 8-warp CTA (64K registers).
    assert report.occupancy(90, 255, 0, 8) == (1, 8)
    # Shared memory bound: 100 KiB + 1 KiB reserved per CTA, 228 KiB per SM → 2 CTAs.
    assert report.occupancy(90, 32, 100 * 1024, 4) == (2, 8)
    # Over the per-CTA limit: nothing fits.
    assert report.occupancy(80, 32, 200 * 1024, 4)[0] == 0


#: The fresh compile: the 12 committed kernels with the most registers and the first of each
#: section that has rows, recompiled here; one JSON row per kernel.
FRESH_COMPILE = r'''
import json, torch
torch.set_num_threads(1)
from bench.static import report
rows = report.read_rows()
keys = {r["key"] for r in sorted(rows, key=lambda r: -int(r["regs"]))[:12]}
keys |= {next(r["key"] for r in rows if r["section"] == name) for name in {r["section"] for r in rows}}
# IEEE float32 kernels whose first shape spilled: the compile must choose the same later shape.
from fastalpha.backends.triton import blocks
later = [r for r in rows if r["compute"] == "fp32" and (r["tile"], r["num_warps"], r["num_stages"])
         != report.shape_columns(blocks.fallback_configs(int(r["D"]), torch.float32)[0])]
keys |= {r["key"] for r in later[:3]}
for index, kernel in report.planned():
    if kernel.key in keys:
        keys.discard(kernel.key)
        print(json.dumps(report.compile_kernel(index, kernel, report.source_hash())), flush=True)
'''
FRESH_TEST = "test_fresh_compile_reproduces_the_report"


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
def test_fresh_compile_reproduces_the_report(rows):
    """The report is what this machine's compiler makes of the code, not just trusted: the
    heaviest kernels, one of each section and three IEEE float32 kernels that run a later shape
    of their list compile here to the committed shape, registers, spills, shared memory and MMA
    counts."""
    pytest.importorskip("triton.backends.nvidia")
    out = background.result(FRESH_TEST, _compile_subprocess, FRESH_COMPILE, 1500)
    assert out.returncode == 0, out.stdout + out.stderr
    fresh = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(fresh) >= 12, out.stdout + out.stderr
    later = [r for r in fresh if r["compute"] == "fp32" and (r["tile"], r["num_warps"], r["num_stages"])
             != report.shape_columns(blocks.fallback_configs(int(r["D"]), torch.float32)[0])]
    assert len(later) == 3, "three IEEE float32 kernels that run a later shape of their list"
    committed = {report.row_key(r): r for r in rows}
    for row in fresh:
        old = committed[report.row_key(row)]
        fields = ("tile", "num_warps", "num_stages", "regs", "spill_bytes", "smem_bytes", "dots", "wgmma_dots",
                  "ptx_wgmma", "ptx_mma", "fast_path")
        if old["triton"] == row["triton"]:
            assert {f: row[f] for f in fields} == {f: old[f] for f in fields}, row["first_call"]

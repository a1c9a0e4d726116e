"""Autotuning of the Triton kernels, as far as it can be exercised without a GPU.

On a GPU each pass is wrapped in `triton.autotune` over blocks.candidate_configs; the tuning
itself (timing candidates) needs a GPU, so here: the candidate sets, the pruning hook that
hands the autotuner this call's candidates, the fallback to the static table (interpreter,
FASTALPHA_AUTOTUNE=0), the key, and that every candidate computes the right thing (run in the
interpreter against the float64 reference).
"""
import pytest
import torch
import torch.nn.functional as F

from fastalpha import reference
from fastalpha.rules import make_spec
from fastalpha.testing import assert_close, beta_jumps_under_rounding, precision_of

kernels = pytest.importorskip("fastalpha.backends.triton")
if not kernels.status()[0]:
    pytest.skip(f"triton backend unavailable: {kernels.status()[1]}", allow_module_level=True)
import triton  # noqa: E402

from fastalpha.backends.triton import blocks, launch  # noqa: E402

TYPES = {"bf16": (torch.bfloat16, "ieee"), "fp16": (torch.float16, "ieee"), "tf32": (torch.float32, "tf32"),
         "fp32": (torch.float32, "ieee"), "fp64": (torch.float64, "ieee")}


@pytest.mark.parametrize("compute", list(TYPES))
@pytest.mark.parametrize("d", [3, 32, 64, 100, 128, 256, 300, 2048])
def test_candidates_share_the_static_feature_split(compute, d):
    """The static shape comes first; alternatives change only the tile, warps and stages (the
    grid's feature chunks and the single-chunk choice stay), and only tensor-core single-chunk
    cases are tuned (but 16-bit D̂ = 128), with owned blocks of ≥ 64 rows (Hopper's warpgroup MMA).
    The column pass without β, which no shape is withheld from, stands for every pass."""
    dtype, precision = TYPES[compute]
    static = blocks.block_config(d, dtype, precision)
    candidates = blocks.candidate_configs(d, dtype, precision, "column")
    assert candidates[0] == static and len(set(candidates)) == len(candidates)
    # 16-bit at D̂ = 128 is not tuned: its one alternative spilled (blocks._ALTERNATIVES).
    tuned = (compute in blocks.TENSOR_CORE_TYPES and static.single_chunk
             and not (compute in ("bf16", "fp16") and blocks.padded_features(d) == 128))
    assert (len(candidates) > 1) == tuned
    for cfg in candidates:
        assert (cfg.block_k, cfg.block_do, cfg.single_chunk) == (static.block_k, static.block_do, static.single_chunk)
        if compute in blocks.TENSOR_CORE_TYPES:
            assert cfg.block_m >= 64 and cfg.num_warps in (4, 8) and 2 <= cfg.num_stages <= 4


@pytest.mark.parametrize("compute", list(TYPES))
@pytest.mark.parametrize("d", [3, 50, 64, 100, 128, 200, 256])
@pytest.mark.parametrize("arch", [8, 9])
def test_only_ieee_float32_chooses_among_static_shapes(compute, d, arch):
    """blocks.fallback_configs: the static shape first, then (IEEE float32 alone) other tiles,
    warps and stages with the static feature split and register bound."""
    dtype, precision = TYPES[compute]
    static = blocks.block_config(d, dtype, precision, arch=arch)
    shapes = blocks.fallback_configs(d, dtype, precision, arch=arch)
    assert shapes[0] == static and len(set(shapes)) == len(shapes)
    assert (len(shapes) > 1) == (compute == "fp32")
    for cfg in shapes:
        assert (cfg.block_k, cfg.block_do, cfg.single_chunk, cfg.max_registers) == (
            static.block_k, static.block_do, static.single_chunk, static.max_registers)


class _Compiled:
    """What `JITFunction.warmup` returns, as far as launch._spill_free reads it."""

    def __init__(self, spills: int):
        self.n_spills, self.loaded = None, spills

    def _init_handles(self):
        self.n_spills = self.loaded     # known once the binary is loaded, as in Triton


class _Kernel:
    """A kernel whose compiled shapes in `spilling` spill; it records what it compiles and launches."""

    def __init__(self, spilling):
        self.spilling, self.compiled, self.launched = set(spilling), [], []

    @staticmethod
    def shape(kwargs):
        return kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"], kwargs["num_stages"]

    def warmup(self, *args, grid, **kwargs):
        self.compiled.append(self.shape(kwargs))
        return _Compiled(8 if self.shape(kwargs) in self.spilling else 0)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(self.shape(kwargs))


def test_ieee_float32_launches_the_first_shape_that_spills_nothing(monkeypatch):
    """Off the interpreter an IEEE float32 launch compiles blocks.fallback_configs in order
    (warmup: nothing runs) and launches the first whose kernel spills nothing, deciding once per
    specialization of its arguments; the first shape if every one spills; under the
    interpreter, and where there is one shape, the static shape without compiling."""
    import dataclasses
    z = torch.randn(40, 100)
    with launch.recording_launches() as recorded:
        launch.fused_loss_and_grad(z, make_spec("inverse", detach_alpha=False), 0, 40, None, True)
    shapes = blocks.fallback_configs(100, torch.float32)
    assert all(item.fallbacks == shapes and item.config == shapes[0] for item in recorded) and len(shapes) > 2
    row = next(item for item in recorded if item.kind == "row")
    tiles = [(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in shapes]
    monkeypatch.setattr(launch, "_SPILL_FREE", {})
    monkeypatch.setattr(launch, "interpreted", lambda: False)

    kernel = _Kernel(spilling=tiles[:2])
    item = dataclasses.replace(row, kernel=kernel)
    launch._run(item, False)
    assert kernel.compiled == tiles[:3] and kernel.launched == [tiles[2]]
    launch._run(item, False)
    assert kernel.compiled == tiles[:3] and kernel.launched == [tiles[2]] * 2      # decided once
    # D = 96 instead of 100 (divisible by 16) is another specialization: decided afresh.
    other = dataclasses.replace(item, args=tuple(96 if type(a) is int and a == 100 else a for a in item.args))
    assert other.args != item.args
    kernel.spilling = set(tiles[:1])
    launch._run(other, False)
    assert kernel.compiled == tiles[:3] + tiles[:2] and kernel.launched[-1] == tiles[1]

    everything = _Kernel(spilling=tiles)
    monkeypatch.setattr(launch, "_SPILL_FREE", {})
    launch._run(dataclasses.replace(row, kernel=everything), False)
    assert everything.compiled == tiles and everything.launched == [tiles[0]]

    alone = _Kernel(spilling=tiles)
    launch._run(dataclasses.replace(row, kernel=alone, fallbacks=(row.config,)), False)
    monkeypatch.setattr(launch, "_SPILL_FREE", {})
    monkeypatch.setattr(launch, "interpreted", lambda: True)
    launch._run(dataclasses.replace(row, kernel=alone), False)
    assert alone.compiled == [] and alone.launched == [tiles[0]] * 2


def test_m_bucket_is_coarse():
    assert blocks.m_bucket(4) == blocks.m_bucket(1024) == 5
    assert blocks.m_bucket(1025) == blocks.m_bucket(4096) == 6
    assert blocks.m_bucket(16384) == 7 and blocks.m_bucket(16385) == 8 and blocks.m_bucket(65536) == 8


@pytest.mark.parametrize("kind,owned", [("row", "BLOCK_M"), ("column", "BLOCK_N"), ("sparsemax", "BLOCK_M")])
@pytest.mark.parametrize("compute,d", [("bf16", 64), ("tf32", 128), ("fp16", 256), ("fp32", 64)])
@pytest.mark.parametrize("beta", [False, True])
def test_pruning_hands_the_autotuner_this_calls_candidates(kind, owned, compute, d, beta):
    dtype, precision = TYPES[compute]
    prune = launch._prune(kind)
    placeholders = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})] * 3
    flags = {} if kind == "sparsemax" else {"BETA": beta}        # the threshold pass has no β
    pruned = prune(placeholders, {"z_ptr": torch.empty(2, d, dtype=dtype), "D": d}, PRECISION=precision, UNIT=True,
                   **flags)
    expected = blocks.candidate_configs(d, dtype, precision, kind, flags.get("BETA", False))
    assert len(pruned) == len(expected)
    for config, cfg in zip(pruned, expected):
        assert config.kwargs[owned] == cfg.block_m                 # the owned block is the MMA's M
        assert config.kwargs == cfg.tile(kind)
        assert (config.num_warps, config.num_stages) == (cfg.num_warps, cfg.num_stages)


def test_tuned_kernels_key_on_shape_rule_and_size_class():
    for kind in ("row", "column", "sparsemax"):
        tuned = launch.tuned_kernel(kind)
        assert isinstance(tuned, triton.runtime.autotuner.Autotuner)
        assert tuned is launch.tuned_kernel(kind)                    # built once, its cache kept
        for name in launch._TUNING_KEYS[kind]:
            assert name in tuned.arg_names, name                     # a key the autotuner can read
        assert {"D", "m_bucket", "UNIT", "PRECISION"} <= set(tuned.keys)
    assert {"WEIGHT", "BETA", "ONLINE", "HAS_WEIGHT"} <= set(launch.tuned_kernel("row").keys)


def test_autotuning_switch(monkeypatch):
    monkeypatch.setattr(launch, "interpreted", lambda: False)
    monkeypatch.delenv("FASTALPHA_AUTOTUNE", raising=False)
    assert launch.autotune_enabled(True)
    monkeypatch.setenv("FASTALPHA_AUTOTUNE", "0")
    assert not launch.autotune_enabled(True)
    monkeypatch.setenv("FASTALPHA_AUTOTUNE", "1")
    assert launch.autotune_enabled(True)
    assert not launch.autotune_enabled(False)                        # CPU tensors never tune
    assert not launch.autotune_enabled(True, (8, 0))                 # candidates are proven for sm_90 only
    assert launch.autotune_enabled(True, (9, 0))
    monkeypatch.setattr(launch, "interpreted", lambda: True)
    assert not launch.autotune_enabled(True)                         # nor does the interpreter


def test_the_spilling_shapes_are_withheld_from_their_passes_only():
    """blocks._WITHHELD: tf32 at D = 128 in 64 × 64 tiles spills in the row passes (with β for
    `entropy`, without β for the general power) and the β column pass of `direct`
    (docs/gpu-static-report.md); a detach_alpha=False call records its row passes and its β
    column pass with the static shape alone; the column pass without β keeps both."""
    static, alternative = blocks.candidate_configs(128, torch.float32, "tf32", "column", False)
    assert (alternative.block_m, alternative.block_n, alternative.num_warps, alternative.num_stages) == (64, 64, 8, 2)
    z = torch.randn(80, 128)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with launch.recording_launches() as recorded:
            launch.fused_loss_and_grad(z, make_spec("entropy", detach_alpha=False), 0, 80, None, True)
    finally:
        torch.set_float32_matmul_precision(old)
    got = [(item.kind, item.kwargs["BETA"], item.candidates) for item in recorded]
    assert got == [("row", False, (static,)), ("row", True, (static,)), ("column", True, (static,))]
    assert [len(blocks.candidate_configs(128, torch.float32, "tf32", kind, True)) for kind in ("row", "column")] == [1, 1]
    # 16-bit at D̂ = 128 has no alternative (the w4 s3 one spilled at D = 128 and D = 100); at
    # D̂ = 256 the β passes alone lose their 64×64.
    assert {len(blocks.candidate_configs(d, torch.bfloat16, "ieee", kind, beta))
            for d in (100, 128) for kind in ("row", "column", "sparsemax") for beta in (False, True)} == {1}
    assert [len(blocks.candidate_configs(256, torch.float16, "ieee", kind, beta))
            for kind in ("row", "column") for beta in (False, True)] == [2, 1, 2, 1]
    # Where D is not a multiple of 16 at D̂ = 256, 16-bit streams 16 columns and is not tuned.
    assert {len(blocks.candidate_configs(200, dtype, "ieee", kind, beta)) for dtype in (torch.bfloat16, torch.float16)
            for kind in ("row", "column") for beta in (False, True)} == {1}
    assert blocks.block_config(200, torch.bfloat16).block_n == 16 and blocks.block_config(256, torch.bfloat16).block_n == 32
    # At D̂ = 64 with D not a multiple of 16, 16-bit owns 64 and streams 32 with 4 warps, and
    # its candidate streams 32 (128×64 spilled at D = 50); D = 64 keeps 64×64 and 128×64.
    for dtype in (torch.bfloat16, torch.float16):
        for d, shapes in ((50, [(64, 32, 4), (128, 32, 8)]), (64, [(64, 64, 4), (128, 64, 8)])):
            assert {tuple((c.block_m, c.block_n, c.num_warps) for c in blocks.candidate_configs(d, dtype, "ieee", kind, beta))
                    for kind in ("row", "column", "sparsemax") for beta in (False, True)} == {tuple(shapes)}
    # TF32 streams half the tile where D is not a multiple of 16 at D̂ = 64 and 128.
    assert [blocks.block_config(d, torch.float32, "tf32").block_n for d in (50, 64, 100, 128)] == [32, 64, 16, 32]


@pytest.mark.parametrize("grouped", [False, True], ids=["pairs", "grouped"])
def test_a_gpu_before_hopper_launches_the_bounded_static_shape(grouped):
    """On sm_80 (blocks.block_config with arch 8) a call launches the static shape alone, with
    ptxas's register bound, and grouped TF32 at D̂ = 128 at one stage; Hopper's shapes are
    unbounded and keep two."""
    z = torch.randn(24, 100)
    ids = torch.arange(24) % 6 if grouped else None
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        recorded = {}
        for arch in (8, 9):
            with launch.recording_launches(arch) as recorded[arch]:
                launch.fused_loss_and_grad(z, make_spec("direct", normalize=False), 0, 24, None, True,
                                           **({"groups": ids} if grouped else {}))
    finally:
        torch.set_float32_matmul_precision(old)
    assert [item.kind for item in recorded[8]] == [item.kind for item in recorded[9]]
    for before, hopper in zip(recorded[8], recorded[9]):
        assert before.candidates == (before.config,)
        options = before.launch_kwargs(before.config)
        assert options["maxnreg"] == blocks.PRE_HOPPER_MAX_REGISTERS
        assert options["num_stages"] == (1 if grouped else 2)
        assert "maxnreg" not in hopper.launch_kwargs(hopper.config) and hopper.config.num_stages == 2
        assert (before.config.block_m, before.config.block_n) == (hopper.config.block_m, hopper.config.block_n)


def test_fallback_launches_the_static_table_with_the_candidates_recorded(monkeypatch):
    """Under the interpreter every launch uses the static shape; the record carries the
    candidates the GPU would tune over (which the static report compiles)."""
    z = torch.randn(40, 64).to(torch.bfloat16)
    with launch.recording_launches() as recorded:
        launch.fused_loss_and_grad(z, make_spec("square", detach_alpha=False), 0, 40, None, True)
    assert [item.kind for item in recorded] == ["sparsemax", "row", "column"]
    static = blocks.block_config(64, torch.bfloat16)
    for item in recorded:
        assert item.config == static
        assert item.candidates == tuple(blocks.candidate_configs(64, torch.bfloat16, "ieee", item.kind,
                                                                 item.kwargs.get("BETA", False)))
        assert item.launch_kwargs(static)["num_warps"] == static.num_warps
        assert not set(item.kwargs) & {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}   # the tuner sets those
        assert item.grid(static.tile(item.kind))[0] == triton.cdiv(40, static.block_m)   # 40 rows, or 40 columns
    pinned = blocks.BlockConfig(16, 16, 64, 64, True, 4, 2)
    with launch.recording_launches() as recorded:
        launch.fused_loss_and_grad(z, make_spec("direct"), 0, 40, None, True, pinned)
    assert all(item.candidates == (pinned,) for item in recorded)     # a pinned config is never tuned


def _distinct_candidate_tiles():
    tiles = set()
    for compute in blocks.TENSOR_CORE_TYPES:
        dtype, precision = TYPES[compute]
        for d in (32, 64, 128, 256):
            for cfg in blocks.candidate_configs(d, dtype, precision)[1:]:
                tiles.add((cfg.block_m, cfg.block_n))
    return sorted(tiles)


@pytest.mark.parametrize("d", [24, 100])
def test_every_ieee_float32_shape_computes_the_reference(gen, d):
    """Each shape an IEEE float32 launch may choose (blocks.fallback_configs: single-chunk at
    D = 24, feature chunks at D = 100) on M = 70 rows, row range [3, 61), general rows, α
    differentiated, row weights: float32 against the float64 reference."""
    m = 70
    z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    weight = torch.rand(58, generator=gen, dtype=torch.float64)
    spec = make_spec("inverse", normalize=False, detach_alpha=False)
    ref_rows, ref_grad = reference.closed_form_gradient(z, spec, weight, 3, 61)
    shapes = blocks.fallback_configs(d, torch.float32)
    assert len(shapes) > 2 and shapes[0].single_chunk == (d <= 64)
    for cfg in shapes:
        rows, grad = launch.fused_loss_and_grad(z.float(), spec, 3, 61, weight.float(), True, cfg)
        where = f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}"
        assert_close(rows, ref_rows, precision_of(torch.float32), f"loss rows {where}")
        assert_close(grad, ref_grad, precision_of(torch.float32), f"grad {where}")


@pytest.mark.parametrize("owned,streamed", _distinct_candidate_tiles())
def test_every_candidate_tile_computes_the_reference(gen, owned, streamed):
    """Each alternative tile shape on a problem smaller than one tile in one direction and
    spanning several in the other (M = 150 rows, D = 24), unit rows and general rows, α
    differentiated: float32, except square's β, which runs in float64
    (fastalpha.testing.beta_jumps_under_rounding; a fresh seed moved one pair across μ in
    float32, and a quarter of the gradient with it)."""
    m, d = 150, 24
    z = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=1)
    cfg = blocks.BlockConfig(owned, streamed, 32, 32, True, 4, 2)
    for rule, unit in (("direct", True), ("square", False)):
        spec = make_spec(rule, normalize=unit, detach_alpha=False)
        dtype = torch.float64 if beta_jumps_under_rounding(spec, torch.float32) else torch.float32
        ref_rows, ref_grad = reference.closed_form_gradient(z, spec, None, 5, 140)
        rows, grad = launch.fused_loss_and_grad(z.to(dtype), spec, 5, 140, None, True, cfg)
        assert_close(rows, ref_rows, precision_of(dtype), f"{rule} loss rows")
        assert_close(grad, ref_grad, precision_of(dtype), f"{rule} grad")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [50, 100])
def test_gpu_ieee_float32_runs_a_shape_that_spills_nothing(gen, d):
    """On the GPU, with its own Triton and ptxas: every pass of an IEEE float32 call (inverse
    with β, general rows, row weights; D = 50 single-chunk, D = 100 in feature chunks) runs a
    shape of blocks.fallback_configs whose kernel keeps nothing in local memory (the static
    report proves one exists for each kernel under Triton 3.8), and the call matches the
    float64 reference."""
    torch.set_float32_matmul_precision("highest")
    m = 1000
    z = torch.randn(m, d, generator=gen, dtype=torch.float64)
    weight = torch.rand(m, generator=gen, dtype=torch.float64)
    spec = make_spec("inverse", normalize=False, detach_alpha=False)
    z_gpu, weight_gpu = z.float().cuda(), weight.float().cuda()
    with launch.recording_launches(torch.cuda.get_device_capability()[0]) as recorded:
        launch.fused_loss_and_grad(z_gpu, spec, 0, m, weight_gpu, True)
    assert recorded
    for item in recorded:
        chosen = launch._spill_free(item)
        compiled = item.kernel.warmup(*item.args, grid=item.grid, **item.launch_kwargs(chosen))
        compiled._init_handles()
        assert chosen in item.fallbacks and compiled.n_spills == 0, (
            f"{item.kind} pass: every shape of {item.fallbacks} spills (this GPU's ptxas)")
    rows, grad = launch.fused_loss_and_grad(z_gpu, spec, 0, m, weight_gpu, True)
    ref_rows, ref_grad = reference.closed_form_gradient(z, spec, weight, 0, m)
    assert_close(rows, ref_rows, precision_of(torch.float32), "loss rows")
    assert_close(grad, ref_grad, precision_of(torch.float32), "grad")

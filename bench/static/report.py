r"""The static GPU report: what ptxas made of every distinct kernel that the enumerated calls launch.

    python -m bench.static.report --jobs 2          # writes docs/gpu-static-report.{csv,md}
    python -m bench.static.report --reuse --jobs 2  # compiles only kernels without a current row
    python -m bench.static.report --count           # the call space and its kernels, no compiling

No GPU is needed. The calls of SECTIONS (bench/static/variants.py: the call space, its shape
classes and Triton's specialization key) are recorded from the launcher; every distinct
compiled kernel (kernel × constexprs × tile × warps × stages × specialization of the other
arguments) is compiled once, for sm_90 (H100/H200) or sm_80 (A100), down to a cubin, and read
back with the cuobjdump that ships with Triton. Per kernel the report gives registers, spill
bytes (stack frame + local memory), shared memory, the resident CTAs and warps per SM that
those allow, the products (`tt.dot` in the kernel's IR) and how many of them became warpgroup
MMAs (`ttng.warp_group_dot`, HGMMA in SASS), and the MMA instructions of the PTX.

A tensor-core kernel (bf16, fp16, tf32) is on the fast path when, on sm_90, every product is a
warpgroup MMA and the PTX has no `mma.sync` (on sm_80: it has `mma.sync`), it spills nothing,
and its shared memory fits one CTA (227 KiB on sm_90, 163 KiB on sm_80). IEEE float32 and
float64 kernels must stay off the 16-bit/TF32 tensor cores (float64 may use DMMA, `mma.sync`
with .f64 operands, which is exact).

The markdown header carries `inputs_hash` (variants.inputs_hash: the kernel sources, the
launcher, the tile tables, the enumeration and the Triton version) and every CSV row the hash
of the kernel sources it was compiled from, so that tests/test_triton_static.py can tell a
stale report from a current one without compiling.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import functools
import multiprocessing
import os
import re
import signal
import sys
import time

from . import variants
from .aot_check import _cuobjdump, compile_launch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CSV_PATH = os.path.join(REPO, "docs", "gpu-static-report.csv")
MD_PATH = os.path.join(REPO, "docs", "gpu-static-report.md")

TENSOR_CORE = ("bf16", "fp16", "tf32")
#: What is compiled, in this order: (name, arch, every autotuning candidate too?, variants.calls
#: arguments). First the kernels where registers are tightest (16-bit at D̂ = 128, where the
#: spills were found, at D = 128 and D = 100), then the small float64 and sm_80 samples, then
#: the tensor-core compute types at the other feature counts (D = 256 and 64, then the unaligned
#: D = 200, 50 and 100), and last the whole call space of variants.py (what is
#: left: IEEE float32), so that a partial run (`--budget`) proves the kernels the fast path
#: depends on first. A kernel is compiled once, in the first section that launches it; the
#: report says, section by section, how many of its kernels have a row.
SECTIONS = (
    ("bf16 D=128", 90, True, dict(computes=("bf16",), features=(128,))),
    ("bf16 D=100", 90, True, dict(computes=("bf16",), features=(100,))),
    ("tf32 D=128", 90, True, dict(computes=("tf32",), features=(128,))),
    ("fp16 D=128", 90, True, dict(computes=("fp16",), features=(128,))),
    ("float64", 90, False, dict(computes=("fp64",), features=(64,), rules=("direct",))),
    ("sm_80", 80, False, dict(computes=("bf16", "tf32"), features=(128,), rules=("direct",))),
    *((f"tensor cores D={d}", 90, True, dict(computes=TENSOR_CORE, features=(d,))) for d in (256, 64, 200, 50, 100)),
    ("space", 90, True, dict()),
)

#: Per-SM limits (CUDA occupancy tables): registers, shared memory per SM and per CTA (bytes),
#: shared memory reserved per CTA by the runtime, resident warps and CTAs.
SM_LIMITS = {
    90: dict(regs=65536, smem_sm=233472, smem_cta=232448, smem_reserved=1024, warps=64, ctas=32),
    80: dict(regs=65536, smem_sm=167936, smem_cta=166912, smem_reserved=1024, warps=64, ctas=32),
}

FIELDS = ["key", "section", "arch", "kernel", "compute", "D", "rule", "set_up", "tile", "num_warps", "num_stages", "role",
          "calls", "regs", "spill_bytes", "smem_bytes", "ctas_per_sm", "warps_per_sm", "dots", "wgmma_dots",
          "ptx_wgmma", "ptx_mma", "ptx_dmma", "fast_path", "first_call", "specialization", "constexprs", "source_hash", "triton"]


def source_hash() -> str:
    """The kernel sources and the Triton version: a row compiled from others is stale."""
    return variants.kernel_source_hash()


def inputs_hash() -> str:
    """Everything that decides which kernels the report compiles and what they compile to."""
    return variants.inputs_hash(repr(SECTIONS))


def occupancy(arch: int, regs: int, smem: int, num_warps: int) -> tuple[int, int]:
    """(resident CTAs, resident warps) per SM allowed by registers, shared memory and the caps.

    Registers are allocated per warp in units of 256 (i.e. per thread in multiples of 8);
    shared memory per CTA in units of 128 bytes plus the runtime's reserved 1 KiB.
    """
    lim = SM_LIMITS[arch]
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim["regs"] // per_warp) // num_warps
    per_cta = -(-smem // 128) * 128 + lim["smem_reserved"]
    by_smem = lim["smem_sm"] // per_cta if smem <= lim["smem_cta"] else 0
    ctas = min(by_regs, by_smem, lim["ctas"], lim["warps"] // num_warps)
    return ctas, ctas * num_warps


def verdict(arch: int, compute: str, usage: dict) -> str:
    """'yes' / 'NO: why' for the fast-path rule of the module docstring."""
    problems = []
    if usage["spill_bytes"]:
        problems.append(f"spills {usage['spill_bytes']} B")
    if usage["shared"] > SM_LIMITS[arch]["smem_cta"]:
        problems.append("shared memory over the per-CTA limit")
    if compute in TENSOR_CORE:
        if arch >= 90 and (usage["wgmma_dots"] != usage["dots"] or usage["ptx_mma"] > 0):
            problems.append(f"{usage['wgmma_dots']} of {usage['dots']} products on wgmma, {usage['ptx_mma']} mma.sync")
        if arch < 90 and usage["ptx_mma"] == 0:
            problems.append("no mma.sync")
    elif usage["ptx_wgmma"] or usage["ptx_mma"] > usage["ptx_dmma"]:
        # float64 products may run on the float64 tensor cores (mma.sync .f64: DMMA, exact).
        problems.append("16-bit or TF32 tensor-core instructions in an IEEE float32/float64 kernel")
    return "NO: " + "; ".join(problems) if problems else "yes"


def usage_of(compiled) -> dict:
    """Registers, spills and shared memory (cuobjdump), the products and their lowering (IR, PTX)."""
    text = _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    ptx = compiled.asm["ptx"]
    return {
        "regs": int(found.get("REG", -1)),
        # ptxas puts spilled registers on the stack frame (STACK) or in local memory (LOCAL).
        "spill_bytes": int(found.get("STACK", 0)) + int(found.get("LOCAL", 0)),
        "shared": compiled.metadata.shared,
        "dots": len(re.findall(r"\btt\.dot\b", compiled.asm["ttir"])),
        "wgmma_dots": len(re.findall(r"\bttng\.warp_group_dot\b", compiled.asm["ttgir"])),
        "ptx_wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        "ptx_mma": len(re.findall(r"\bmma\.sync\b", ptx)),
        "ptx_dmma": len(re.findall(r"\bmma\.sync\.\S*\.f64\.f64\.f64\.f64\b", ptx)),
    }


@functools.lru_cache(maxsize=None)
def section_kernels(index: int) -> dict:
    """key → variants.Kernel of SECTIONS[index]."""
    _, arch, tuned, selection = SECTIONS[index]
    return variants.kernels(variants.calls(**selection), arch, tuned)


@functools.lru_cache(maxsize=None)
def planned() -> tuple[tuple[int, variants.Kernel], ...]:
    """(section index, kernel) of every kernel the report compiles, deduplicated per arch."""
    seen, out = set(), []
    for index, (_, arch, _, _) in enumerate(SECTIONS):
        for key, kernel in section_kernels(index).items():
            if (arch, key) not in seen:
                seen.add((arch, key))
                out.append((index, kernel))
    return tuple(out)


def _specialization_text(spec: tuple) -> str:
    """The specialized non-constexpr arguments, compactly: name=1 (constexpr 1) or name:16 (divisible)."""
    out = []
    for name, kind, attr in spec:
        if kind == "constexpr" and attr == "1":
            out.append(f"{name}=1")
        elif attr == "D":
            out.append(f"{name}:16")
    return " ".join(out)


def shape_columns(config) -> tuple[str, str, str]:
    """A tile shape (blocks.BlockConfig) as the CSV's `tile`, `num_warps` and `num_stages`."""
    return f"{config.block_m}x{config.block_n}", str(config.num_warps), str(config.num_stages)


def compile_kernel(index: int, kernel: variants.Kernel, digest: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    from fastalpha.backends.triton.launch import first_spill_free

    name, arch, _, _ = SECTIONS[index]
    item, call = kernel.launch, kernel.call
    usages = {}

    def spills(config) -> int:
        kwargs = {**item.launch_kwargs(config), "UPCAST": False}
        usages[config] = usage_of(compile_launch(item.kernel, item.args, kwargs, GPUTarget("cuda", arch, 32)))
        return usages[config]["spill_bytes"]

    # Where the launch chooses among shapes, the one it launches (launch._spill_free).
    config = first_spill_free(variants.fallbacks_of(item, kernel.config) or (kernel.config,), spills)
    kwargs, usage = {**item.launch_kwargs(config), "UPCAST": False}, usages[config]
    tile, num_warps, num_stages = shape_columns(config)
    ctas, warps = occupancy(arch, usage["regs"], usage["shared"], config.num_warps)
    spec = variants.specialization(item, config, arch)
    row = dict(key=kernel.key, section=name, arch=arch, kernel=item.kind, compute=call.compute, D=call.d, rule=call.rule,
               set_up=call.set_up, tile=tile, num_warps=num_warps, num_stages=num_stages, role=kernel.role,
               calls=kernel.calls, regs=usage["regs"],
               spill_bytes=usage["spill_bytes"], smem_bytes=usage["shared"], ctas_per_sm=ctas, warps_per_sm=warps,
               dots=usage["dots"], wgmma_dots=usage["wgmma_dots"], ptx_wgmma=usage["ptx_wgmma"], ptx_mma=usage["ptx_mma"],
               ptx_dmma=usage["ptx_dmma"],
               fast_path=verdict(arch, call.compute, usage), first_call=call.name,
               specialization=_specialization_text(spec),
               constexprs=" ".join(f"{k}={v}" for k, v in sorted(kwargs.items())), source_hash=digest,
               triton=triton.__version__)
    return {k: str(row[k]) for k in FIELDS}


def read_rows(path: str = CSV_PATH) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: dict) -> tuple:
    return row["arch"], row["key"]


def write_csv(rows: list[dict], path: str = CSV_PATH) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _md_table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return out


def coverage(rows: list[dict]) -> list[tuple[str, int, int, int]]:
    """(section, calls, kernels first launched in it, of those with a row in `rows`) per section."""
    present = {row_key(r) for r in rows}
    first = collections.Counter(index for index, _ in planned())
    done = collections.Counter(index for index, kernel in planned() if (str(SECTIONS[index][1]), kernel.key) in present)
    return [(name, sum(1 for _ in variants.calls(**selection)), first[index], done[index])
            for index, (name, _, _, selection) in enumerate(SECTIONS)]


def coverage_lines(rows: list[dict]) -> list[str]:
    """The report's statement of what it proves: per section, how many of its kernels are compiled."""
    lines = []
    for (name, calls, kernels, done), (_, arch, tuned, _) in zip(coverage(rows), SECTIONS):
        status = "complete" if done == kernels else f"{100 * done / kernels:.1f} %, the rest not compiled"
        lines.append(f"- **{name}** (sm_{arch}, {'static tile and every autotuning candidate' if tuned else 'static tile'}): "
                     f"{calls} calls, {kernels} kernels not in an earlier section, **{done} compiled** ({status}).")
    return lines


def _space_lines() -> list[str]:
    return coverage_lines(read_rows())


def render_markdown(rows: list[dict], seconds: float | None = None, jobs: int = 1, compiled: int = 0) -> str:
    """docs/gpu-static-report.md from the CSV rows."""
    triton_versions = sorted({r["triton"] for r in rows})
    definition = variants.DEFINITION
    lines = [
        "# Static GPU report of the Triton kernels",
        "",
        "Generated by `python -m bench.static.report --reuse --jobs 2` (no GPU needed; one row per",
        "distinct compiled kernel in `gpu-static-report.csv`; `--reuse` compiles only the kernels",
        "without a current row, `--budget MINUTES` stops and writes what is done, `--count` counts the",
        f"call space without compiling). Each kernel is compiled by Triton {', '.join(triton_versions)} down to a",
        "cubin and read back with the `cuobjdump` that ships with Triton: registers per thread, spill bytes",
        "(stack frame + local memory), shared memory per CTA, the resident CTAs and warps per SM",
        "that registers and shared memory allow (occupancy tables: 64K registers, 228 KiB (sm_90) /",
        "164 KiB (sm_80) shared memory and 64 warps per SM), the products (`dots`: `tt.dot` in the",
        "kernel's IR) and how many became warpgroup MMAs (`wgmma_dots`), and the MMA instructions",
        "of the PTX (`ptx_wgmma`: `wgmma.mma_async`, HGMMA in SASS; `ptx_mma`: `mma.sync`, HMMA,",
        "of which `ptx_dmma` with float64 operands, DMMA).",
        "",
        "## The call space and its kernels",
        "",
        "A call (bench/static/variants.py) is a point of",
        "",
    ]
    lines += [f"- {axis}: {values}" for axis, values in definition]
    lines += [
        "",
        "and launches 1–4 kernels, each with the static tile or any autotuning candidate",
        "(blocks.candidate_configs); an IEEE float32 launch, which is not tuned, compiles the shapes",
        "of blocks.fallback_configs in order and runs the first that spills nothing, and its row is",
        "that shape's kernel (its `tile`, `num_warps`, `num_stages`). Triton compiles one kernel per",
        "kernel × constexprs × tile × warps × stages × *specialization*: an integer argument equal to 1 becomes the constexpr 1,",
        "one divisible by 16 is marked so (`tt.divisibility`), a tensor is marked when its address is",
        "a multiple of 16 bytes; floats are never specialized. The kernels' size arguments (C, half,",
        "row_lo, row_hi, m_bucket) are `do_not_specialize` and the launcher hands them only 16-byte",
        "aligned tensors, so what is left (D and the row strides) follows from D: the space is",
        "recorded at one size, and its kernels, deduplicated on Triton's own key (variants.kernel_key),",
        "are every kernel a call of the space can launch, at any batch size, queue length or row",
        "range. The sections below are compiled in this order, each kernel once, in the first",
        "section that launches it; **a kernel without a row is not proven**:",
        "",
    ]
    lines += coverage_lines(rows)
    lines += [
        "",
        "**Fast path** (`fast_path` = yes): a bf16/fp16/tf32 kernel's products are all warpgroup",
        "MMAs on sm_90 (`wgmma_dots` = `dots`, `ptx_mma` = 0) or warp MMAs on sm_80 (`ptx_mma` > 0),",
        "it spills nothing, and its shared memory fits a CTA (227 KiB sm_90, 163 KiB sm_80). IEEE",
        "float32 (`fp32`, PyTorch's default `torch.get_float32_matmul_precision() == \"highest\"`)",
        "and float64 stay off the 16-bit/TF32 tensor cores by design (float64 products may run as",
        "DMMA, exact float64); TF32 is opt-in with",
        "`torch.set_float32_matmul_precision(\"high\")`. What spilled was withheld from the",
        "autotuning candidates of that pass in one place (`blocks._WITHHELD`, with the reason).",
        "",
        f"Inputs hash: `{inputs_hash()}` (kernel sources, launcher, tile tables, enumeration, Triton",
        f"version); kernel source hash: {', '.join(sorted({r['source_hash'] for r in rows}))}.",
        "",
        f"**{len(rows)} kernels compiled** of the {len(planned())} of the space and its samples "
        f"({100 * len(rows) / len(planned()):.1f} %); {sum(r['role'] == 'candidate' for r in rows)} of them autotuning "
        f"candidates; {sum(int(r['spill_bytes']) > 0 for r in rows)} spill; max shared memory "
        f"{max((int(r['smem_bytes']) for r in rows), default=0) / 1024:.1f} KiB.",
        "",
        "## Summary",
        "",
    ]
    summary = []
    for name, _, _, _ in SECTIONS:
        for compute in variants.COMPUTE_TYPES:
            for kernel in ("row", "column", "sparsemax"):
                sel = [r for r in rows if r["section"] == name and r["compute"] == compute and r["kernel"] == kernel]
                if not sel:
                    continue
                summary.append(dict(
                    section=name, compute=compute, kernel=kernel, kernels=len(sel),
                    fast_path=f"{sum(r['fast_path'] == 'yes' for r in sel)}/{len(sel)}",
                    spilling=sum(int(r["spill_bytes"]) > 0 for r in sel), max_regs=max(int(r["regs"]) for r in sel),
                    max_smem_KiB=f"{max(int(r['smem_bytes']) for r in sel) / 1024:.1f}",
                    min_warps_per_sm=min(int(r["warps_per_sm"]) for r in sel)))
    lines += _md_table(summary, ["section", "compute", "kernel", "kernels", "fast_path", "spilling", "max_regs",
                                 "max_smem_KiB", "min_warps_per_sm"])
    by_set_up = []
    for set_up in variants.SET_UPS:
        sel = [r for r in rows if r["set_up"] == set_up]
        if sel:
            by_set_up.append(dict(set_up=set_up, kernels=len(sel),
                                  fast_path=f"{sum(r['fast_path'] == 'yes' for r in sel)}/{len(sel)}",
                                  max_regs=max(int(r["regs"]) for r in sel)))
    lines += ["", "Per set-up (of the first call that launches each kernel):", ""]
    lines += _md_table(by_set_up, ["set_up", "kernels", "fast_path", "max_regs"])
    misses = [r for r in rows if r["fast_path"] != "yes"]
    lines += ["", f"Kernels off the fast path: {len(misses)}."]
    if misses:
        lines += [""] + _md_table(misses[:200], ["section", "kernel", "compute", "D", "tile", "num_warps", "num_stages",
                                                 "fast_path", "first_call"])
    heaviest = sorted(rows, key=lambda r: (-int(r["regs"]), r["key"]))[:40]
    lines += ["", "## The 40 kernels with the most registers", ""]
    lines += _md_table(heaviest, ["section", "kernel", "compute", "D", "tile", "num_warps", "num_stages", "role", "regs",
                                  "spill_bytes", "smem_bytes", "first_call"])
    lines += ["", "`tile` is owned × streamed rows (blocks.py); `first_call` is the first call of the space that",
              "launches the kernel, `calls` (CSV) how many (call, tile) pairs launch it; the CSV's",
              "`specialization` lists the specialized arguments (`name=1`, `name:16`) and `constexprs` the rest."]
    if seconds is not None and compiled:
        lines += ["", f"Compiling the {compiled} kernels that were not reused took {seconds / 60:.0f} min with {jobs} compiler "
                      f"process(es) on the machine that generated it."]
    return "\n".join(lines) + "\n"


def _compile_in_worker(index: int, call, key: str, digest: str):
    """Compile one kernel in a worker: the call is re-recorded there (recording is deterministic)."""
    import torch
    torch.set_num_threads(1)     # recording runs small CPU ops; threads only contend
    _, arch, tuned, _ = SECTIONS[index]
    try:
        found = variants.kernels([call], arch, tuned)
        return index, compile_kernel(index, found[key], digest), None
    except Exception as err:  # report every failing kernel, not just the first
        return index, None, f"FAILED {SECTIONS[index][0]} {key} ({call.name}): {type(err).__name__}: " + (
            str(err).splitlines()[0] if str(err) else "")


def _progress(row: dict) -> str:
    return (f"{row['section']:13s} {row['kernel']:9s} {row['compute']} D={row['D']:>3s} {row['tile']:>6s} "
            f"w{row['num_warps']} s{row['num_stages']} regs={row['regs']:>3s} spill={row['spill_bytes']} "
            f"smem={row['smem_bytes']:>6s} dots={row['wgmma_dots']}/{row['dots']}  {row['fast_path']}")


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def count() -> int:
    """Print the call space, section by section, as calls and distinct kernels (no compiling)."""
    for line in _space_lines():
        print(line)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", action="store_true",
                        help="keep CSV rows whose kernel and kernel-source hash are unchanged; compile the rest")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--budget", type=float, default=None,
                        help="minutes of compiling, then stop and write the partial report (resume with --reuse)")
    parser.add_argument("--pause-while", default=None,
                        help="a path: while it exists, start no new compile (the CPU is wanted elsewhere)")
    parser.add_argument("--csv", default=CSV_PATH)
    parser.add_argument("--md", default=MD_PATH)
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the CSV")
    parser.add_argument("--count", action="store_true", help="count the call space's calls and kernels; compile nothing")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this tool compiles the real kernels")
    import torch
    torch.set_num_threads(1)     # recording runs small CPU ops; threads only contend
    if args.count:
        return count()
    if args.render_only:
        with open(args.md, "w") as f:
            f.write(render_markdown(read_rows(args.csv)))
        return 0
    digest = source_hash()
    old = {row_key(r): r for r in read_rows(args.csv) if r["source_hash"] == digest} if args.reuse else {}
    todo = planned()

    def of_the_space(i: int, row: dict) -> dict:
        """The row with its place in today's space: section, first call, role and how many
        (call, tile) pairs launch the kernel (a worker sees only the one call it recorded)."""
        index, kernel = todo[i]
        return {**row, "section": SECTIONS[index][0], "calls": str(kernel.calls), "role": kernel.role,
                "first_call": kernel.call.name, "rule": kernel.call.rule, "set_up": kernel.call.set_up}

    done = {}
    for i, (index, kernel) in enumerate(todo):
        row = old.get((str(SECTIONS[index][1]), kernel.key))
        if row is not None:
            done[i] = of_the_space(i, row)
    missing = [i for i in range(len(todo)) if i not in done]
    failures, started = 0, time.time()

    def finished(i, row, error):
        nonlocal failures
        if error:
            failures += 1
            print(error, flush=True)
            return
        done[i] = of_the_space(i, row)
        print(_progress(row), flush=True)
        if len(done) % 50 == 0:
            save_so_far()

    def save_so_far():
        """The CSV with every row compiled so far and the old rows not yet recompiled, so that
        an interrupted run (a kill, Ctrl-C, the end of a session) resumes with --reuse."""
        kept = {row_key(done[j]) for j in done}
        write_csv([done[j] for j in sorted(done)] + [r for k, r in old.items() if k not in kept], args.csv)

    reused = len(done)
    print(f"{len(todo)} kernels, {reused} reused, {len(missing)} to compile with {args.jobs} process(es)", flush=True)
    jobs = iter([(i, todo[i][0], todo[i][1].call, todo[i][1].key) for i in missing])
    deadline = None if args.budget is None else started + 60 * args.budget

    def next_job():
        """The next kernel to compile, after any pause; None when done or out of budget."""
        while args.pause_while and os.path.exists(args.pause_while):
            time.sleep(30)
        if deadline is not None and time.time() > deadline:
            return None
        return next(jobs, None)

    # Spawned, not forked: a fork of a process that has run torch may hang in OpenMP. At most
    # two kernels per process in flight, so that a pause or the budget takes effect soon.
    context = multiprocessing.get_context("spawn")
    # SIGTERM (kill, a session's end) unwinds like Ctrl-C, so that what was compiled is saved.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            running = {}
            while True:
                while len(running) < 2 * args.jobs and (job := next_job()) is not None:
                    i, index, call, key = job
                    running[pool.submit(_compile_in_worker, index, call, key, digest)] = i
                if not running:
                    break
                finished_now, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in finished_now:
                    _, row, error = future.result()
                    finished(running.pop(future), row, error)
    except KeyboardInterrupt:
        save_so_far()
        print(f"interrupted: {len(done) - reused} kernels compiled, saved to {args.csv} (resume with --reuse)")
        return 130
    rows = [done[i] for i in sorted(done)]
    write_csv(rows, args.csv)
    with open(args.md, "w") as f:
        f.write(render_markdown(rows, time.time() - started, args.jobs, len(done) - reused))
    misses = sum(r["fast_path"] != "yes" for r in rows)
    print(f"{len(rows)} kernels, {failures} failed to compile, {misses} off the fast path -> {args.csv}, {args.md}")
    return 1 if failures or misses else 0


if __name__ == "__main__":
    sys.exit(main())

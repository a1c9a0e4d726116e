r"""The static GPU report: what ptxas made of every kernel variant a real call launches.

    python -m bench.static.report            # writes docs/gpu-static-report.{csv,md}
    python -m bench.static.report --reuse    # recompiles only rows that are missing or stale
    python -m bench.static.report --jobs 2   # N compiler processes

No GPU is needed: each variant is recorded from the launcher (aot_check.record), compiled for
sm_90 (H100/H200) and sm_80 (A100) down to a cubin, and read back with Triton's cuobjdump.
Per variant the report gives registers, spill bytes, shared memory, the resident CTAs and
warps per SM that those allow, and the SASS instruction mix (HGMMA, HMMA, FFMA, DFMA, MUFU,
local loads/stores).

The matrix (SECTIONS): the calls

    direct          α detached, unit rows (normalize=True): ONLINE row pass + column pass
    infonce         NT-Xent (ε = 1), unit rows: ONLINE row pass with the log-loss, column pass
    direct-rows     `direct` with normalize=False (d2 from the norms)
    entropy-beta    `entropy` with detach_alpha=False: statistics pass, FIXED row pass with β
                    (k = 1), column pass with β
    direct-beta-w   detach_alpha=False with row weights (reduction="none" backward), k = 2
    square-beta-w   sparsemax threshold pass, FIXED row and column passes with β, weighted

in the negative set-ups SET_UPS (negatives all, cross, none, each with and without a queue
where the set-up has a pair at all, and the grouped call of labels or V ≥ 3 views), each
with every autotuning candidate that the launcher
records for each of its passes (blocks.candidate_configs: autotuning may pick any of them):
every call in every set-up for bf16, fp16 and tf32 at D ∈ {64, 128, 256}, the light calls (the
first three) at D = 32 with SimCLR's set; IEEE float32 and float64 (D = 64, `direct`) on sm_90
and bf16/tf32 at D = 128 on sm_80 (static table) in every set-up.
The negative set, the queue and the groups are constexprs (NEGATIVES, QUEUE, GROUPS: the mask
and the tile ranges of tiles.py), so every set-up is its own compiled kernel; other rules and flags change only
elementwise code of the same kernels. A tensor-core variant
is on the fast path when its products are all warpgroup MMAs on sm_90 (HGMMA > 0, HMMA = 0) or
warp MMAs on sm_80 (HMMA > 0), it spills nothing and its shared memory fits one CTA (227 KiB on
sm_90, 163 KiB on sm_80). IEEE float32 and float64 variants must stay off the tensor cores
(FFMA / DFMA only).

Each CSV row carries a hash of the kernel sources, so a test can tell a stale report from a
current one without compiling (tests/test_triton_static.py).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import functools
import hashlib
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass

from fastalpha import kernels

from .aot_check import SASS_OPCODES, compile_launch, record, resource_usage

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
#: The kernel sources hashed into every row: those of the kernels the launcher imports.
KERNELS_DIR = os.path.dirname(os.path.abspath(kernels.__file__))
CSV_PATH = os.path.join(REPO, "docs", "gpu-static-report.csv")
MD_PATH = os.path.join(REPO, "docs", "gpu-static-report.md")

DIMS = (32, 64, 128, 256)
COMPUTES = ("bf16", "fp16", "tf32", "fp32", "fp64")
TENSOR_CORE = ("bf16", "fp16", "tf32")
#: name: (rule, detach_alpha, weighted, eps, unit rows)
CASES = {
    "direct": ("direct", True, False, None, True),
    "infonce": ("infonce", True, False, 1.0, True),
    "direct-rows": ("direct", True, False, None, False),
    "entropy-beta": ("entropy", False, False, None, True),
    "direct-beta-w": ("direct", False, True, None, True),
    "square-beta-w": ("square", False, True, None, True),
}
LIGHT = ("direct", "infonce", "direct-rows")
#: Queue rows K of the set-ups with a queue (any K > 0 compiles the same kernels).
QUEUE_ROWS = 64
#: name: (negatives, queue rows, labels). "none" without a queue has no pair: the launcher
#: returns before any kernel. "labels" is the grouped call (label-defined positives, or more
#: than two views: the GROUPS constexpr, negatives "all", no queue).
SET_UPS = {
    "all": ("all", 0, False),
    "all+queue": ("all", QUEUE_ROWS, False),
    "cross": ("cross", 0, False),
    "cross+queue": ("cross", QUEUE_ROWS, False),
    "none+queue": ("none", QUEUE_ROWS, False),
    "labels": ("all", 0, True),
}
#: The matrix, section by section: (arch, compute types, D values, calls, set-ups, autotuning
#: candidates too?), most demanding first. Every call in every set-up with every candidate for
#: each tensor-core type at D = 64, 128 and 256; the light calls at D = 32 with SimCLR's set;
#: IEEE float32 / float64 and sm_80 with the static table in every set-up.
SECTIONS = (
    (90, TENSOR_CORE, (256, 128, 64), tuple(CASES), tuple(SET_UPS), True),
    (90, TENSOR_CORE, (32,), LIGHT, ("all",), True),
    (90, ("fp32", "fp64"), (64,), ("direct",), tuple(SET_UPS), False),
    (80, ("bf16", "tf32"), (128,), ("direct",), tuple(SET_UPS), False),
)
ARCHS = (90, 80)

#: Per-SM limits (CUDA occupancy tables): registers, shared memory per SM and per CTA (bytes),
#: shared memory reserved per CTA by the runtime, resident warps and CTAs.
SM_LIMITS = {
    90: dict(regs=65536, smem_sm=233472, smem_cta=232448, smem_reserved=1024, warps=64, ctas=32),
    80: dict(regs=65536, smem_sm=167936, smem_cta=166912, smem_reserved=1024, warps=64, ctas=32),
}

FIELDS = ["arch", "kernel", "case", "set_up", "compute", "D", "tile", "num_warps", "num_stages", "role",
          "regs", "spill_bytes", "smem_bytes", "ctas_per_sm", "warps_per_sm",
          "hgmma", "hmma", "ffma", "dfma", "mufu", "ldl", "stl", "fast_path", "constexprs", "source_hash", "triton"]

KERNEL_SOURCES = ("row_pass.py", "column_pass.py", "sparsemax.py", "tiles.py")


def source_hash() -> str:
    """A short hash of the kernel sources: a report row compiled from other sources is stale."""
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        with open(os.path.join(KERNELS_DIR, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


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
        if arch >= 90 and (usage["hgmma"] == 0 or usage["hmma"] > 0):
            problems.append(f"HGMMA {usage['hgmma']}, HMMA {usage['hmma']}")
        if arch < 90 and usage["hmma"] == 0:
            problems.append("no HMMA")
    elif usage["hgmma"] or usage["hmma"]:
        problems.append("tensor-core instructions in an IEEE/fp64 variant")
    return "NO: " + "; ".join(problems) if problems else "yes"


@dataclass(frozen=True)
class Variant:
    arch: int
    compute: str
    d: int
    case: str
    set_up: str          # a key of SET_UPS
    launch: object       # launch.Launch
    config: object       # blocks.BlockConfig
    role: str            # "static" or "candidate"

    @property
    def constexprs(self) -> str:
        return " ".join(f"{k}={v}" for k, v in sorted(self.launch.kwargs.items()))

    @property
    def key(self) -> tuple:
        c = self.config
        return (str(self.arch), self.launch.kind, self.compute, str(self.d), f"{c.block_m}x{c.block_n}",
                str(c.num_warps), str(c.num_stages), self.constexprs)


def variants(sections=SECTIONS, archs=ARCHS):
    """Every distinct variant of the matrix (deduplicated across calls), in report order."""
    seen = set()
    for arch, computes, dims, cases, set_ups, tuned in sections:
        if arch not in archs:
            continue
        for compute in computes:
            for d in dims:
                for set_up in set_ups:
                    negatives, queue, labels = SET_UPS[set_up]
                    for name in cases:
                        rule, detach, weighted, eps, unit = CASES[name]
                        for item in record(compute, d, rule, detach, weighted, unit=unit, eps=eps,
                                           negatives=negatives, queue=queue, labels=labels):
                            for cfg in (item.candidates if tuned else (item.config,)):
                                v = Variant(arch, compute, d, name, set_up, item, cfg,
                                            "static" if cfg == item.config else "candidate")
                                if v.key not in seen:
                                    seen.add(v.key)
                                    yield v


def row_key(row: dict) -> tuple:
    tile = row["tile"]
    return (row["arch"], row["kernel"], row["compute"], row["D"], tile, row["num_warps"], row["num_stages"], row["constexprs"])


def read_rows(path: str = CSV_PATH) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def compile_variant(v: Variant, digest: str) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    kwargs = v.launch.launch_kwargs(v.config)
    usage = resource_usage(compile_launch(v.launch.kernel, v.launch.args, kwargs, GPUTarget("cuda", v.arch, 32)))
    ctas, warps = occupancy(v.arch, usage["regs"], usage["shared"], v.config.num_warps)
    c = v.config
    row = dict(arch=v.arch, kernel=v.launch.kind, case=v.case, set_up=v.set_up, compute=v.compute, D=v.d, tile=f"{c.block_m}x{c.block_n}",
               num_warps=c.num_warps, num_stages=c.num_stages, role=v.role, regs=usage["regs"],
               spill_bytes=usage["spill_bytes"], smem_bytes=usage["shared"], ctas_per_sm=ctas, warps_per_sm=warps,
               fast_path=verdict(v.arch, v.compute, usage), constexprs=v.constexprs, source_hash=digest,
               triton=triton.__version__)
    row.update({name.lower(): usage[name.lower()] for name in SASS_OPCODES})
    return {k: str(row[k]) for k in FIELDS}


def write_csv(rows: list[dict], path: str = CSV_PATH) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _md_table(rows: list[dict], columns: list[str]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(r[c] for c in columns) + " |" for r in rows]
    return out


def render_markdown(rows: list[dict], seconds: float | None = None, jobs: int = 1) -> str:
    """docs/gpu-static-report.md from the CSV rows."""
    triton_versions = sorted({r["triton"] for r in rows})
    hashes = sorted({r["source_hash"] for r in rows})
    lines = [
        "# Static GPU report of the Triton kernels",
        "",
        "Generated by `python -m bench.static.report` (no GPU needed; full data in",
        "`gpu-static-report.csv`). Every kernel variant that the calls below launch is compiled by",
        f"Triton {', '.join(triton_versions)} down to a cubin for sm_90 (H100/H200) and sm_80 (A100) and read",
        "back with the `cuobjdump` that ships with Triton: registers per thread, spill bytes (stack",
        "frame + local memory), shared memory per CTA, the resident CTAs and warps per SM that",
        "registers and shared memory allow (occupancy tables: 64K registers, 228 KiB (sm_90) /",
        "164 KiB (sm_80) shared memory and 64 warps per SM), and SASS instruction counts (static",
        "counts in the binary, not executed counts).",
        "",
        "Calls: `direct` (α detached, unit rows i.e. `normalize=True`: row pass + column pass, the",
        "default call), `infonce` (NT-Xent, ε = 1), `direct-rows` (`direct` with `normalize=False`),",
        "`entropy-beta` (`entropy` with `detach_alpha=False`: statistics pass, row pass with β, column",
        "pass with β), `direct-beta-w` (`detach_alpha=False` with row weights) and `square-beta-w`",
        "(sparsemax threshold pass, row and column passes with β, weighted). Negative set-ups",
        "(`set_up`): `negatives=\"all\"`, `\"cross\"` and `\"none\"`, with a queue of",
        f"{QUEUE_ROWS} rows (`+queue`) and, except `none`, without one; each set-up compiles its own",
        "kernels (the NEGATIVES and QUEUE constexprs). The matrix: every call in every set-up at the",
        "largest single-chunk D of each tensor-core type (bf16/fp16 D = 256, tf32 D = 128), where",
        "registers and shared memory are tightest; the light calls (`direct`, `infonce`,",
        "`direct-rows`) for bf16, fp16 and tf32 at D ∈ {32, 64, 128, 256} with `all`, at D = 64 and",
        "128 in every set-up, and tf32's chunked D = 256 in every set-up; `direct` in IEEE float32",
        "and float64 at D = 64 and on sm_80 (static table, bf16 and tf32 at D = 128) in every set-up.",
        "Every autotuning candidate that the launcher records for a pass (`role` = candidate) is",
        "compiled besides the static table (blocks.candidate_configs, without the one shape",
        "blocks._WITHHELD keeps from the tf32 β row pass at D = 128, which spilled). Other rules",
        "and flags change only elementwise code of the same kernels.",
        "",
        "**Fast path** (`fast_path` = yes): a bf16/fp16/tf32 variant's products are all warpgroup",
        "MMAs on sm_90 (HGMMA > 0 and HMMA = 0) or warp MMAs on sm_80 (HMMA > 0), it spills nothing,",
        "and its shared memory fits a CTA (227 KiB sm_90, 163 KiB sm_80). IEEE float32 (`fp32`,",
        "PyTorch's default `torch.get_float32_matmul_precision() == \"highest\"`) and float64 stay",
        "off the tensor cores by design (FFMA / DFMA, no HGMMA/HMMA); TF32 is opt-in with",
        "`torch.set_float32_matmul_precision(\"high\")` or `torch.backends.cuda.matmul.allow_tf32 = True`.",
        "",
        f"Kernel source hash: {', '.join(hashes)}.",
        "",
        f"**{len(rows)} variants**: {sum(r['arch'] == '90' for r in rows)} on sm_90, "
        f"{sum(r['arch'] == '80' for r in rows)} on sm_80; "
        f"{sum(r['role'] == 'candidate' for r in rows)} of them autotuning candidates.",
        "",
        "## Summary",
        "",
    ]
    summary = []
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        for compute in COMPUTES:
            sel = [r for r in rows if r["arch"] == arch and r["compute"] == compute]
            if not sel:
                continue
            fast = sum(r["fast_path"] == "yes" for r in sel)
            summary.append(dict(
                arch=f"sm_{arch}", compute=compute, variants=str(len(sel)), fast_path=f"{fast}/{len(sel)}",
                spilling=str(sum(int(r["spill_bytes"]) > 0 for r in sel)),
                max_regs=str(max(int(r["regs"]) for r in sel)),
                max_smem_KiB=f"{max(int(r['smem_bytes']) for r in sel) / 1024:.1f}",
                min_warps_per_sm=str(min(int(r["warps_per_sm"]) for r in sel)),
                with_hgmma=str(sum(int(r["hgmma"]) > 0 for r in sel)),
                with_hmma=str(sum(int(r["hmma"]) > 0 for r in sel)),
            ))
    lines += _md_table(summary, ["arch", "compute", "variants", "fast_path", "spilling", "max_regs", "max_smem_KiB",
                                 "min_warps_per_sm", "with_hgmma", "with_hmma"])
    by_set_up = []
    for set_up in SET_UPS:
        sel = [r for r in rows if r["set_up"] == set_up]
        if sel:
            by_set_up.append(dict(
                set_up=set_up, variants=str(len(sel)), fast_path=f"{sum(r['fast_path'] == 'yes' for r in sel)}/{len(sel)}",
                spilling=str(sum(int(r["spill_bytes"]) > 0 for r in sel)), max_regs=str(max(int(r["regs"]) for r in sel)),
                max_smem_KiB=f"{max(int(r['smem_bytes']) for r in sel) / 1024:.1f}"))
    lines += ["", "Per negative set-up (all architectures and compute types):", ""]
    lines += _md_table(by_set_up, ["set_up", "variants", "fast_path", "spilling", "max_regs", "max_smem_KiB"])
    misses = [r for r in rows if r["fast_path"] != "yes"]
    lines += ["", f"Variants off the fast path: {len(misses)}."]
    if misses:
        lines += [""] + _md_table(misses, ["arch", "kernel", "case", "set_up", "compute", "D", "tile", "num_warps",
                                           "num_stages", "fast_path"])
    columns = ["kernel", "case", "set_up", "compute", "D", "tile", "num_warps", "num_stages", "role", "regs", "spill_bytes",
               "smem_bytes", "ctas_per_sm", "warps_per_sm", "hgmma", "hmma", "ffma", "dfma", "mufu", "fast_path"]
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        lines += ["", f"## sm_{arch}", ""]
        lines += _md_table([r for r in rows if r["arch"] == arch], columns)
    lines += ["", "`tile` is owned × streamed rows (blocks.py); `case` is the first call of the list that",
              "launches the variant (later calls reuse it). The `constexprs` column of the CSV has the",
              "rule flags of each variant."]
    if seconds is not None:
        lines += ["", f"Compiling the variants that were not reused took {seconds:.0f} s with {jobs} compiler "
                      f"process(es) on the machine that generated it."]
    return "\n".join(lines) + "\n"


@functools.lru_cache(maxsize=8)
def _recorded(compute: str, d: int, case: str, set_up: str) -> tuple:
    rule, detach, weighted, eps, unit = CASES[case]
    negatives, queue, labels = SET_UPS[set_up]
    return tuple(record(compute, d, rule, detach, weighted, unit=unit, eps=eps, negatives=negatives, queue=queue,
                        labels=labels))


def _compile_job(v: Variant) -> tuple:
    """What a compiler process needs to find a variant again: its call and its key (the
    launches are re-recorded there; recording is deterministic)."""
    return v.arch, v.compute, v.d, v.case, v.set_up, v.role, v.key


def _compile_in_worker(index: int, job: tuple, digest: str):
    arch, compute, d, case, set_up, role, key = job
    try:
        v = next(Variant(arch, compute, d, case, set_up, item, cfg, role)
                 for item in _recorded(compute, d, case, set_up) for cfg in item.candidates
                 if Variant(arch, compute, d, case, set_up, item, cfg, role).key == key)
        return index, compile_variant(v, digest), None
    except Exception as err:  # report every failing variant, not just the first
        return index, None, (f"FAILED sm_{arch} {compute} D={d} {case} {set_up} {key[1]} {key[4]}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _progress(row: dict) -> str:
    return (f"sm_{row['arch']} {row['kernel']:9s} {row['compute']} D={row['D']:>3s} {row['set_up']:11s} {row['tile']:>6s} "
            f"w{row['num_warps']} s{row['num_stages']} regs={row['regs']:>3s} spill={row['spill_bytes']} "
            f"smem={row['smem_bytes']:>6s} hgmma={row['hgmma']:>3s} hmma={row['hmma']:>3s}  {row['fast_path']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reuse", action="store_true",
                        help="keep CSV rows whose variant and kernel-source hash are unchanged; compile the rest")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="compute capabilities, e.g. 90,80")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes")
    parser.add_argument("--csv", default=CSV_PATH)
    parser.add_argument("--md", default=MD_PATH)
    parser.add_argument("--render-only", action="store_true", help="rewrite the markdown from the CSV")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this tool compiles the real kernels")
    if args.render_only:
        with open(args.md, "w") as f:
            f.write(render_markdown(read_rows(args.csv)))
        return 0
    digest = source_hash()
    archs = tuple(int(a) for a in args.arch.split(","))
    old = {row_key(r): r for r in read_rows(args.csv) if r["source_hash"] == digest} if args.reuse else {}
    todo = list(variants(archs=archs))
    done = {i: old[v.key] for i, v in enumerate(todo) if v.key in old}
    missing = [i for i in range(len(todo)) if i not in done]
    failures, started = 0, time.time()

    def finished(index, row, error):
        nonlocal failures
        if error:
            failures += 1
            print(error, flush=True)
            return
        done[index] = row
        print(_progress(row), flush=True)
        # Written as it goes, so that an interrupted run resumes with --reuse.
        kept = {row_key(done[i]) for i in done}
        write_csv([done[i] for i in sorted(done)] + [r for k, r in old.items() if k not in kept], args.csv)

    print(f"{len(todo)} variants, {len(done)} reused, {len(missing)} to compile with {args.jobs} process(es)", flush=True)
    if args.jobs > 1 and missing:
        # Spawned, not forked: a fork of a process that has run torch may hang in OpenMP.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(_compile_in_worker, i, _compile_job(todo[i]), digest) for i in missing]
            for future in concurrent.futures.as_completed(futures):
                finished(*future.result())
    else:
        for i in missing:
            finished(*_compile_in_worker(i, _compile_job(todo[i]), digest))
    rows = [done[i] for i in sorted(done)]
    write_csv(rows, args.csv)
    with open(args.md, "w") as f:
        f.write(render_markdown(rows, time.time() - started, args.jobs))
    misses = sum(r["fast_path"] != "yes" for r in rows)
    print(f"{len(rows)} variants, {failures} failed to compile, {misses} off the fast path -> {args.csv}, {args.md}")
    return 1 if failures or misses else 0


if __name__ == "__main__":
    sys.exit(main())

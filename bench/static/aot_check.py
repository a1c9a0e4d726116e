r"""Compile Triton kernel variants for a GPU target without a GPU, and read back what ptxas made.

    python -m bench.static.aot_check [--arch 90] [--dims 3,64,128,256,2048] [--quick]

The launcher runs on small CPU tensors with its launches recorded instead of executed
(launch.recording_launches), so the variants compiled are exactly those a real call would
launch (same arguments, constexprs, warps and stages), for the static tile and for every
autotuning candidate. Each distinct variant goes through Triton's full pipeline down to a cubin
(ptxas included); registers, spills and shared memory are read back with the cuobjdump that
ships with Triton, and the SASS instruction mix with its `--dump-sass`. The exit status is 1 if
any variant failed to compile. report.py builds the committed static report on top of this.

Uses Triton's internal binder (triton.runtime.jit.create_function_from_signature and
JITFunction._pack_args, as in Triton 3.x), so it is a developer tool, not part of the API.
It must run without TRITON_INTERPRET (it compiles the real kernels).
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

#: Compute types by name: (input dtype, torch float32 matmul precision that selects it).
COMPUTE_TYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
                 "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest"),
                 "fp64": (torch.float64, "highest")}

#: SASS opcodes the report counts: warpgroup MMA (Hopper), warp MMA (Ampere and later),
#: scalar fused multiply-adds, special-function unit (exp2, log2, rcp), and local memory.
SASS_OPCODES = ("HGMMA", "HMMA", "FFMA", "DFMA", "MUFU", "LDL", "STL")


def record(compute: str, d: int, rule: str, detach: bool, weighted: bool, unit: bool = True,
           eps: float | None = None, m: int = 256, need_grad: bool = True, negatives: str = "all", queue: int = 0,
           labels: bool = False):
    """The launches (launch.Launch) of one call of the launcher, recorded on CPU tensors; `queue`
    is the number of queue rows K (0: no queue); `labels` records the grouped call (positives
    from group ids: M/8 labels, so groups of about 8 rows)."""
    from fastalpha.backends.triton import launch
    from fastalpha.rules import make_spec

    dtype, precision = COMPUTE_TYPES[compute]
    z = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    weight = torch.rand(m, dtype=torch.promote_types(dtype, torch.float32)) if weighted else None
    spec = make_spec(rule, eps=eps, normalize=unit, detach_alpha=detach, negatives=negatives)
    extra = {"queue": torch.nn.functional.normalize(torch.randn(queue, d, dtype=torch.float64), dim=1).to(dtype)} if queue else {}
    if labels:
        extra["groups"] = torch.arange(m) % max(m // 8, 2)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with launch.recording_launches() as recorded:
            launch.fused_loss_and_grad(z, spec, 0, m, weight, need_grad, **extra)
    finally:
        torch.set_float32_matmul_precision(old)
    # UPCAST is an interpreter-only workaround (tiles._mma): compiled code never has it.
    return [dataclasses.replace(item, kwargs={**item.kwargs, "UPCAST": False}) for item in recorded]


def compile_launch(kernel, args, kwargs, target):
    """Compile one launch (positional args, constexpr and launch kwargs) for `target` (a triton GPUTarget)."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, flag, f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {out.stderr.strip()}")
    return out.stdout


def resource_usage(compiled) -> dict:
    """Registers, spill bytes, shared memory and the SASS opcode counts of a compiled kernel."""
    text = _cuobjdump(compiled.asm["cubin"], "--dump-resource-usage")
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    sass = _cuobjdump(compiled.asm["cubin"], "--dump-sass")
    # An instruction line: /*0a70*/  [@!P0] OPCODE.MODIFIERS operands ;
    opcodes = collections.Counter(
        match.group(1) for match in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass))
    usage = {
        "regs": int(found.get("REG", -1)),
        # ptxas puts spilled registers on the stack frame (STACK) or in local memory (LOCAL).
        "spill_bytes": int(found.get("STACK", 0)) + int(found.get("LOCAL", 0)),
        "shared": compiled.metadata.shared,
        "num_warps": compiled.metadata.num_warps,
    }
    usage.update({name.lower(): opcodes.get(name, 0) for name in SASS_OPCODES})
    return usage


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--dims", default="3,64,128,256,2048", help="feature dimensions D to compile for")
    parser.add_argument("--quick", action="store_true", help="fewer rule variants (direct, direct β, square β)")
    parser.add_argument("--dtypes", default="bf16,tf32,fp32,fp16,fp64",
                        help="compute types to compile: bf16, fp16, tf32 (float32 with TF32 products), fp32 (IEEE), fp64")
    parser.add_argument("--static-only", action="store_true", help="only the static tile, not the autotuning candidates")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this tool compiles the real kernels")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    rules = [("direct", True, None), ("direct", False, None), ("square", False, None)]
    if not args.quick:
        rules += [("entropy", True, 0.1), ("inverse", False, None), ("infonce", True, None), ("square", True, None)]
    seen, failures, spilled = set(), 0, 0
    for compute in args.dtypes.split(","):
        for d in (int(x) for x in args.dims.split(",")):
            for rule, detach, eps in rules:
                for weighted in (False, True):
                    for item in record(compute, d, rule, detach, weighted, eps=eps):
                        for cfg in ([item.config] if args.static_only else item.candidates):
                            kwargs = item.launch_kwargs(cfg)
                            key = (item.kind, str(item.args[0].dtype), tuple(sorted(map(str, kwargs.items()))))
                            if key in seen:
                                continue
                            seen.add(key)
                            what = (f"{item.kind:9s} {compute} D={d} {rule} detach={detach} weighted={weighted} "
                                    f"tile={cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}")
                            try:
                                usage = resource_usage(compile_launch(item.kernel, item.args, kwargs, target))
                            except Exception as err:  # report every failing variant, not just the first
                                failures += 1
                                print(f"FAILED {what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
                                continue
                            spilled += bool(usage["spill_bytes"])
                            flag = "SPILLS" if usage["spill_bytes"] else "ok"
                            print(f"{flag:6s} regs={usage['regs']:3d} spill={usage['spill_bytes']:5d}B smem={usage['shared']:6d}B "
                                  f"hgmma={usage['hgmma']:3d} hmma={usage['hmma']:4d}  {what}", flush=True)
    print(f"{len(seen)} variants for sm_{args.arch}: {failures} failed to compile, {spilled} spill registers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

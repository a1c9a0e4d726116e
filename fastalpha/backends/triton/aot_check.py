r"""Compile every Triton kernel variant for a GPU target, without a GPU.

    python -m fastalpha.backends.triton.aot_check [--arch 90] [--dims 3,64,128,256,2048] [--quick]

The launcher runs on small CPU tensors with its launches recorded instead of executed
(launch.recording_launches), so the variants compiled are exactly those a real call would
launch (same arguments, constexprs, warps and stages). Each distinct variant goes through
Triton's full pipeline down to a cubin (ptxas included); its registers, spills and shared
memory are read back with the cuobjdump that ships with Triton. Spills are reported; the exit
status is 1 if any variant failed to compile.

Uses Triton's internal binder (triton.runtime.jit.create_function_from_signature and
JITFunction._pack_args, as in Triton 3.x), so it is a developer tool, not part of the API.
It must run without TRITON_INTERPRET (it compiles the real kernels).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch


def _launches(dims, dtypes, rules, m=256):
    """Yield (description, kernel, args, kwargs) of every launch of the listed cases."""
    from ...rules import make_spec
    from . import launch

    for dtype, precision in dtypes:
        for d in dims:
            for rule, detach, eps in rules:
                for weighted in (False, True):
                    z = torch.randn(m, d).to(dtype)
                    weight = torch.rand(m, dtype=torch.promote_types(dtype, torch.float32)) if weighted else None
                    old = torch.get_float32_matmul_precision()
                    torch.set_float32_matmul_precision(precision)
                    try:
                        with launch.recording_launches() as recorded:
                            launch.fused_loss_and_grad(z, make_spec(rule, eps=eps, detach_alpha=detach), 0, m, weight, True)
                    finally:
                        torch.set_float32_matmul_precision(old)
                    for kernel, grid, args, kwargs in recorded:
                        what = f"{kernel.fn.__name__} {str(dtype)[6:]}/{precision} D={d} {rule} detach={detach} eps={eps} weighted={weighted}"
                        yield what, kernel, args, kwargs


def compile_launch(kernel, args, kwargs, target):
    """Compile one recorded launch for `target` (a triton GPUTarget); returns the CompiledKernel."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """Registers, spill stores and shared memory of a compiled kernel, from its cubin."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {
        "regs": int(found.get("REG", -1)),
        # ptxas puts spilled registers on the stack frame (STACK) or in local memory (LOCAL).
        "spill_bytes": int(found.get("STACK", 0)) + int(found.get("LOCAL", 0)),
        "shared": compiled.metadata.shared,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200), 80 (A100)")
    parser.add_argument("--dims", default="3,64,128,256,2048", help="feature dimensions D to compile for")
    parser.add_argument("--quick", action="store_true", help="fewer rule variants (direct, direct β, square β)")
    parser.add_argument("--dtypes", default="bf16,tf32,fp32,fp16,fp64",
                        help="compute types to compile: bf16, fp16, tf32 (float32 with TF32 products), fp32 (IEEE), fp64")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: this tool compiles the real kernels")
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", args.arch, 32)
    dims = [int(x) for x in args.dims.split(",")]
    compute_types = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
                     "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest"), "fp64": (torch.float64, "highest")}
    dtypes = [compute_types[name] for name in args.dtypes.split(",")]
    rules = [("direct", True, 0.0), ("direct", False, 0.0), ("square", False, 0.0)]
    if not args.quick:
        rules += [("entropy", True, 0.1), ("inverse", False, 0.0), ("infonce", True, 1.0), ("square", True, 0.0)]
    seen, failures, spilled = {}, 0, 0
    for what, kernel, kargs, kwargs in _launches(dims, dtypes, rules):
        key = (kernel.fn.__name__, tuple(str(getattr(a, "dtype", type(a).__name__)) for a in kargs), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        try:
            usage = resource_usage(compile_launch(kernel, kargs, kwargs, target))
        except Exception as err:  # report every failing variant, not just the first
            seen[key] = None
            failures += 1
            print(f"FAILED {what}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", flush=True)
            continue
        seen[key] = usage
        spilled += bool(usage["spill_bytes"])
        flag = "SPILLS" if usage["spill_bytes"] else "ok"
        print(f"{flag:6s} regs={usage['regs']:3d} spill={usage['spill_bytes']:5d}B smem={usage['shared']:6d}B  {what}", flush=True)
    print(f"{len(seen)} variants for sm_{args.arch}: {failures} failed to compile, {spilled} spill registers")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

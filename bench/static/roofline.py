r"""Roofline model of the fused Triton passes on an H200, against dense eager and the chunked backend.

    python -m bench.static.roofline                  # predictions (docs/roofline.md)
    python -m bench.static.roofline --measure --csv out.csv   # and timings, on a GPU

Work per pair (i, j) of a pass, for the default call (rule `direct`, α detached, unit rows):

    tensor-core flops   2·D for S = Z_i Z_jᵀ, + 2·D for P Z_j when the pass accumulates
    MUFU                1 exponential (e^{t−m} in the row pass, α = e^{t−lse} in the column pass)
    FP32 / INT32 ALU    d2 = 1 − s and its clamp, t = −d2²/τ, the max, the sums, the conversion
                        of P to the input dtype (FP32 pipe); the J_i mask (INT32 pipe)
    L2 → SM bytes       every program streams all M rows of Z: (M / block_m) · M · D · bytes

and O(M·D) bytes of HBM traffic (Z fits in L2 at these sizes). The time of a pass lies between
max(terms) (every unit busy at once, perfect overlap) and their sum (no overlap at all).

The baselines are counted, not estimated: their aten ops are run at a small M on the CPU under
a dispatch-mode counter that adds the matrix-product flops and the bytes read and written of
every tensor with ≥ M²/4 elements (the M × M intermediates; views excluded), and both scale as
M² (counted at M = 1024, D = 128). Dense eager (autograd through fastalpha.reference) and the chunked backend are then
memory-bound: time = flops / tensor-core rate + bytes / HBM bandwidth.
"""
from __future__ import annotations

import argparse
import collections
import csv
import functools
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: The machine the model predicts for; (value, where it comes from).
H200 = {
    "sms": (132, "device query (PyTorch), H200 SXM"),
    "clock_hz": (1.98e9, "SM clock under load (nvidia-smi on a lent H200)"),
    "bf16_flops": (790e12, "measured here: 8192³ bf16 torch.mm on random data, 769-798 TFLOP/s"),
    "tf32_flops": (395e12, "assumed: half the bf16 rate, the datasheet's ratio (not measured)"),
    "mufu_per_s": (3.9e12, "datasheet-derived (FlashAttention-3 paper: 3.9 TFLOPS of exp on H100 SXM5)"),
    "alu_per_s": (132 * 128 * 1.98e9, "128 FP32 lanes per SM per clock (INT32: 64, counted as 2 FP32 slots)"),
    "hbm_bytes_per_s": (4.3e12, "measured here: device-to-device copy, bytes read + written"),
    "l2_bytes_per_s": (5.5e12, "assumed: published microbenchmarks of H100 L2 reads (not measured here)"),
}

#: Non-MMA instructions per pair of the default call (direct, p = 4, unit rows, α detached),
#: counted from the kernel source (kernels/tiles.py, row_pass.py, column_pass.py): (FP32 ops, INT32 ops).
ALU_PER_PAIR = {"row": (9, 4), "row-loss-only": (8, 4), "column": (7, 4)}


def _rate(key: str) -> float:
    return H200[key][0]


def fused_pass(m: int, d: int, compute: str, kind: str, block_m: int = 64) -> dict:
    """Predicted seconds of one fused pass over the M × M pairs (see the module docstring)."""
    pairs = m * m
    accumulates = kind != "row-loss-only"
    flops = pairs * (4 if accumulates else 2) * d
    size = 2 if compute in ("bf16", "fp16") else 4
    fp32_ops, int_ops = ALU_PER_PAIR[kind]
    terms = {
        "mma": flops / _rate("bf16_flops" if size == 2 else "tf32_flops"),
        "mufu": pairs / _rate("mufu_per_s"),
        "alu": pairs * (fp32_ops + 2 * int_ops) / _rate("alu_per_s"),
        "l2": (m / block_m) * m * d * size / _rate("l2_bytes_per_s"),
        "hbm": (m * d * size + 2 * m * d * 4) / _rate("hbm_bytes_per_s"),
    }
    return {"flops": flops, **terms, "lower": max(terms.values()), "upper": sum(terms.values())}


# ------------------------------------------------------------------------------- baselines --

_VIEWS = {"t", "transpose", "view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze",
          "as_strided", "detach", "alias", "permute", "_reshape_alias", "reshape", "lift_fresh"}


class _Counter(TorchDispatchMode):
    """Matrix-product flops and bytes of large tensors read or written, per aten op."""

    def __init__(self, big: int):
        super().__init__()
        self.big, self.flops, self.bytes, self.ops = big, 0, 0, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm"):
            a, b = (args[0], args[1]) if name != "addmm" else (args[1], args[2])
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if name == "bmm" else 1)
        if name not in _VIEWS:
            moved = 0
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor) and t.numel() >= self.big:
                    moved += t.numel() * t.element_size()
            if moved:
                self.bytes += moved
                self.ops[name] += 1
        return out


@functools.lru_cache(maxsize=None)
def count_baseline(which: str, compute: str, m: int = 1024, d: int = 128) -> dict:
    """Flops and bytes (per M², so they scale) of one forward + backward of `which` at small M.

    M = 1024 with D = 128 keeps the M × D tensors (M·D = M²/8) under the M²/4 threshold.
    """
    from fastalpha import reference
    from fastalpha.backends import chunked
    from fastalpha.rules import make_spec

    dtype = torch.bfloat16 if compute in ("bf16", "fp16") else torch.float32
    if compute == "fp16":
        dtype = torch.float16
    spec = make_spec("direct")
    gen = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(m // 2, d, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    counter = _Counter(big=m * m // 4)
    with counter:
        if which == "eager":
            reference.alpha_cl_loss(z1, z2, spec, "mean").backward()
        else:
            z = reference.stack_views(z1.detach(), z2.detach(), True)
            chunked.loss_rows_and_grad(z, spec, 0, m, None, True, chunk_rows=m)
    return {"flops_per_pair": counter.flops / (m * m), "bytes_per_pair": counter.bytes / (m * m),
            "large_ops": sum(counter.ops.values()), "ops": dict(counter.ops)}


def baseline_time(count: dict, m: int, compute: str) -> float:
    rate = _rate("bf16_flops" if compute in ("bf16", "fp16") else "tf32_flops")
    return m * m * (count["flops_per_pair"] / rate + count["bytes_per_pair"] / _rate("hbm_bytes_per_s"))


def predictions(sizes=(16384, 65536), d: int = 128, computes=("bf16", "tf32")) -> list[dict]:
    rows = []
    counts = {(w, c): count_baseline(w, c) for w in ("eager", "chunked") for c in computes}
    for compute in computes:
        for m in sizes:
            loss_only = fused_pass(m, d, compute, "row-loss-only")
            row, column = fused_pass(m, d, compute, "row"), fused_pass(m, d, compute, "column")
            lower, upper = row["lower"] + column["lower"], row["upper"] + column["upper"]
            eager, chunk = baseline_time(counts[("eager", compute)], m, compute), baseline_time(counts[("chunked", compute)], m, compute)
            rows.append(dict(
                M=m, D=d, compute=compute,
                row_mma_ms=row["mma"] * 1e3, row_mufu_ms=row["mufu"] * 1e3, row_alu_ms=row["alu"] * 1e3, row_l2_ms=row["l2"] * 1e3,
                loss_only_ms=f"{loss_only['lower'] * 1e3:.2f}-{loss_only['upper'] * 1e3:.2f}",
                row_pass_ms=f"{row['lower'] * 1e3:.2f}-{row['upper'] * 1e3:.2f}",
                column_pass_ms=f"{column['lower'] * 1e3:.2f}-{column['upper'] * 1e3:.2f}",
                fused_ms=f"{lower * 1e3:.2f}-{upper * 1e3:.2f}", fused_lower_ms=lower * 1e3, fused_upper_ms=upper * 1e3,
                loss_only_upper_ms=loss_only["upper"] * 1e3,
                eager_ms=eager * 1e3, eager_GB=counts[("eager", compute)]["bytes_per_pair"] * m * m / 1e9,
                eager_large_ops=counts[("eager", compute)]["large_ops"],
                chunked_ms=chunk * 1e3, chunked_GB=counts[("chunked", compute)]["bytes_per_pair"] * m * m / 1e9,
                chunked_large_ops=counts[("chunked", compute)]["large_ops"],
                speedup_vs_eager=f"{eager / upper:.0f}-{eager / lower:.0f}",
                speedup_vs_chunked=f"{chunk / upper:.1f}-{chunk / lower:.1f}",
            ))
    return rows


# ------------------------------------------------------------------------------ measurement --

def measure(rows: list[dict], budget_s: float = 60.0) -> None:
    """Time on the current GPU what `rows` predict (in place: *_measured_ms), median of do_bench.

    fused: the triton backend's loss + gradient (both passes) and loss only; eager: fastalpha's
    dense autograd; chunked: the chunked backend's loss + gradient. A baseline that runs out of
    memory, or any case once `budget_s` is spent, is left unmeasured.
    """
    import time

    import triton.testing

    from fastalpha import reference
    from fastalpha.backends import chunked
    from fastalpha.backends.triton import alpha_cl_fused
    from fastalpha.rules import make_spec

    started = time.time()
    spec = make_spec("direct")
    for row in rows:
        m, d, compute = row["M"], row["D"], row["compute"]
        dtype = torch.bfloat16 if compute == "bf16" else torch.float16 if compute == "fp16" else torch.float32
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if compute == "tf32" else "highest")
        try:
            gen = torch.Generator(device="cuda").manual_seed(m)
            z = torch.nn.functional.normalize(torch.randn(m, d, device="cuda", generator=gen), dim=1).to(dtype)
            cases = {
                "fused": lambda: alpha_cl_fused(z, spec, 0, m, None, True),
                "loss_only": lambda: alpha_cl_fused(z, spec, 0, m, None, False),
                "chunked": lambda: chunked.loss_rows_and_grad(z, spec, 0, m, None, True),
                "eager": lambda: reference.alpha_cl_loss(z1, z2, spec, "mean").backward(),
            }
            z1, z2 = z[: m // 2].clone().requires_grad_(), z[m // 2:].clone().requires_grad_()
            for name, fn in cases.items():
                if time.time() - started > budget_s:
                    row[f"{name}_measured_ms"] = "skipped (time budget)"
                    continue
                try:
                    fn()
                    torch.cuda.synchronize()
                    row[f"{name}_measured_ms"] = triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
                except torch.cuda.OutOfMemoryError:
                    row[f"{name}_measured_ms"] = "out of memory"
                finally:
                    torch.cuda.empty_cache()
        finally:
            torch.set_float32_matmul_precision(old)


def _fmt(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else str(x)


def summary(rows: list[dict]) -> str:
    """Predicted (and, when measured, measured) times per case, one line each."""
    lines = [f"roofline model: {H200['sms'][0]} SMs, bf16 {H200['bf16_flops'][0] / 1e12:.0f} / tf32 "
             f"{H200['tf32_flops'][0] / 1e12:.0f} TFLOP/s, {H200['hbm_bytes_per_s'][0] / 1e12:.1f} TB/s HBM (see docs/roofline.md)",
             f"{'M':>6s} {'type':4s} {'what':10s} {'predicted ms':>16s} {'measured ms':>12s} {'measured/upper':>14s}"]
    for r in rows:
        for what, predicted, upper in (("fused", r["fused_ms"], r["fused_upper_ms"]),
                                       ("loss only", r["loss_only_ms"], r["loss_only_upper_ms"]),
                                       ("chunked", _fmt(r["chunked_ms"]), r["chunked_ms"]),
                                       ("eager", _fmt(r["eager_ms"]), r["eager_ms"])):
            key = what.replace(" ", "_") + "_measured_ms"
            got = r.get(key, "-")
            ratio = f"{got / upper:.2f}" if isinstance(got, float) else ""
            lines.append(f"{r['M']:6d} {r['compute']:4s} {what:10s} {predicted:>16s} {_fmt(got):>12s} {ratio:>14s}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measure", action="store_true", help="also time the cases on the current CUDA device")
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of measurement at most")
    parser.add_argument("--csv", help="write every predicted (and measured) number here")
    parser.add_argument("--markdown", action="store_true", help="print the docs/roofline.md tables")
    args = parser.parse_args(argv)
    rows = predictions()
    if args.measure:
        if not torch.cuda.is_available():
            print("no CUDA device: predictions only")
        else:
            measure(rows, args.budget)
    if args.markdown:
        print(markdown_tables(rows))
    else:
        print(summary(rows))
    if args.csv:
        fields = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows([{k: _fmt(v) for k, v in r.items()} for r in rows])
    return 0


def markdown_tables(rows: list[dict]) -> str:
    cols = [("M", "M"), ("compute", "type"), ("row_mma_ms", "row MMA"), ("row_mufu_ms", "row MUFU"),
            ("row_alu_ms", "row ALU"), ("row_l2_ms", "row L2"), ("row_pass_ms", "row pass"),
            ("column_pass_ms", "column pass"), ("fused_ms", "fused fwd+bwd"), ("eager_ms", "dense eager"),
            ("eager_GB", "eager GB moved"), ("chunked_ms", "chunked"), ("chunked_GB", "chunked GB moved"),
            ("speedup_vs_eager", "× eager"), ("speedup_vs_chunked", "× chunked")]
    out = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r[k]) if not isinstance(r[k], float) else f"{r[k]:.2f}" for k, _ in cols) + " |")
    out += ["", "Traffic of tensors with ≥ M²/4 elements per forward + backward, counted at M = 1024:"]
    for which in ("eager", "chunked"):
        for compute in ("bf16", "tf32"):
            c = count_baseline(which, compute)
            out.append(f"- {which} {compute}: {c['large_ops']} aten ops touch M×M-sized tensors, "
                       f"{c['bytes_per_pair']:.0f} bytes and {c['flops_per_pair']:.0f} matmul flops per pair: "
                       + ", ".join(f"{k}×{v}" for k, v in sorted(c["ops"].items())))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())

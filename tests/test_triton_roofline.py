"""The roofline model of docs/roofline.md: its counter counts what it claims, and its numbers hang together."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/ is tooling, not the package
from bench.static import roofline  # noqa: E402


def test_counter_counts_matrix_products_and_large_tensors_only():
    m, d = 64, 8
    a, b = torch.randn(m, d), torch.randn(m, m)
    counter = roofline._Counter(big=m * m // 4)
    with counter:
        s = a @ a.T                     # mm: 2·m·m·d flops, writes an m × m tensor
        (s + b).sum()                   # add reads two and writes one; sum reads one
        a.T.contiguous()                # small: not counted
    assert counter.flops == 2 * m * m * d
    assert counter.bytes == 4 * m * m * (1 + 3 + 1)
    assert counter.ops == {"mm": 1, "add": 1, "sum": 1}


def test_fused_pass_terms():
    bf16 = roofline.fused_pass(65536, 128, "bf16", "row")
    assert bf16["flops"] == 4 * 65536 ** 2 * 128
    assert bf16["mma"] == pytest.approx(bf16["flops"] / roofline.H200["bf16_flops"][0])
    assert bf16["lower"] == max(bf16[k] for k in ("mma", "mufu", "alu", "l2", "hbm")) <= bf16["upper"]
    tf32 = roofline.fused_pass(65536, 128, "tf32", "row")
    assert tf32["mma"] == pytest.approx(2 * bf16["mma"]) and tf32["l2"] == pytest.approx(2 * bf16["l2"])
    loss_only = roofline.fused_pass(65536, 128, "bf16", "row-loss-only")
    assert loss_only["flops"] == bf16["flops"] // 2
    # Twice the owned rows per program halves the re-reads of Z from L2.
    assert roofline.fused_pass(65536, 128, "bf16", "row", block_m=128)["l2"] == pytest.approx(bf16["l2"] / 2)


def test_predictions_scale_and_favour_the_fused_kernels():
    rows = roofline.predictions()
    assert [(r["M"], r["compute"]) for r in rows] == [(16384, "bf16"), (65536, "bf16"), (16384, "tf32"), (65536, "tf32")]
    small, large = rows[0], rows[1]
    assert large["eager_ms"] == pytest.approx(16 * small["eager_ms"])          # M² scaling
    assert large["fused_upper_ms"] == pytest.approx(16 * small["fused_upper_ms"], rel=0.01)
    for r in rows:
        # Three M²·D products forward + backward; dozens of M × M memory passes.
        assert r["eager_large_ops"] > 10 and r["chunked_large_ops"] > 10
        assert r["fused_lower_ms"] <= r["fused_upper_ms"] < r["chunked_ms"] and r["fused_upper_ms"] < r["eager_ms"]
    summary = roofline.summary(rows)
    assert summary.count("\n") == 1 + 4 * len(rows)

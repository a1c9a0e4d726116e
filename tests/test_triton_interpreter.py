"""The suite's Triton-interpreter wrapper (tests/triton_interpreter.py): one patch of
`triton.language` per launch, the same results, and nothing left patched after the launch."""
import os

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

import triton_interpreter

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the kernels are compiled, not interpreted, on this machine")


@triton.jit
def _scaled_tile(x_ptr, offsets, scale):
    return tl.load(x_ptr + offsets) * scale


@triton.jit
def _two_helper_calls_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, _scaled_tile(x_ptr, offsets, 2.0) + _scaled_tile(x_ptr, offsets, 3.0))


def test_a_launch_patches_the_language_once_and_restores_it(monkeypatch, gen):
    wrapper = interpreter._patch_lang
    assert isinstance(wrapper, triton_interpreter.PatchOncePerLaunch), (
        "tests/triton_interpreter.py is not installed: this triton's interpreter changed, and every "
        "helper call inside a kernel scans triton.language again (the suite runs much slower)")
    tritons_patch, calls = wrapper.original, []

    def counted(fn):
        calls.append(fn.__name__)
        return tritons_patch(fn)

    monkeypatch.setattr(wrapper, "original", counted)
    grid, block = 3, 8
    x = torch.randn(grid * block, generator=gen)
    out = torch.empty_like(x)
    _two_helper_calls_kernel[(grid,)](x, out, BLOCK=block)
    torch.testing.assert_close(out, 5.0 * x, rtol=1e-6, atol=0)
    assert calls == ["_two_helper_calls_kernel"], calls      # 6 helper calls, none patched again
    assert tl.core.is_builtin(tl.arange) and tl.core.is_builtin(tl.tensor.__add__), "left patched"

"""Triton's CPU interpreter, without patching `triton.language` again at every helper call.

Under TRITON_INTERPRET=1 a launch (`GridExecutor.__call__`) patches the `triton.language`
modules its kernel sees, runs every program of the grid, and restores the modules at the end. A
call of a @triton.jit helper from inside a program (`InterpretedFunction.__call__`) patches them
again: a scan of every member of tl, tl.tensor and tl.math with `inspect.getmembers`, which
costs as much as the arithmetic of a small tile. fastalpha's kernels call their tile helpers
(kernels/tiles.py) once per tile, so without this module the scan takes about a third
of the interpreter's time in this suite.

Inside a launch a second patch of modules that are already patched changes nothing, so
`install` skips it. A helper that sees a module the launch has not patched, and a helper called
outside any launch, go through triton's own code, as before. The kernels' results are checked
against the float64 references either way; this only changes how long the checks take.

`counting_tile_products` counts the matrix products (`tl.dot`) that the interpreted programs
actually run, per kernel: what a kernel's loop bounds make it compute, not what a launcher
predicts, so a test of the tile skipping fails if a kernel still streams every tile.
"""
from __future__ import annotations

import collections
import contextlib
import inspect
import threading


class _NothingToRestore:
    def restore(self) -> None:
        pass


class PatchOncePerLaunch:
    """Stands in for the interpreter's `_patch_lang(fn)`; `original` is triton's own."""

    def __init__(self, original, language_modules):
        self.original = original
        self.language_modules = language_modules
        self._launch = threading.local()
        self._seen: dict = {}

    def __call__(self, fn):
        patched = getattr(self._launch, "patched", None)
        seen = self._language_modules_seen_by(fn)
        if patched is not None and seen and seen <= patched:
            return _NothingToRestore()
        if patched is not None:
            patched |= seen
        return self.original(fn)

    def _language_modules_seen_by(self, fn) -> frozenset:
        # Keyed by the size of the globals too: the interpreter adds names to a module's globals
        # when it first rewrites one of its functions.
        key = (fn, len(fn.__globals__))
        if key not in self._seen:
            self._seen[key] = frozenset(id(value) for value in fn.__globals__.values()
                                        if inspect.ismodule(value) and any(value is m for m in self.language_modules))
        return self._seen[key]

    def around_launch(self, run_grid):
        """Wraps `GridExecutor.__call__`: what the launch patches stays patched until it ends."""
        def launch(executor, *args, **kwargs):
            self._launch.patched = set()
            try:
                return run_grid(executor, *args, **kwargs)
            finally:
                self._launch.patched = None
        return launch


def install() -> str:
    """Install the wrapper into Triton's interpreter; what happened, for the report header."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError as error:
        return f"not installed ({error})"
    original = getattr(interpreter, "_patch_lang", None)
    executor = getattr(interpreter, "GridExecutor", None)
    if original is None or executor is None:
        return "not installed (this triton's interpreter has no _patch_lang or GridExecutor)"
    if isinstance(original, PatchOncePerLaunch):
        return "language patched once per launch"
    wrapper = PatchOncePerLaunch(original, (tl, tl.core))
    interpreter._patch_lang = wrapper
    executor.__call__ = wrapper.around_launch(executor.__call__)
    return "language patched once per launch"


@contextlib.contextmanager
def counting_tile_products():
    """Count the `tl.dot` products of the interpreted launches inside the block.

    Yields a dict {kernel name: Counter(products=…, flops=…)}, flops = 2·m·n·k of each
    product's operand shapes, filled as the kernels run (one launch at a time, as the
    interpreter runs them).
    """
    from triton.runtime import interpreter

    counts: dict = collections.defaultdict(collections.Counter)
    current = []
    run_grid, create_dot = interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_dot

    def launch(executor, *args, **kwargs):
        current.append(executor.fn.__name__)
        try:
            return run_grid(executor, *args, **kwargs)
        finally:
            current.pop()

    def dot(builder, a, b, d, *args, **kwargs):
        (m, k), n = a.data.shape[-2:], b.data.shape[-1]
        counts[current[-1] if current else "outside a launch"].update(products=1, flops=2 * m * n * k)
        return create_dot(builder, a, b, d, *args, **kwargs)

    interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_dot = launch, dot
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__, interpreter.InterpreterBuilder.create_dot = run_grid, create_dot

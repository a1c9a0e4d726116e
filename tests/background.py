"""Subprocess set-ups that run beside the suite instead of in front of their tests.

The suite's own process keeps about one core busy, and most of its tests are single-threaded.
A few tests mostly wait for other processes (the gloo rank pools, the torchrun run, the
benchmark's command line). A test module that defines

    start_in_background(tmp_path_factory, items)

has it called once, at the first test of a session that selected any of its tests (`items`
are the selected ones, so a `-k` run starts only what it needs); it calls `start`. The tests
call `result` with the same key and work: they wait for the background run, or start it then
if nothing did. Work runs in one background thread, in the order started, so that the
subprocess pools never compete with each other; what it raises is raised by `result` in every
test that asks, exactly as if the test had run the work itself. A test that calls `result`
carries the `background` marker: tests/conftest.py runs those after the others, so that the
work has the rest of the suite's time to finish.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

_EXECUTOR: ThreadPoolExecutor | None = None
_STARTED: dict[str, Future] = {}
_SESSION_ENVIRONMENT: dict | None = None


def environment() -> dict:
    """The environment as the session started (a copy), so that a variable some test
    monkeypatches while the background work launches a process does not reach that process."""
    return dict(os.environ if _SESSION_ENVIRONMENT is None else _SESSION_ENVIRONMENT)


def start(key: str, work, *args) -> None:
    """Run `work(*args)` in the background thread, once per key, after what started before."""
    global _EXECUTOR
    if key in _STARTED:
        return
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastalpha-tests-background")
    _STARTED[key] = _EXECUTOR.submit(work, *args)


def result(key: str, work, *args):
    """What `work` started under `key` returned (or raised); started now if it was not."""
    start(key, work, *args)
    return _STARTED[key].result()


def start_modules(items, tmp_path_factory) -> None:
    """Call `start_in_background` of every module among the selected `items`, in suite order."""
    global _SESSION_ENVIRONMENT
    _SESSION_ENVIRONMENT = dict(os.environ)
    by_module: dict = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "start_in_background"):
            by_module.setdefault(module, []).append(item)
    for module, selected in by_module.items():
        module.start_in_background(tmp_path_factory, selected)


def shutdown() -> None:
    """End of the session: drop work not yet begun (a `-x` run that stopped early) and wait for
    the running one (it has its own timeout)."""
    global _EXECUTOR, _SESSION_ENVIRONMENT
    if _EXECUTOR is not None:
        _EXECUTOR.shutdown(wait=True, cancel_futures=True)
        _EXECUTOR = None
    _STARTED.clear()
    _SESSION_ENVIRONMENT = None


def wait_for_ranks(procs, timeout_s: float) -> list:
    """Exit codes of rank processes that talk to each other (subprocess.Popen objects).

    A rank that fails leaves its peers waiting in a collective, so they are stopped then, not
    at the timeout; a rank still running when it stops reads "timeout after N s" or "stopped
    after a peer failed" instead of a code."""
    deadline = time.monotonic() + timeout_s
    while any(p.poll() is None for p in procs) and not any(p.poll() not in (None, 0) for p in procs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    why = f"timeout after {timeout_s} s" if time.monotonic() > deadline else "stopped after a peer failed"
    codes = []
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
            codes.append(why)
        else:
            codes.append(p.returncode)
    return codes

"""Peak-memory measurement and the memory cap of a benchmark run.

CPU: the resident set of the measuring process, read from /proc/self/status. VmRSS is what
the process holds now, VmHWM its high-water mark; writing "5" to /proc/self/clear_refs resets
the high-water mark to the current RSS (Linux ≥ 4.0), so a measurement is

    baseline = VmRSS (inputs allocated, warm-up done) → reset VmHWM → one call → VmHWM − baseline.

For RSS to follow the live tensors, freed buffers must leave the process. glibc keeps freed
blocks in its heap (and its mmap threshold grows after the first large free), so an earlier,
bigger call would leave resident free memory that the next one reuses without raising RSS.
The memory worker therefore starts with EXACT_MALLOC_ENV: every buffer above 64 KiB is its
own mapping, unmapped when freed. That setting makes every temporary a fresh page-faulting
mapping, which was measured to double the time of the chunked baseline at M = 8192, so
timing runs in another worker with the allocator as users have it. (Setting the same thresholds with
mallopt() at run time is not enough: blocks already in the heap keep being reused.)

The user-visible figure, the growth of a fresh process with the default allocator over a few
calls, is bench/runner.py's `run_rss` (its own process per measurement).

CUDA: torch.cuda.max_memory_allocated() − memory_allocated() after the inputs exist.
"""
from __future__ import annotations

import os

import torch

#: Environment of the CPU memory worker (read by glibc at process start).
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since start or the last `reset_peak_rss()`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def available_bytes(device: torch.device) -> int:
    """Memory a run may use now: MemAvailable on the CPU, free memory on a CUDA device."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_cap_bytes(device: torch.device, cap_gb: float | None) -> int:
    """The memory cap: `cap_gb` if given, else 90% of free GPU memory, or on the CPU the
    smaller of 4 GiB and half of MemAvailable (the CPU machine is shared)."""
    if cap_gb is not None:
        return int(cap_gb * 2**30)
    free = available_bytes(device)
    if device.type == "cuda":
        return int(0.9 * free)
    return int(min(4 * 2**30, 0.5 * free))

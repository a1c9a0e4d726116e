"""A measuring subprocess of a CPU run: `python -m bench.worker SPEC.json RESULTS.jsonl`.

SPEC holds the phase ("time", "memory" or "rss"), the runner Settings and a list of Tasks; one
JSON line per finished task is appended to RESULTS (flushed at once), so that if the kernel's
OOM killer ends this process, bench/compare.py knows which task was in flight and carries on
in a fresh worker. The memory phase reads this process's RSS high-water mark and is started
with bench.memory.EXACT_MALLOC_ENV (see bench/memory.py), which is why it is a process of its
own; the rss phase gets one fresh process per task with the default allocator.
"""
from __future__ import annotations

import json
import sys

import torch

from .runner import Settings, Task, run, run_memory, run_rss

PHASES = {"time": run, "memory": run_memory, "rss": run_rss}


def main(argv: list[str]) -> int:
    spec_path, results_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    measure = PHASES[spec["phase"]]
    settings = Settings(**spec["settings"])
    torch.set_num_threads(settings.threads)
    with open(results_path, "a") as out:
        for fields in spec["tasks"]:
            result = measure(Task(**fields), settings)
            out.write(json.dumps({"task": fields, "result": result}) + "\n")
            out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

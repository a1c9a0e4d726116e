r"""Benchmark of the α-CL loss implementations: time, peak memory and GFLOP/s against eager.

For every provider (bench/providers.py) and every (rule, M, D, dtype, mode, set-up):
  1. the provider must agree with the float64 dense reference on a small input (value and
     gradients, fastalpha.testing) or it is reported `wrong` and not timed;
  2. a size whose predicted peak exceeds the memory cap (--mem-cap-gb) is recorded `OOM`, as is
     one that fails to allocate, and the sweep goes on;
  3. otherwise it is warmed up and timed (median, p20, p80 over the repeats): on the CPU with
     torch.utils.benchmark (bench/timing.py) in a worker subprocess per provider
     (bench/worker.py), on a GPU in this process with triton.testing.do_bench. A call slower
     than --single-call-s is measured once (the large sizes of the fused providers);
  4. its memory is taken: on the CPU (--memory) the per-call peak beyond the inputs in a worker
     whose allocator returns freed buffers (peak_mb), and/or the resident-set growth of a fresh
     process over three calls with glibc's default allocator (rss_growth_mb); on a GPU
     torch.cuda.max_memory_allocated.
A matmul of the same shape class is timed by the same process, next to the measurements, for
the GFLOP/s ceiling. Every row carries the machine, the thread count and the 1-minute load
average when its measurement began and ended.

Writes OUT/NAME.csv (one row per measurement, columns in bench/report.py) and OUT/NAME.png
(bench/plots.py), and prints a table (and, for --preset cpu-targets, the targets with
PASS/FAIL). Providers that cannot run here are reported `unavailable` with the reason
fastalpha gives, set-ups this fastalpha's API cannot express `skipped`, never left out.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import fastalpha  # noqa: E402
from bench import memory, plots, presets, providers, report, runner, timing  # noqa: E402

EPILOG = """usual invocations:
  python bench/compare.py                          # CPU default sweep (about 5 minutes on 2 cores)
  python bench/compare.py --quick                  # about a minute
  python bench/compare.py --preset cpu-targets     # the cpp backend's targets with PASS/FAIL (about 10 minutes)
  python bench/compare.py --preset setups          # negatives all / cross / queue (about 20 minutes)
  python bench/compare.py --preset supcon          # labels (SupCon): cpp, chunked, eager vs pytorch-metric-learning (20-30 minutes)
  python bench/compare.py --device cuda            # GPU default sweep
  python bench/compare.py --providers cpp --rules direct --modes fwdbwd --sizes 131072,262144
                                                   # large M, one call each (minutes per size)
  python bench/compare.py --providers chunked,cpp --rules square --sizes 2048,8192 --dims 64,128 \\
      --modes fwd,fwdbwd --setups all,cross --memory both --repeats 7 --out /tmp/bench
  python bench/plots.py bench/results/NAME.csv     # redraw a figure from its CSV
"""

DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}

#: The default sweeps. "fused_sizes" are run by the fused providers (cpp/cuda/triton) only.
#: CPU: sized to finish in about 5 minutes on the project's 2-core machine (the fused-only
#: M = 24576 = 3·2^13 alone is a third of it); the dense providers stop where their predicted
#: peak passes the 4 GiB cap (eager at M = 16384, compile's fwd+bwd too).
DEFAULTS = {
    "cpu": dict(sizes=[1024, 4096, 8192, 16384], fused_sizes=[24576], dims=[128], rules=["direct", "infonce"],
                dtypes=["float32"], modes=["fwd", "fwdbwd"], setups=["all"], repeats=5, budget_s=3.0, memory="pinned",
                single_call_s=30.0),
    "cuda": dict(sizes=[4096, 16384, 65536, 262144], fused_sizes=[1048576], dims=[128], rules=["direct", "infonce"],
                 dtypes=["float32", "bfloat16"], modes=["fwdbwd"], setups=["all"], repeats=10, budget_s=3.0, memory="none",
                 single_call_s=30.0),
}
#: --quick: a subset that takes about a minute (torch.compile is left out: its first compile
#: alone can take a minute on 2 cores; ask for it with --providers).
QUICK = {
    "cpu": dict(sizes=[1024, 2048], fused_sizes=[8192], rules=["direct"], modes=["fwd", "fwdbwd"], repeats=3, budget_s=1.0,
                providers=["eager", "chunked", "cpp"]),
    "cuda": dict(sizes=[4096, 16384, 65536], fused_sizes=[262144], rules=["direct"], dtypes=["float32", "bfloat16"],
                 modes=["fwdbwd"], repeats=5, budget_s=1.0, providers=["eager", "chunked", "triton", "cuda"]),
}
#: Selection flags: a preset sets these itself.
SELECTION = ("providers", "rules", "sizes", "fused_sizes", "dims", "dtypes", "modes", "setups")


class _PerDevice:
    """Default of a flag that depends on --device (and --quick); shown as such by --help."""

    def __init__(self, key: str):
        self.key = key

    def __str__(self) -> str:
        def show(value):
            return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

        values = {device: dict(DEFAULTS[device], providers=providers.DEFAULT_PROVIDERS[device]).get(self.key)
                  for device in DEFAULTS}
        return "; ".join(f"{device} {show(v)}" for device, v in values.items())


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _list(kind):
    def parse(text: str):
        items = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
        if kind is int:
            try:
                return [int(t) for t in items]
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
        return items
    return parse


def parse_setup(text: str, queue_rows: int) -> tuple[str, int, str]:
    """"all" | "cross" | "none" with an optional "+queue", "labels", or "labels+memory" with an
    optional size ("labels+memory4096"; else --queue-size): (negatives, K, positives)."""
    if text == "labels":
        return "all", 0, "labels"
    if text.startswith("labels+memory"):
        size = text[len("labels+memory"):]
        if size and not size.isdigit() or size == "0":
            raise ValueError(f"unknown set-up {text!r}; expected labels+memory or labels+memoryK with K > 0 slots")
        return "all", int(size) if size else queue_rows, "memory"
    negatives, plus, extra = text.partition("+")
    if negatives not in providers.NEGATIVES or (plus and extra != "queue"):
        raise ValueError(f"unknown set-up {text!r}; expected labels, NEGATIVES or NEGATIVES+queue, "
                         f"NEGATIVES in {providers.NEGATIVES}")
    if negatives == "none" and not plus:
        raise ValueError("set-up 'none' has no negatives without a queue: use none+queue")
    return negatives, (queue_rows if plus else 0), "pair"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the inputs live")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute subset of the default sweep")
    parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                        help="a named run instead of the sweep: " + "; ".join(f"{k}: {v['help']}" for k, v in presets.PRESETS.items()))
    parser.add_argument("--providers", type=_list(str), default=_PerDevice("providers"), help=f"comma list from {','.join(providers.PROVIDERS)}")
    parser.add_argument("--rules", type=_list(str), default=_PerDevice("rules"), help=f"comma list from {','.join(fastalpha.RULES)}")
    parser.add_argument("--sizes", type=_list(int), default=_PerDevice("sizes"),
                        help="M values (M = 2N stacked rows; the labels set-up: the M rows of its one view), for every provider")
    parser.add_argument("--fused-sizes", type=_list(int), default=_PerDevice("fused_sizes"),
                        help="extra M values for the fused providers (cpp/cuda/triton) only; '' for none (none either when --sizes is given alone)")
    parser.add_argument("--dims", type=_list(int), default=_PerDevice("dims"), help="D values")
    parser.add_argument("--dtypes", type=_list(str), default=_PerDevice("dtypes"), help="comma list from float32,bfloat16,float16,float64 (fp32/bf16/... accepted)")
    parser.add_argument("--modes", type=_list(str), default=_PerDevice("modes"), help="comma list from fwd,fwdbwd")
    parser.add_argument("--setups", type=_list(str), default=_PerDevice("setups"),
                        help="set-ups: comma list of all (SimCLR: every other row), cross (CLIP: the other view's rows), "
                             "each optionally +queue (K extra rows, --queue-size), none+queue (the queue only, MoCo), labels "
                             f"(SupCon: one view of M rows in classes of {providers.ROWS_PER_CLASS} plus singletons, infonce at "
                             f"temperature {providers.SUPCON['temperature']}), and labels+memory[K] (the labelled batch through a "
                             "cross-batch memory of K slots, full: fastalpha.CrossBatchMemory or pml's CrossBatchMemory of SupConLoss)")
    parser.add_argument("--queue-size", type=int, default=presets.QUEUE_ROWS, help="K, rows of the queue of the +queue set-ups")
    parser.add_argument("--repeats", type=int, default=_PerDevice("repeats"), help="timed blocks per measurement (at least 3 where the time budget cuts them short)")
    parser.add_argument("--budget-s", type=float, default=_PerDevice("budget_s"), help="stop repeating a measurement after this many seconds (min 3 blocks)")
    parser.add_argument("--single-call-s", type=float, default=_PerDevice("single_call_s"),
                        help="a call slower than this is measured once, without warm-up or memory measurement")
    parser.add_argument("--memory", choices=runner.MEMORY_MODES, default=_PerDevice("memory"),
                        help="CPU peak memory: pinned (per-call peak, allocator returning freed buffers), fresh (RSS growth of a fresh "
                             "process over three calls, default allocator), both, none; a GPU always reports max_memory_allocated")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (at least 1; torch.compile gets one more)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads (all cores of this process)")
    parser.add_argument("--mem-cap-gb", type=float,
                        help="memory cap; unset: the preset's, else 90%% of free GPU memory, or min(4 GiB, MemAvailable/2) on the CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and of the agreement check")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="output directory")
    parser.add_argument("--name", help="file name stem (unset: device and model, e.g. cpu-intel-xeon-processor-2t)")
    parser.add_argument("--no-plot", action="store_true", help="write the CSV only")
    args = parser.parse_args(argv)

    given = {key for key in SELECTION if not isinstance(getattr(args, key), _PerDevice)}
    if args.preset:
        if given or args.quick:
            parser.error(f"--preset {args.preset} sets the providers, rules, sizes, dims, dtypes, modes and set-ups itself; "
                         f"drop {', '.join('--' + k.replace('_', '-') for k in sorted(given)) or '--quick'}")
        preset = presets.PRESETS[args.preset]
        if args.device != preset["device"]:
            parser.error(f"--preset {args.preset} runs on --device {preset['device']}")
    sizes_only = "sizes" in given and "fused_sizes" not in given   # explicit --sizes: exactly those
    chosen = dict(DEFAULTS[args.device], providers=list(providers.DEFAULT_PROVIDERS[args.device]))
    if args.quick:
        chosen.update(QUICK[args.device])
    if args.preset:
        chosen.update(presets.PRESETS[args.preset]["settings"])
    for key, value in chosen.items():
        # Flags left at their default: a per-device value, or unset (None, the memory cap).
        if isinstance(getattr(args, key, None), _PerDevice) or getattr(args, key, "given") is None:
            setattr(args, key, value)
    if sizes_only:
        args.fused_sizes = []
    args.groups = presets.expand(args.preset) if args.preset else [
        {key: getattr(args, key) for key in SELECTION}]
    for group in args.groups:
        _check_group(parser, group, args.queue_size)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.queue_size < 1:
        parser.error("--repeats, --threads and --queue-size must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


def _check_group(parser, group: dict, queue_rows: int) -> None:
    """Validate one selection in place (provider aliases, dtype aliases, set-ups parsed)."""
    group.setdefault("fused_sizes", [])
    for key in ("providers", "rules", "sizes", "dims", "dtypes", "modes", "setups"):
        if not group[key]:
            parser.error(f"--{key} is empty")
    group["providers"] = list(dict.fromkeys(providers.canonical(p) for p in group["providers"]))
    for name in group["providers"]:
        if name not in providers.PROVIDERS:
            parser.error(f"unknown provider {name!r}; expected one of {providers.PROVIDERS}")
    for rule in group["rules"]:
        if rule not in fastalpha.RULES:
            parser.error(f"unknown rule {rule!r}; expected one of {fastalpha.RULES}")
    for mode in group["modes"]:
        if mode not in runner.MODES:
            parser.error(f"unknown mode {mode!r}; expected one of {runner.MODES}")
    try:
        group["dtypes"] = [DTYPE_ALIASES[t] for t in group["dtypes"]]
    except KeyError as err:
        parser.error(f"unknown dtype {err.args[0]!r}; expected one of {sorted(DTYPE_ALIASES)}")
    try:
        group["setups"] = [parse_setup(t, queue_rows) for t in group["setups"]]
    except ValueError as err:
        parser.error(str(err))
    for m in group["sizes"] + group["fused_sizes"]:
        if m < 4 or m % 2:
            parser.error(f"sizes are M = 2N stacked rows (or one labelled view's rows): even and >= 4, got {m}")
    if any(d < 1 for d in group["dims"]):
        parser.error(f"dims must be >= 1, got {group['dims']}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return ""
    return commit + ("-dirty" if commit and dirty else "")


def cores() -> int:
    """CPU cores this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))


def environment(device: torch.device, threads: int) -> dict:
    """What every row of a run records about where it ran."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return dict(device=device_name(device), threads=threads, cores=cores(), torch=torch.__version__, triton=triton_version,
                git_commit=git_commit(), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def load_warning(load: float) -> str:
    """A warning line when the 1-minute load average reaches the core count, else ''."""
    if load < cores():
        return ""
    return (f"WARNING: 1-minute load average {load:.2f} >= {cores()} cores: other processes compete for the CPU, "
            "so times (and ratios between providers measured one after the other) are unreliable")


def default_name(args, device_label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", device_label.lower())).strip("-")
    name = f"{args.device}-{slug}" + (f"-{args.threads}t" if args.device == "cpu" else "")
    return name + ("-quick" if args.quick else "") + (f"-{args.preset}" if args.preset else "")


def plan(args) -> list[runner.Task]:
    tasks = {}
    for group in args.groups:
        for provider in group["providers"]:
            sizes = sorted(set(group["sizes"]) | (set(group["fused_sizes"]) if provider in providers.FUSED else set()))
            for m in sizes:
                for rule in group["rules"]:
                    for d in group["dims"]:
                        for dtype in group["dtypes"]:
                            for mode in group["modes"]:
                                for negatives, queue, positives in group["setups"]:
                                    task = runner.Task(provider, rule, m, d, dtype, mode, negatives, queue, positives)
                                    tasks.setdefault(task.key(), task)
    return list(tasks.values())


def blocked_tasks(tasks: list[runner.Task], device: torch.device) -> dict:
    """{task key: (status, reason)} of the tasks that will not run: provider unavailable here,
    or a set-up this fastalpha's API (or the provider) cannot express."""
    provider_status = {p: providers.status(p, device) for p in dict.fromkeys(t.provider for t in tasks)}
    blocked = {}
    for task in tasks:
        ok, reason = provider_status[task.provider]
        if not ok:
            blocked[task.key()] = ("unavailable", reason)
            continue
        status, reason = providers.setup_support(task.provider, task.rule, task.negatives, task.queue, task.positives)
        if status != "ok":
            blocked[task.key()] = (status, reason)
    return blocked


class Results:
    """The measurements so far. The CSV is rewritten after each one, so a run that is killed
    (a time limit on a borrowed GPU, say) leaves what it had measured on disk."""

    def __init__(self, tasks: list[runner.Task], blocked: dict, env: dict, csv_path: str, progress):
        self.tasks, self.blocked, self.env, self.csv_path, self.progress = tasks, blocked, env, csv_path, progress
        self.measured = {}

    def add(self, task: runner.Task, result: dict) -> None:
        """A timing result (with the peak on a GPU)."""
        self.measured[task.key()] = result
        self.progress.update(1)
        report.write_csv(self.rows(), self.csv_path)

    def add_memory(self, task: runner.Task, result: dict) -> None:
        """A CPU memory worker's figure (peak_mb or rss_growth_mb) for a task already timed."""
        row = self.measured[task.key()]
        for column in ("peak_mb", "rss_growth_mb"):
            if column in result:
                row[column] = result[column]
        if result.get("memory_note"):
            row["reason"] = f"{row['reason']}; {result['memory_note']}"
        self.progress.update(1)
        report.write_csv(self.rows(), self.csv_path)

    def rows(self) -> list[dict]:
        rows = []
        for task in self.tasks:
            if task.key() in self.blocked:
                status, reason = self.blocked[task.key()]
                result = dict(status=status, reason=reason)
            elif task.key() in self.measured:
                result = self.measured[task.key()]
            else:
                continue
            rows.append(dict(self.env, provider=task.provider, rule=task.rule, M=task.m, D=task.d, dtype=task.dtype,
                             mode=task.mode, negatives=task.negatives, queue=task.queue, positives=task.positives, **result))
        return report.add_derived(rows)


def _run_worker(phase: str, tasks: list[runner.Task], settings: runner.Settings, on_result, environ=None) -> str | None:
    """Run `tasks` in one worker subprocess, `on_result(task, result)` as each finishes.

    The worker starts from `environ` (default: this process's environment). Returns None, or
    why the worker died (the task in flight is then the first not reported)."""
    done = 0
    with tempfile.TemporaryDirectory(prefix="fastalpha-bench-") as tmp:
        spec_path, results_path, log_path = (os.path.join(tmp, n) for n in ("spec.json", "results.jsonl", "worker.log"))
        spec = dict(phase=phase, settings=dataclasses.asdict(settings), tasks=[dataclasses.asdict(t) for t in tasks])
        for cache in ("verdicts", "ceilings"):
            spec["settings"].pop(cache)
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        # The memory phase pins glibc's thresholds (bench/memory.py); the rss phase measures
        # the default allocator, so it drops them should the caller's environment set them.
        env = {k: v for k, v in (os.environ if environ is None else environ).items()
               if not (phase == "rss" and k in memory.EXACT_MALLOC_ENV)}
        env.update(memory.EXACT_MALLOC_ENV if phase == "memory" else {})
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "bench.worker", spec_path, results_path], cwd=ROOT, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            try:
                while True:
                    finished = proc.poll() is not None
                    if os.path.exists(results_path):
                        with open(results_path) as f:
                            # Only complete lines: a worker killed mid-write leaves a partial one.
                            lines = f.read().split("\n")[:-1]
                        for line in lines[done:]:
                            record = json.loads(line)
                            on_result(runner.Task(**record["task"]), record["result"])
                        done = len(lines)
                    if finished:
                        break
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:   # interrupted here: do not leave the worker running
                    proc.kill()
                    proc.wait()
        if done == len(tasks):
            return None
        with open(log_path) as f:
            tail = " | ".join(f.read().strip().splitlines()[-3:])
    if proc.returncode in (-9, 137):
        return "OOM: worker killed by SIGKILL during this measurement (the kernel's OOM killer, most likely)"
    return f"error: worker exited with code {proc.returncode}: {tail[-300:]}"


def _run_phase(phase: str, tasks: list[runner.Task], settings: runner.Settings, on_result, on_death, progress,
               environ=None) -> None:
    """All `tasks` through workers of one phase (started from `environ`, default this
    process's environment); a worker that dies is replaced and the task in flight handed to
    `on_death(task, why)`."""
    remaining = list(tasks)
    while remaining:
        reported = set()

        def describe_next():
            pending = [t for t in remaining if t.key() not in reported]
            if pending:
                t = pending[0]
                progress.set_postfix_str(f"{phase} {t.provider} M={t.m} {t.rule} D={t.d} {t.dtype} {t.mode}")

        def record(task, result):
            reported.add(task.key())
            on_result(task, result)
            describe_next()

        describe_next()
        death = _run_worker(phase, remaining, settings, record, environ)
        if death is None:
            return
        in_flight = next(t for t in remaining if t.key() not in reported)
        on_death(in_flight, death)
        remaining = [t for t in remaining if t.key() not in reported and t.key() != in_flight.key()]


def memory_steps(settings: runner.Settings) -> tuple[str, ...]:
    """The CPU memory phases of a run, in order."""
    return {"pinned": ("memory",), "fresh": ("rss",), "both": ("memory", "rss"), "none": ()}[settings.memory]


def run_cpu(tasks: list[runner.Task], settings: runner.Settings, results: Results, environ=None) -> None:
    """Per provider: a timing worker over its tasks (torch.compile's caches then serve all its
    sizes), then the memory phases over those that ran: one pinned-allocator worker for all of
    them, and one fresh default-allocator process per task. A task measured in a single call
    (slower than settings.single_call_s) gets no memory measurement: it would take that long again.
    Workers start from `environ` (default: this process's environment)."""
    by_provider = defaultdict(list)
    for task in tasks:
        by_provider[task.provider].append(task)
    blank = dict(median_ms=None, p20_ms=None, p80_ms=None, repeats=0, peak_mb=None, rss_growth_mb=None)
    phases = memory_steps(settings)

    def timing_died(task, why):
        status, reason = why.split(": ", 1)
        results.add(task, dict(blank, status=status, reason=reason, load_start=None, load_end=os.getloadavg()[0]))

    def memory_died(task, why):
        results.add_memory(task, dict(memory_note=f"memory not measured: {why}"))

    for provider_tasks in by_provider.values():
        _run_phase("time", provider_tasks, settings, results.add, timing_died, results.progress, environ)
        timed = [t for t in provider_tasks if results.measured[t.key()]["status"] == "ok"]
        single = [t for t in timed if results.measured[t.key()].get("single_call")]
        for task in single:
            if phases:
                results.measured[task.key()]["reason"] += "; memory not measured (single call)"
        timed = [t for t in timed if t not in single]
        results.progress.update((len(provider_tasks) - len(timed)) * len(phases))   # no memory step for those
        for phase in phases:
            if phase == "memory":
                _run_phase(phase, timed, settings, results.add_memory, memory_died, results.progress, environ)
            else:   # a fresh process per task
                for task in timed:
                    _run_phase(phase, [task], settings, results.add_memory, memory_died, results.progress, environ)


def run_cuda(tasks: list[runner.Task], settings: runner.Settings, results: Results) -> None:
    """In this process, smallest M first across providers: a run cut short by a time limit
    then still compares every provider on the sizes it reached."""
    order = {name: i for i, name in enumerate(providers.PROVIDERS)}
    for task in sorted(tasks, key=lambda t: (t.m, t.rule, t.d, t.dtype, t.mode, t.negatives, t.queue, t.positives,
                                             order[t.provider])):
        results.progress.set_postfix_str(f"{task.provider} M={task.m} {task.rule} {task.dtype} {task.mode} {task.setup()}")
        results.add(task, runner.run(task, settings))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = environment(device, torch.get_num_threads())
    load_start = os.getloadavg()[0]
    name = args.name or default_name(args, env["device"])
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, name + ".csv")
    settings = runner.Settings(device=args.device, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                               budget_s=args.budget_s, cap_bytes=memory.default_cap_bytes(device, args.mem_cap_gb), seed=args.seed,
                               memory=args.memory if device.type == "cpu" else "none", single_call_s=args.single_call_s,
                               rule_params=presets.PRESETS[args.preset].get("rule_params", "default") if args.preset else "default")
    tasks = plan(args)
    blocked = blocked_tasks(tasks, device)
    runnable = [t for t in tasks if t.key() not in blocked]
    header = dict(env, load_start=load_start)
    print(f"fastalpha bench: {report.machine_line(header)}; triton {env['triton'] or '-'}; "
          f"memory cap {settings.cap_bytes / 2**30:.1f} GiB; {len(runnable)} measurements -> {csv_path}")
    if device.type == "cpu":
        print(f"compute ceiling: the cpp kernel's {timing.CEILING_TILE}-row tile products (fwd: S = A B^T; fwd+bwd: S twice, "
              f"G_a += W B, G_b += W^T A) into cache-resident outputs, {settings.threads} single-threaded worker processes at "
              f"once (column 'ceil' = true GFLOP/s / its rate); FMA peak at the reported clock (column 'peak'): "
              f"{timing.fma_peak_gflops(settings.threads, torch.float32)[1]}")
    if load_warning(load_start):
        print(load_warning(load_start))
    for (status, reason) in dict.fromkeys(v for v in blocked.values() if v[0] == "skipped"):
        print(f"set-ups skipped: {reason}")

    steps = len(runnable) * (1 + (len(memory_steps(settings)) if device.type == "cpu" else 0))
    interrupted = False
    with tqdm(total=steps, desc="bench", unit="step", dynamic_ncols=True, mininterval=1.0) as progress:
        results = Results(tasks, blocked, env, csv_path, progress)
        try:
            (run_cuda if device.type == "cuda" else run_cpu)(runnable, settings, results)
        except KeyboardInterrupt:   # e.g. `timeout -s INT`: report what was measured
            interrupted = True

    rows = results.rows()
    load_end = os.getloadavg()[0]
    report.write_csv(rows, csv_path)
    print(f"\n{report.machine_line(header, load_end)}")
    print(report.table(rows))
    if load_warning(load_end):
        print(load_warning(load_end))
    if args.preset:
        targets = presets.target_report(args.preset, rows, header, load_end)
        if targets:
            print("\n" + targets)
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        title = f"{name}: {report.machine_line(header, load_end)}"
        png = plots.plot_results(rows, os.path.join(args.out, name + ".png"), title)
        if png:
            print(f"wrote {png}")
    if interrupted:
        print(f"interrupted: {len(results.measured)} of {len(runnable)} measurements done")
        raise SystemExit(130)
    return rows


if __name__ == "__main__":
    main()

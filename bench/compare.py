r"""Benchmark of the α-CL loss implementations: time, peak memory and GFLOP/s against eager.

    python bench/compare.py                       # CPU default sweep (< 5 minutes on 2 cores)
    python bench/compare.py --quick               # about a minute
    python bench/compare.py --device cuda         # GPU default sweep
    python bench/compare.py --providers eager-chunked,cpp --rules square --sizes 2048,8192 \
        --dims 64,128 --dtypes float32 --modes fwd,fwdbwd --repeats 7 --out /tmp/bench

For every provider (bench/providers.py) and every (rule, M, D, dtype, mode):
  1. the provider must agree with the float64 dense reference on a small input (value and
     gradients, tests/tolerances.py) or it is reported `wrong` and not timed;
  2. a size whose predicted peak exceeds the memory cap (--mem-cap-gb) is recorded `OOM`, as is
     one that fails to allocate, and the sweep goes on;
  3. otherwise it is warmed up and timed (median, p20, p80 over the repeats) and its peak memory
     beyond the inputs is taken. On the CPU each provider runs in its own worker subprocess
     (bench/worker.py) that reads its RSS high-water mark; on a GPU, in this process with
     torch.cuda.max_memory_allocated and triton.testing.do_bench.
A matmul of the same shape class is timed by the same process, next to the measurements, for
the GFLOP/s ceiling.

Writes OUT/NAME.csv (one row per measurement, columns in bench/report.py) and OUT/NAME.png
(bench/plots.py), and prints a table. Providers that cannot run here are reported
`unavailable` with the reason fastalpha gives, not left out.
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
from bench import memory, plots, providers, report, runner  # noqa: E402

DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                 "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}

#: The default sweeps. "fused_sizes" are run by the fused providers (cpp/cuda/triton) only.
#: CPU: sized to finish in about 5 minutes on the project's 2-core machine (the fused-only
#: M = 24576 = 3·2^13 alone is a third of it); the dense providers stop where their predicted
#: peak passes the 4 GiB cap (eager at M = 16384, compile's fwd+bwd too).
DEFAULTS = {
    "cpu": dict(sizes=[1024, 4096, 8192, 16384], fused_sizes=[24576], dims=[128], rules=["direct", "infonce"],
                dtypes=["float32"], modes=["fwd", "fwdbwd"], repeats=5, budget_s=3.0),
    "cuda": dict(sizes=[4096, 16384, 65536, 262144], fused_sizes=[1048576], dims=[128], rules=["direct", "infonce"],
                 dtypes=["float32", "bfloat16"], modes=["fwdbwd"], repeats=10, budget_s=3.0),
}
#: --quick: a subset that takes about a minute (torch.compile is left out: its first compile
#: alone can take a minute on 2 cores; ask for it with --providers).
QUICK = {
    "cpu": dict(sizes=[1024, 2048], fused_sizes=[8192], rules=["direct"], modes=["fwd", "fwdbwd"], repeats=3, budget_s=1.0,
                providers=["eager", "eager-chunked", "cpp"]),
    "cuda": dict(sizes=[4096, 16384, 65536], fused_sizes=[262144], rules=["direct"], dtypes=["float32", "bfloat16"],
                 modes=["fwdbwd"], repeats=5, budget_s=1.0, providers=["eager", "eager-chunked", "triton", "cuda"]),
}


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="a ~1-minute subset of the default sweep")
    parser.add_argument("--providers", type=_list(str), help=f"comma list from {','.join(providers.PROVIDERS)}")
    parser.add_argument("--rules", type=_list(str), help=f"comma list from {','.join(fastalpha.RULES)}")
    parser.add_argument("--sizes", type=_list(int), help="M values (M = 2N stacked rows), for every provider")
    parser.add_argument("--fused-sizes", type=_list(int), help="extra M values for the fused providers (cpp/cuda/triton) only; '' for none")
    parser.add_argument("--dims", type=_list(int), help="D values")
    parser.add_argument("--dtypes", type=_list(str), help="comma list from float32,bfloat16,float16,float64 (fp32/bf16/... accepted)")
    parser.add_argument("--modes", type=_list(str), help="comma list from fwd,fwdbwd")
    parser.add_argument("--repeats", type=int, help="timed calls per measurement (at least 3 where the time budget cuts them short)")
    parser.add_argument("--budget-s", type=float, help="stop repeating a measurement after this many seconds (min 3 calls)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (at least 1; torch.compile gets one more)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch CPU threads (default: all cores)")
    parser.add_argument("--mem-cap-gb", type=float, help="memory cap; default 90%% of free GPU memory, or min(4 GiB, MemAvailable/2) on the CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="output directory (default bench/results/)")
    parser.add_argument("--name", help="file name stem (default: device and model, e.g. cpu-intel-xeon-processor-2t)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)

    sizes_only = args.sizes is not None and args.fused_sizes is None   # explicit --sizes: exactly those
    chosen = dict(DEFAULTS[args.device], providers=list(providers.DEFAULT_PROVIDERS[args.device]))
    if args.quick:
        chosen.update(QUICK[args.device])
    for key, value in chosen.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if sizes_only:
        args.fused_sizes = []
    for key in ("providers", "rules", "sizes", "dims", "dtypes", "modes"):
        if not getattr(args, key):
            parser.error(f"--{key} is empty")
    for name in args.providers:
        if name not in providers.PROVIDERS:
            parser.error(f"unknown provider {name!r}; expected one of {providers.PROVIDERS}")
    for rule in args.rules:
        if rule not in fastalpha.RULES:
            parser.error(f"unknown rule {rule!r}; expected one of {fastalpha.RULES}")
    for mode in args.modes:
        if mode not in runner.MODES:
            parser.error(f"unknown mode {mode!r}; expected one of {runner.MODES}")
    try:
        args.dtypes = [DTYPE_ALIASES[t] for t in args.dtypes]
    except KeyError as err:
        parser.error(f"unknown dtype {err.args[0]!r}; expected one of {sorted(DTYPE_ALIASES)}")
    for m in args.sizes + args.fused_sizes:
        if m < 4 or m % 2:
            parser.error(f"sizes are M = 2N stacked rows: even and >= 4, got {m}")
    if any(d < 1 for d in args.dims):
        parser.error(f"dims must be >= 1, got {args.dims}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    return args


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


def environment(device: torch.device, threads: int) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return dict(device=device_name(device), threads=threads, torch=torch.__version__, triton=triton_version,
                git_commit=git_commit(), timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def default_name(args, device_label: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\((r|tm)\)", "", device_label.lower())).strip("-")
    name = f"{args.device}-{slug}" + (f"-{args.threads}t" if args.device == "cpu" else "")
    return name + ("-quick" if args.quick else "")


def plan(args) -> list[runner.Task]:
    tasks = []
    for provider in args.providers:
        sizes = sorted(set(args.sizes) | (set(args.fused_sizes) if provider in providers.FUSED else set()))
        for m in sizes:
            for rule in args.rules:
                for d in args.dims:
                    for dtype in args.dtypes:
                        for mode in args.modes:
                            tasks.append(runner.Task(provider, rule, m, d, dtype, mode))
    return tasks


class Results:
    """The measurements so far. The CSV is rewritten after each one, so a run that is killed
    (a time limit on a borrowed GPU, say) leaves what it had measured on disk."""

    def __init__(self, tasks: list[runner.Task], status: dict, env: dict, csv_path: str, progress):
        self.tasks, self.status, self.env, self.csv_path, self.progress = tasks, status, env, csv_path, progress
        self.measured = {}

    def add(self, task: runner.Task, result: dict) -> None:
        """A timing result (with the peak on a GPU)."""
        self.measured[task.key()] = result
        self.progress.update(1)
        report.write_csv(self.rows(), self.csv_path)

    def add_memory(self, task: runner.Task, result: dict) -> None:
        """The CPU memory worker's peak for a task already timed."""
        row = self.measured[task.key()]
        row["peak_mb"] = result.get("peak_mb")
        if result.get("memory_note"):
            row["reason"] = f"{row['reason']}; {result['memory_note']}"
        self.progress.update(1)
        report.write_csv(self.rows(), self.csv_path)

    def rows(self) -> list[dict]:
        rows = []
        for task in self.tasks:
            ok, reason = self.status[task.provider]
            if ok and task.key() not in self.measured:
                continue
            result = self.measured[task.key()] if ok else dict(status="unavailable", reason=reason, load_1min=None)
            rows.append(dict(provider=task.provider, rule=task.rule, M=task.m, D=task.d, dtype=task.dtype, mode=task.mode,
                             **result, **self.env))
        return report.add_derived(rows)


def _run_worker(phase: str, tasks: list[runner.Task], settings: runner.Settings, on_result) -> str | None:
    """Run `tasks` in one worker subprocess, `on_result(task, result)` as each finishes.

    Returns None, or why the worker died (the task in flight is then the first not reported)."""
    done = 0
    with tempfile.TemporaryDirectory(prefix="fastalpha-bench-") as tmp:
        spec_path, results_path, log_path = (os.path.join(tmp, n) for n in ("spec.json", "results.jsonl", "worker.log"))
        spec = dict(phase=phase, settings=dataclasses.asdict(settings), tasks=[dataclasses.asdict(t) for t in tasks])
        for cache in ("verdicts", "ceilings"):
            spec["settings"].pop(cache)
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, **(memory.EXACT_MALLOC_ENV if phase == "memory" else {}))
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


def _run_phase(phase: str, tasks: list[runner.Task], settings: runner.Settings, on_result, on_death, progress) -> None:
    """All `tasks` through workers of one phase; a worker that dies is replaced and the task in
    flight handed to `on_death(task, why)`."""
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
        death = _run_worker(phase, remaining, settings, record)
        if death is None:
            return
        in_flight = next(t for t in remaining if t.key() not in reported)
        on_death(in_flight, death)
        remaining = [t for t in remaining if t.key() not in reported and t.key() != in_flight.key()]


def run_cpu(tasks: list[runner.Task], settings: runner.Settings, results: Results) -> None:
    """Per provider: a timing worker over its tasks (torch.compile's caches then serve all its
    sizes), then a memory worker over those that ran."""
    by_provider = defaultdict(list)
    for task in tasks:
        by_provider[task.provider].append(task)
    blank = dict(median_ms=None, p20_ms=None, p80_ms=None, repeats=0, peak_mb=None)

    def timing_died(task, why):
        status, reason = why.split(": ", 1)
        results.add(task, dict(blank, status=status, reason=reason, load_1min=os.getloadavg()[0]))

    def memory_died(task, why):
        results.add_memory(task, dict(peak_mb=None, memory_note=f"peak memory not measured: {why}"))

    for provider_tasks in by_provider.values():
        _run_phase("time", provider_tasks, settings, results.add, timing_died, results.progress)
        timed = [t for t in provider_tasks if results.measured[t.key()]["status"] == "ok"]
        results.progress.update(len(provider_tasks) - len(timed))   # no memory step for those
        _run_phase("memory", timed, settings, results.add_memory, memory_died, results.progress)


def run_cuda(tasks: list[runner.Task], settings: runner.Settings, results: Results) -> None:
    """In this process, smallest M first across providers: a run cut short by a time limit
    then still compares every provider on the sizes it reached."""
    order = {name: i for i, name in enumerate(providers.PROVIDERS)}
    for task in sorted(tasks, key=lambda t: (t.m, t.rule, t.d, t.dtype, t.mode, order[t.provider])):
        results.progress.set_postfix_str(f"{task.provider} M={task.m} {task.rule} {task.dtype} {task.mode}")
        results.add(task, runner.run(task, settings))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    env = environment(device, torch.get_num_threads())
    name = args.name or default_name(args, env["device"])
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, name + ".csv")
    settings = runner.Settings(device=args.device, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                               budget_s=args.budget_s, cap_bytes=memory.default_cap_bytes(device, args.mem_cap_gb), seed=args.seed)
    tasks = plan(args)
    status = {p: providers.status(p, device) for p in args.providers}
    runnable = [t for t in tasks if status[t.provider][0]]
    print(f"fastalpha bench: {env['device']}, {env['threads']} threads, torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['git_commit']}; memory cap {settings.cap_bytes / 2**30:.1f} GiB; {len(runnable)} measurements -> {csv_path}")

    steps = len(runnable) * (1 if device.type == "cuda" else 2)   # CPU: a timing and a memory step each
    interrupted = False
    with tqdm(total=steps, desc="bench", unit="step", dynamic_ncols=True, mininterval=1.0) as progress:
        results = Results(tasks, status, env, csv_path, progress)
        try:
            (run_cuda if device.type == "cuda" else run_cpu)(runnable, settings, results)
        except KeyboardInterrupt:   # e.g. `timeout -s INT`: report what was measured
            interrupted = True

    rows = results.rows()
    report.write_csv(rows, csv_path)
    print(report.table(rows))
    print(f"\nwrote {csv_path}")
    if not args.no_plot:
        png = plots.plot_results(rows, os.path.join(args.out, name + ".png"), f"{name}: {env['device']}, {env['threads']} threads, torch {env['torch']}")
        if png:
            print(f"wrote {png}")
    if interrupted:
        print(f"interrupted: {len(results.measured)} of {len(runnable)} measurements done")
        raise SystemExit(130)
    return rows


if __name__ == "__main__":
    main()

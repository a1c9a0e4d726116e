"""Global-batch α-CL over gloo ranks equals one process on the whole batch (fastalpha.distributed).

For each world size W the W ranks are started ONCE, as subprocesses of this file (gloo, a
rendezvous file of the test's own, a wall-clock timeout), when the session starts and beside
the other tests (tests/background.py). They run every case below and write what they got
(per-rank loss, input gradients, which anchor rows each fused call computed, errors) to a
file; the tests here compare those with the float64 dense reference — autograd of
fastalpha.reference on the global batch — at the tolerances of fastalpha.testing.

Semantics under test (fastalpha/distributed.py): with reduction "mean"/"sum" rank r returns
W × its anchors' share of the global loss and receives W × the global gradient of its rows,
so DDP's average is exact; with "none" it returns its V·N_r anchor losses and receives the
gradient of Σ over ranks of what the ranks backpropagate. With labels or V views (the
GroupedCase cases) the reference is the single-process grouped loss of the concatenated
batch, and "mean" divides by its global number of anchors with a positive.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import traceback
import warnings
import zlib
from dataclasses import asdict, dataclass
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import background
import fastalpha
import triton_interpreter
from fastalpha import AlphaCLLoss, InfoNCELoss, SupConLoss, dispatch, positives, reference
from fastalpha.distributed import alpha_cl_loss_distributed
from fastalpha.rules import make_spec
from fastalpha.testing import assert_close, loss_scale, precision_of

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD_SIZES = (2, 3)
#: Pairs per rank: unequal by default (N_r = 1 included), and an equal split.
RANK_SIZES = {2: {"unequal": (3, 5), "equal": (3, 3)}, 3: {"unequal": (2, 4, 1), "equal": (2, 2, 2)}}
DIM = 5
RULES = ("quadratic", "entropy", "direct", "inverse", "square", "infonce")
WORKER_TIMEOUT_S = 240
DDP_STEPS, DDP_LR, DDP_IN = 3, 0.2, 6


@dataclass(frozen=True)
class _RuleCase:
    """What a loss case and a DDP case name first: the backend, the rule, and whether α is a
    stop-gradient (a flag of the case's name when it is not)."""
    backend: str
    rule: str
    detach_alpha: bool = True

    def _alpha_flags(self) -> list:
        return [] if self.detach_alpha else ["backprop-alpha"]


@dataclass(frozen=True)
class Case(_RuleCase):
    reduction: str = "mean"
    dtype: str = "float64"
    split: str = "unequal"
    normalize: bool = True
    grad: bool = True

    @property
    def name(self) -> str:
        flags = self._alpha_flags()
        flags += [] if self.normalize else ["unnormalised"]
        flags += [] if self.grad else ["no-grad"]
        return "-".join([self.backend, self.rule, self.reduction, self.dtype, self.split] + flags)


@dataclass(frozen=True)
class DDPCase(_RuleCase):
    dtype: str = "float64"
    module: str = "AlphaCLLoss"

    @property
    def name(self) -> str:
        return "-".join(["ddp", self.module, self.backend, self.rule, self.dtype] + self._alpha_flags())


def _loss_cases() -> list:
    cases = [Case("eager", rule, detach, reduction) for rule in RULES for detach in (True, False)
             for reduction in ("mean", "sum", "none")]
    cases += [Case("eager", rule, dtype="float32", split="equal") for rule in RULES]
    cases += [Case("eager", "direct", normalize=False), Case("eager", "infonce", reduction="none", normalize=False),
              Case("eager", "entropy", grad=False), Case("eager", "square", detach_alpha=False, split="equal")]
    cases += [Case("chunked", rule, detach, "mean", "float32") for rule in RULES for detach in (True, False)]
    cases += [Case("chunked", "square", False, "none"), Case("chunked", "infonce", reduction="sum", normalize=False)]
    cases += [Case("cpp", rule, detach, reduction, "float32") for rule in RULES for detach in (True, False)
              for reduction in ("mean", "none")]
    cases += [Case("cpp", rule) for rule in RULES]
    cases += [Case("triton", rule, dtype="float32") for rule in RULES]
    cases += [Case("triton", "direct", reduction="none", dtype="float32"),
              Case("triton", "entropy", detach_alpha=False, dtype="float32", split="equal")]
    # `auto` may pick a kernel without β for square and must then fall back to eager.
    cases += [Case("auto", "direct", dtype="float32"), Case("auto", "square", detach_alpha=False, dtype="float32")]
    return cases


LOSS_CASES = _loss_cases()
DDP_CASES = [DDPCase("eager", "direct"), DDPCase("eager", "entropy", detach_alpha=False),
             DDPCase("eager", "infonce", module="InfoNCELoss"), DDPCase("auto", "square", dtype="float32"),
             DDPCase("cpp", "direct", dtype="float32"), DDPCase("triton", "inverse", dtype="float32")]
#: Bad inputs on some ranks: every rank must raise (none may hang in a later collective).
ERROR_CASES = ("columns-differ", "one-rank-int", "dtype-differs", "grad-differs", "empty-rank", "views-differ",
               "labels-on-one-rank", "bad-labels-one-rank", "queue-size-differs")

#: Rows per rank of the grouped cases: uneven, as in the last batch of an epoch (N_r = 1 included).
GROUPED_SIZES = {2: (5, 2), 3: (5, 3, 1)}
GROUPED_VIEWS = 3
#: The grouped set-ups: (how the call is made, rule, views V, labels). "local-distinct" labels
#: are one per row, all different on each rank but shared across ranks (every positive lives on
#: another rank; the sum of the ranks' local anchor counts is 0, the global count is not), with
#: labels that occur once globally (anchors without a positive, left out of "mean").
GROUPED_SETUPS = {
    "sample-labels": ("AlphaCLLoss-list", "direct", GROUPED_VIEWS, "per-sample"),
    "row-labels": ("AlphaCLLoss-stack", "infonce", GROUPED_VIEWS, "local-distinct"),
    "supcon-one-view": ("SupConLoss", "infonce", 1, "local-distinct"),
    "views-only": ("AlphaCLLoss-stack", "entropy", GROUPED_VIEWS, None),
    "labelled-queue": ("AlphaCLLoss-stack", "infonce", 2, "local-distinct"),
}
GROUPED_QUEUE_ROWS = 4
SUPCON_TAU = 0.3


@dataclass(frozen=True)
class GroupedCase:
    backend: str
    setup: str
    reduction: str = "mean"

    @property
    def name(self) -> str:
        return "-".join(["grouped", self.backend, self.setup, self.reduction])


# "sum" is "mean" with another scale in the distributed layer: the eager backend covers it.
GROUPED_CASES = [GroupedCase(backend, setup, reduction) for backend in ("eager", "chunked", "cpp")
                 for setup in ("sample-labels", "row-labels", "supcon-one-view", "views-only")
                 for reduction in (("mean", "sum", "none") if backend == "eager" else ("mean", "none"))]
GROUPED_CASES += [GroupedCase(backend, "labelled-queue", reduction) for backend in ("eager", "chunked")
                  for reduction in ("mean", "none")]


# ----------------------------------------------------------------------------- worker side

def _worker_main(cases_path: str, out_path: str) -> None:
    """One rank: run every case of `cases_path` inside one gloo group, save results to `out_path`."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    triton_interpreter.install()  # the ranks run their Triton cases in the interpreter too
    dist.init_process_group("gloo", init_method=f"file://{os.environ['FASTALPHA_TEST_RENDEZVOUS']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=60))
    spec = torch.load(cases_path, weights_only=False)  # written by the parent test
    calls = []
    real_implementation = dispatch.implementation

    def recording_implementation(name):  # records which rows each fused call computes
        kernel = real_implementation(name)

        def recorded(z, spec, row_lo, row_hi, row_weight, *rest, **kwargs):
            calls.append((z.shape[0], row_lo, row_hi, row_weight is not None))
            return kernel(z, spec, row_lo, row_hi, row_weight, *rest, **kwargs)

        return recorded

    dispatch.implementation = recording_implementation
    results = {"status": {}}
    for backend in ("eager", "chunked", "cpp", "triton"):
        try:  # a backend still being written must not take the eager cases down with it
            results["status"][backend] = dispatch.backend_status(backend, torch.device("cpu"))
        except Exception as err:
            results["status"][backend] = (backend == "eager", f"status() raised {type(err).__name__}: {err}")
    for name in ERROR_CASES:
        results[name] = _guarded(lambda: _run_error_case(name, rank, world))
    for fields, data in spec["loss"]:
        case = Case(**fields)
        if case.backend != "auto" and not results["status"][case.backend][0]:
            continue
        calls.clear()
        results[case.name] = _guarded(lambda: _run_loss_case(case, data, rank))
        results[case.name]["calls"] = list(calls)
    for fields, data in spec["ddp"]:
        case = DDPCase(**fields)
        if case.backend != "auto" and not results["status"][case.backend][0]:
            continue
        results[case.name] = _guarded(lambda: _run_ddp_case(case, data, rank))
    for fields, data in spec["grouped"]:
        case = GroupedCase(**fields)
        if not results["status"][case.backend][0]:
            continue
        calls.clear()
        results[case.name] = _guarded(lambda: _run_grouped_case(case, data, rank))
        results[case.name]["calls"] = list(calls)
    results["ddp-supcon"] = _guarded(lambda: _run_supcon_ddp(spec["supcon_ddp"], rank))
    torch.save(results, out_path)
    dist.destroy_process_group()


def _guarded(run) -> dict:
    try:
        return run()
    except Exception as err:  # reported to the parent, which fails (or skips) the test
        return {"error": (type(err).__name__, str(err), traceback.format_exc())}


def _run_loss_case(case: Case, data: dict, rank: int) -> dict:
    z1 = data["z1"][rank].clone().requires_grad_(case.grad)
    z2 = data["z2"][rank].clone().requires_grad_(case.grad)
    with torch.set_grad_enabled(case.grad):
        loss = alpha_cl_loss_distributed(z1, z2, rule=case.rule, detach_alpha=case.detach_alpha, normalize=case.normalize,
                                         reduction=case.reduction, backend=case.backend)
    if not case.grad:
        return {"value": loss.detach(), "requires_grad": loss.requires_grad}
    loss.backward(data["weights"][rank] if case.reduction == "none" else None)
    return {"value": loss.detach(), "g1": z1.grad, "g2": z2.grad}


def _train_linear_with_ddp(data: dict, rank: int, dtype, loss_of_batch) -> dict:
    """SGD with momentum on a DDP-wrapped Linear model from data["init"], over this rank's
    data["batches"]: each step's loss is loss_of_batch(ddp_model, batch). Returns the losses
    and the final weights."""
    model = torch.nn.Linear(DDP_IN, DIM, dtype=dtype)
    model.load_state_dict(data["init"])
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=DDP_LR, momentum=0.9)
    losses = []
    for batch in data["batches"][rank]:
        loss = loss_of_batch(ddp, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def _run_ddp_case(case: DDPCase, data: dict, rank: int) -> dict:
    if case.module == "InfoNCELoss":
        loss_fn = InfoNCELoss(backend=case.backend, gather_distributed=True)
    else:
        loss_fn = AlphaCLLoss(rule=case.rule, detach_alpha=case.detach_alpha, backend=case.backend, gather_distributed=True)

    def loss_of_views(ddp, views):
        x1, x2 = views
        return loss_fn(*ddp(torch.cat([x1, x2])).split(x1.shape[0]))
    return _train_linear_with_ddp(data, rank, getattr(torch, case.dtype), loss_of_views)


def _run_grouped_case(case: GroupedCase, data: dict, rank: int) -> dict:
    how, rule, _, _ = GROUPED_SETUPS[case.setup]
    x = data["x"][rank].clone().requires_grad_()  # (V, N_r, D)
    labels = data["labels"][rank]
    weights = data["weights"][rank] if case.reduction == "none" else None
    if how == "SupConLoss":
        loss = SupConLoss(SUPCON_TAU, case.reduction, case.backend, gather_distributed=True)(x[0], labels)
    else:
        loss_fn = AlphaCLLoss(rule=rule, temperature=SUPCON_TAU if rule == "infonce" else None,
                              eps=1.0 if rule == "infonce" else None, reduction=case.reduction, backend=case.backend,
                              gather_distributed=True)
        views = list(x.unbind(0)) if how == "AlphaCLLoss-list" else x
        loss = loss_fn(views, labels=labels, queue=data.get("queue"), queue_labels=data.get("queue_labels"))
    loss.backward(weights)
    return {"value": loss.detach(), "grad": x.grad}


def _run_supcon_ddp(data: dict, rank: int) -> dict:
    """A Linear model trained with DDP and SupConLoss(gather_distributed=True) on uneven shares."""
    loss_fn = SupConLoss(SUPCON_TAU, backend="chunked", gather_distributed=True)

    def loss_of_labelled(ddp, batch):
        x, labels = batch
        return loss_fn(ddp(x), labels)
    return _train_linear_with_ddp(data, rank, torch.float64, loss_of_labelled)


def _run_error_case(name: str, rank: int, world: int) -> dict:
    z1, z2 = torch.randn(3, DIM, dtype=torch.float64), torch.randn(3, DIM, dtype=torch.float64)
    if name in ("views-differ", "labels-on-one-rank", "bad-labels-one-rank", "queue-size-differs"):
        views = torch.stack([z1, z2, z1 + z2] if name == "views-differ" and rank == 0 else [z1, z2])
        labels = torch.arange(3) if name in ("labels-on-one-rank", "bad-labels-one-rank") else None
        if name == "labels-on-one-rank" and rank != 0:
            labels = None
        if name == "bad-labels-one-rank" and rank == world - 1:
            labels = torch.arange(4)
        queue = torch.randn(2 if rank == 0 else 3, DIM, dtype=torch.float64) if name == "queue-size-differs" else None
        alpha_cl_loss_distributed(views, backend="eager", labels=labels, queue=queue)
        return {"error": None}
    if name == "columns-differ" and rank == 0:
        z1, z2 = z1[:, :-1], z2[:, :-1]
    if name == "one-rank-int" and rank == world - 1:
        z1 = z1.long()
    if name == "dtype-differs" and rank == 0:
        z1, z2 = z1.float(), z2.float()
    if name == "grad-differs" and rank == 0:
        z1.requires_grad_()
    if name == "empty-rank" and rank == 1:
        z1, z2 = z1[:0], z2[:0]
    alpha_cl_loss_distributed(z1, z2, backend="eager")
    return {"error": None}


# ----------------------------------------------------------------------------- parent side

def _split(tensor: torch.Tensor, sizes) -> list:
    return [piece.clone() for piece in tensor.split(list(sizes))]


def _make_inputs(world: int, gen: torch.Generator) -> dict:
    """Fresh global batches for every case, already split by rank as the workers receive them."""
    loss = []
    for case in LOSS_CASES:
        sizes = RANK_SIZES[world][case.split]
        n, dtype = sum(sizes), getattr(torch, case.dtype)
        z1 = torch.randn(n, DIM, generator=gen, dtype=torch.float64).to(dtype)
        z2 = (z1.double() + 0.7 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)).to(dtype)
        weights = torch.randn(2 * n, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
        own = [torch.cat([weights[:n].split(list(sizes))[r], weights[n:].split(list(sizes))[r]]) for r in range(world)]
        loss.append((case, {"z1": _split(z1, sizes), "z2": _split(z2, sizes), "weights": own,
                            "global": {"z1": z1, "z2": z2, "weights": weights}}))
    ddp = []
    sizes = RANK_SIZES[world]["unequal"]
    for case in DDP_CASES:
        dtype = getattr(torch, case.dtype)
        init = {"weight": torch.randn(DIM, DDP_IN, generator=gen, dtype=torch.float64).to(dtype) / math.sqrt(DDP_IN),
                "bias": 0.1 * torch.randn(DIM, generator=gen, dtype=torch.float64).to(dtype)}
        steps = []
        for _ in range(DDP_STEPS):
            x1 = torch.randn(sum(sizes), DDP_IN, generator=gen, dtype=torch.float64).to(dtype)
            steps.append((x1, (x1.double() + 0.5 * torch.randn(x1.shape, generator=gen, dtype=torch.float64)).to(dtype)))
        per_rank = [[(_split(x1, sizes)[r], _split(x2, sizes)[r]) for x1, x2 in steps] for r in range(world)]
        ddp.append((case, {"init": init, "batches": per_rank, "global": steps}))
    grouped = [(case, _grouped_inputs(case, world, gen)) for case in GROUPED_CASES]
    return {"loss": loss, "ddp": ddp, "grouped": grouped, "supcon_ddp": _supcon_ddp_inputs(world, gen)}


def _local_rows(rows: torch.Tensor, sizes, rank: int, views: int) -> torch.Tensor:
    """Rank r's rows of a per-row tensor in the global order (view after view, ranks in order),
    in the rank's own stacked order (its rows view after view)."""
    n, lo = sum(sizes), sum(sizes[:rank])
    return torch.cat([rows[v * n + lo: v * n + lo + sizes[rank]] for v in range(views)])


def _local_distinct_labels(sizes, views: int, gen: torch.Generator) -> torch.Tensor:
    """Per-row labels of the global batch (global order), all different on each rank, shared
    across ranks: local row j of every rank gets label perm[j], so the ranks' first rows share
    labels and rank 0's last rows (beyond the others' shares) have none to share."""
    perm = torch.randperm(views * max(sizes), generator=gen)
    local = [perm[: views * size] for size in sizes]
    n = sum(sizes)
    rows = torch.empty(views * n, dtype=torch.int64)
    for rank, own in enumerate(local):
        lo = sum(sizes[:rank])
        for v in range(views):
            rows[v * n + lo: v * n + lo + sizes[rank]] = own[v * sizes[rank]:(v + 1) * sizes[rank]]
    return rows


def _grouped_inputs(case: GroupedCase, world: int, gen: torch.Generator) -> dict:
    """A fresh global batch (V, N, D) and its labels; per-rank shares as the workers receive them."""
    _, _, views, labelling = GROUPED_SETUPS[case.setup]
    sizes = GROUPED_SIZES[world]
    n = sum(sizes)
    x = torch.randn(views, n, DIM, generator=gen, dtype=torch.float64)
    if labelling == "per-sample":
        labels = torch.randint(0, 3, (n,), generator=gen)
        own_labels = _split(labels, sizes)
    elif labelling == "local-distinct":
        labels = _local_distinct_labels(sizes, views, gen)
        own_labels = [_local_rows(labels, sizes, r, views) for r in range(world)]
    else:
        labels, own_labels = None, [None] * world
    weights = torch.randn(views * n, generator=gen, dtype=torch.float64)
    data = {"x": [x[:, lo:lo + size].clone() for lo, size in zip(_offsets(sizes), sizes)], "labels": own_labels,
            "weights": [_local_rows(weights, sizes, r, views) for r in range(world)],
            "global": {"x": x, "labels": labels, "weights": weights}}
    if case.setup == "labelled-queue":
        # The queue (identical on every rank) holds positives of some anchors and new labels.
        data["queue"] = torch.randn(GROUPED_QUEUE_ROWS, DIM, generator=gen, dtype=torch.float64)
        data["queue_labels"] = torch.cat([labels[:2], labels.max() + 1 + torch.arange(GROUPED_QUEUE_ROWS - 2)])
        data["global"].update(queue=data["queue"], queue_labels=data["queue_labels"])
    return data


def _offsets(sizes) -> list:
    return [sum(sizes[:r]) for r in range(len(sizes))]


def _supcon_ddp_inputs(world: int, gen: torch.Generator) -> dict:
    sizes = GROUPED_SIZES[world]
    init = {"weight": torch.randn(DIM, DDP_IN, generator=gen, dtype=torch.float64) / math.sqrt(DDP_IN),
            "bias": 0.1 * torch.randn(DIM, generator=gen, dtype=torch.float64)}
    steps = [(torch.randn(sum(sizes), DDP_IN, generator=gen, dtype=torch.float64),
              _local_distinct_labels(sizes, 1, gen)) for _ in range(DDP_STEPS)]
    per_rank = [[(_split(x, sizes)[r], _split(y, sizes)[r]) for x, y in steps] for r in range(world)]
    return {"init": init, "batches": per_rank, "global": steps}


def start_in_background(tmp_path_factory, items) -> None:
    """Start the ranks of every selected world size beside the other tests (tests/background.py)."""
    worlds = sorted({item.callspec.params["world"] for item in items
                     if "world" in getattr(getattr(item, "callspec", None), "params", {})})
    if worlds:
        _build_cpp_once()
        folder = tmp_path_factory.mktemp("distributed")
        for world in worlds:
            background.start(f"distributed W={world}", _run_world, world, folder, background.environment())


def _build_cpp_once() -> None:
    # Build (or load) the C++ library here, in the suite's own thread, so that the ranks load it
    # from the cache instead of compiling it concurrently inside the worker timeout.
    dispatch.backend_status("cpp", torch.device("cpu"))


def _world_results(world: int, folder) -> tuple[dict, list]:
    """(inputs, per-rank results) of world size W: its ranks run once per session, and a failed
    world raises its cause in each of its tests."""
    _build_cpp_once()
    return background.result(f"distributed W={world}", _run_world, world, folder, background.environment())


def _run_world(world: int, tmp_dir, environment: dict) -> tuple[dict, list]:
    """Run the W ranks over every case; (inputs, per-rank results)."""
    from conftest import RUN_SEED

    gen = torch.Generator().manual_seed(RUN_SEED ^ zlib.crc32(f"test_distributed W={world}".encode()))
    inputs = _make_inputs(world, gen)
    folder = tmp_dir / f"world{world}"
    folder.mkdir()
    cases_path = folder / "cases.pt"
    # Cases travel as plain dicts: this file runs as __main__ in the workers.
    cases = {kind: [(asdict(c), {k: v for k, v in d.items() if k != "global"}) for c, d in inputs[kind]]
             for kind in ("loss", "ddp", "grouped")}
    cases["supcon_ddp"] = {k: v for k, v in inputs["supcon_ddp"].items() if k != "global"}
    torch.save(cases, cases_path)
    # A rendezvous file, not a TCP port picked here: another process (another test run on this
    # machine) could take such a port in the seconds before rank 0 binds it.
    env = dict(environment, WORLD_SIZE=str(world), FASTALPHA_TEST_RENDEZVOUS=str(folder / "rendezvous"), TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]),
               OMP_NUM_THREADS="1")
    logs = [folder / f"rank{rank}.log" for rank in range(world)]
    procs = []
    for rank, log in enumerate(logs):
        command = [sys.executable, os.path.abspath(__file__), str(cases_path), str(folder / f"rank{rank}.pt")]
        with open(log, "w") as f:
            procs.append(subprocess.Popen(command, env=dict(env, RANK=str(rank)), stdout=f, stderr=subprocess.STDOUT))
    codes = background.wait_for_ranks(procs, WORKER_TIMEOUT_S)  # bounds a hang in a collective
    failures = [f"rank {rank} exited with {code}:\n" + logs[rank].read_text()[-3000:]
                for rank, code in enumerate(codes) if code != 0]
    if failures:
        raise RuntimeError(f"world size {world}: worker failure\n" + "\n".join(failures))
    return inputs, [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    return lambda world: _world_results(world, folder)


def _results_or_skip(world: int, world_results, case) -> tuple[dict, list]:
    inputs, results = world_results(world)
    status = results[0]["status"]
    if case.backend != "auto" and not status[case.backend][0]:
        pytest.skip(f"backend {case.backend!r} unavailable in the workers: {status[case.backend][1]}")
    per_rank = [r[case.name] for r in results]
    errors = [r["error"] for r in per_rank if r.get("error")]
    if errors:
        kind, message, trace = errors[0]
        pytest.fail(f"{len(errors)} rank(s) raised; first:\n{trace}")
    return inputs, per_rank


def _anchor_rows(sizes, rank: int) -> torch.Tensor:
    n, offset = sum(sizes), sum(sizes[:rank])
    own = torch.arange(offset, offset + sizes[rank])
    return torch.cat([own, own + n])


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: c.name)
@pytest.mark.background
def test_rank_losses_and_gradients_equal_global_batch(world, case, world_results):
    inputs, per_rank = _results_or_skip(world, world_results, case)
    data = dict(inputs["loss"])[case]["global"]
    sizes = RANK_SIZES[world][case.split]
    n, m = sum(sizes), 2 * sum(sizes)
    precision = precision_of(getattr(torch, case.dtype))

    z1, z2 = data["z1"].double().requires_grad_(), data["z2"].double().requires_grad_()
    spec = make_spec(case.rule, normalize=case.normalize, detach_alpha=case.detach_alpha)
    z_global = reference.stack_views(z1, z2, case.normalize)
    rows = reference.loss_rows(z_global, spec)
    # Rank values are sums of per-anchor losses that nearly cancel for random views: the
    # tolerance follows the size of the summed terms (fastalpha.testing.loss_scale).
    term = loss_scale(z_global, spec)
    if case.reduction == "none":
        objective = (rows * data["weights"].double()).sum()
    else:
        objective = rows.mean() if case.reduction == "mean" else rows.sum()
    g1, g2 = torch.autograd.grad(objective, (z1, z2))
    # mean/sum: rank r returns and is differentiated as W × its share (module doc).
    scale = {"mean": world / m, "sum": world, "none": 1.0}[case.reduction]
    grad_scale = 1.0 if case.reduction == "none" else world

    for rank, got in enumerate(per_rank):
        own = _anchor_rows(sizes, rank)
        expected = rows.detach()[own] if case.reduction == "none" else scale * rows.detach()[own].sum()
        assert_close(got["value"], expected, precision, f"rank {rank} loss",
                     scale=term if case.reduction == "none" else scale * len(own) * term)
        if not case.grad:
            assert not got["requires_grad"], f"rank {rank}: loss requires grad under no_grad"
            continue
        lo = sum(sizes[:rank])
        assert_close(got["g1"], grad_scale * g1[lo:lo + sizes[rank]], precision, f"rank {rank} ∂/∂z1")
        assert_close(got["g2"], grad_scale * g2[lo:lo + sizes[rank]], precision, f"rank {rank} ∂/∂z2")
        # Each fused call computes only this rank's anchors, against the gathered M columns.
        blocks = {(lo, lo + sizes[rank]), (n + lo, n + lo + sizes[rank])}
        assert got["calls"], f"rank {rank}: the fused op was never called"
        assert {(row_lo, row_hi) for _, row_lo, row_hi, _ in got["calls"]} == blocks, got["calls"]
        assert all(rows_in_z == m for rows_in_z, *_ in got["calls"]), got["calls"]
    if case.reduction != "none":
        mean_over_ranks = torch.stack([got["value"].double() for got in per_rank]).mean()
        assert_close(mean_over_ranks, objective.detach(), precision, "mean over ranks of the loss vs the global loss",
                     scale=(1 if case.reduction == "mean" else m) * term)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", DDP_CASES, ids=lambda c: c.name)
@pytest.mark.background
def test_ddp_training_equals_single_process_on_global_batch(world, case, world_results):
    inputs, per_rank = _results_or_skip(world, world_results, case)
    data = dict(inputs["ddp"])[case]
    precision = precision_of(getattr(torch, case.dtype))
    spec = make_spec(case.rule, detach_alpha=case.detach_alpha)

    model = torch.nn.Linear(DDP_IN, DIM, dtype=torch.float64)
    model.load_state_dict({k: v.double() for k, v in data["init"].items()})
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    losses = []
    for x1, x2 in data["global"]:
        y = model(torch.cat([x1, x2]).double())
        loss = reference.alpha_cl_loss(*y.split(x1.shape[0]), spec, "mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())

    mean_losses = torch.stack([got["losses"].double() for got in per_rank]).mean(0)
    assert_close(mean_losses, torch.stack(losses), precision, "mean over ranks of the step losses",
                 scale=loss_scale(y.detach(), spec))
    for rank, got in enumerate(per_rank):
        for key, value in model.state_dict().items():
            assert_close(got["state"][key], value, precision, f"rank {rank} {key} after {DDP_STEPS} steps")


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("name", ERROR_CASES)
@pytest.mark.background
def test_bad_input_on_some_ranks_raises_on_every_rank(world, name, world_results):
    _, results = world_results(world)
    expected = {  # (error on the offending rank, error elsewhere, words in the message)
        "columns-differ": ("ValueError", "ValueError", "same number of columns"),
        "one-rank-int": ("TypeError", "ValueError", "floating dtype"),
        "dtype-differs": ("TypeError", "TypeError", "same dtype"),
        "grad-differs": ("ValueError", "ValueError", "agree on whether"),
        "empty-rank": ("ValueError", "ValueError", "N_r >= 1"),
        "views-differ": ("ValueError", "ValueError", "same number of views"),
        "labels-on-one-rank": ("ValueError", "ValueError", "either every rank passes labels"),
        "bad-labels-one-rank": ("ValueError", "ValueError", "labels must be 1-D"),
        "queue-size-differs": ("ValueError", "ValueError", "queue must be the same on every rank"),
    }[name]
    one_offender = {"one-rank-int": world - 1, "empty-rank": 1, "bad-labels-one-rank": world - 1}
    offender = one_offender.get(name, 0)
    for rank, result in enumerate(results):
        assert result[name]["error"] is not None, f"rank {rank} did not raise for {name}"
        kind, message, _ = result[name]["error"]
        if rank == offender or name not in one_offender:
            assert kind == expected[0] and expected[2] in message, (rank, kind, message)
        else:
            assert kind == expected[1] and f"[{offender}]" in message, (rank, kind, message)


def _grouped_reference(case: GroupedCase, data: dict):
    """(loss rows of the global batch, objective, ∂objective/∂x, groups): the single-process
    float64 loss of the concatenated batch, by autograd of fastalpha.reference."""
    how, rule, views, _ = GROUPED_SETUPS[case.setup]
    x = data["x"].clone().requires_grad_()
    n = x.shape[1]
    spec = make_spec(rule, SUPCON_TAU if rule == "infonce" else None, eps=1.0 if rule == "infonce" else None)
    labels, queue = data["labels"], data.get("queue")
    ids = positives.view_groups(n, views) if labels is None else positives.label_groups(labels, n, views)
    groups = positives.Groups.of(ids, 0 if queue is None else queue.shape[0], data.get("queue_labels"))
    z = torch.nn.functional.normalize(x.reshape(views * n, DIM), dim=1)
    rows = reference.grouped_loss_rows(z, spec, groups, queue=reference.prepare_queue(queue, True))
    objective = {"mean": rows.sum() / groups.anchor_count().clamp_min(1), "sum": rows.sum(),
                 "none": (rows * data["weights"]).sum()}[case.reduction]
    (grad,) = torch.autograd.grad(objective, x)
    return rows.detach(), objective.detach(), grad, groups, spec, z.detach()


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: c.name)
@pytest.mark.background
def test_grouped_rank_losses_and_gradients_equal_global_batch(world, case, world_results):
    """Labels / V views across ranks: each rank's loss and the gradient of its rows equal the
    single-process grouped loss of the concatenated batch (float64), "mean" over its global
    anchors with a positive, with uneven shares and positives on other ranks."""
    inputs, per_rank = _results_or_skip(world, world_results, case)
    data = dict(inputs["grouped"])[case]["global"]
    _, _, views, labelling = GROUPED_SETUPS[case.setup]
    sizes = GROUPED_SIZES[world]
    n, m = sum(sizes), views * sum(sizes)
    rows, objective, grad, groups, spec, z = _grouped_reference(case, data)
    if labelling == "local-distinct":
        # What makes the case worth running: no rank has a positive of its own rows (their sum
        # of local anchor counts is 0), yet the global batch has anchors, and not all of them.
        local = [positives.Groups.of(_local_rows(data["labels"], sizes, r, views)).anchor_count() for r in range(world)]
        assert sum(local) == 0 and 0 < groups.anchor_count() < m, (local, groups.anchor_count())
    anchors = int(groups.anchor_count().clamp_min(1))
    scale = {"mean": world / anchors, "sum": world, "none": 1.0}[case.reduction]
    term = loss_scale(z, spec)
    for rank, got in enumerate(per_rank):
        own = _local_rows(torch.arange(m), sizes, rank, views)
        expected = rows[own] if case.reduction == "none" else scale * rows[own].sum()
        assert_close(got["value"], expected, "float64", f"rank {rank} loss",
                     scale=term if case.reduction == "none" else scale * len(own) * term)
        lo = sum(sizes[:rank])
        grad_scale = 1.0 if case.reduction == "none" else world
        assert_close(got["grad"], grad_scale * grad[:, lo:lo + sizes[rank]], "float64", f"rank {rank} ∂/∂x")
        # One fused call per view block of this rank, each against all M columns (the op skips
        # the kernel for a block in which no anchor has a loss term).
        blocks = {(v * n + lo, v * n + lo + sizes[rank]) for v in range(views)}
        needed = {(b_lo, b_hi) for b_lo, b_hi in blocks if groups.has_loss[b_lo:b_hi].any()}
        called = {(row_lo, row_hi) for _, row_lo, row_hi, _ in got["calls"]}
        assert needed <= called <= blocks, (got["calls"], blocks, needed)
        assert all(rows_in_z == m for rows_in_z, *_ in got["calls"]), got["calls"]
    if case.reduction != "none":
        mean_over_ranks = torch.stack([got["value"] for got in per_rank]).mean()
        assert_close(mean_over_ranks, objective, "float64", "mean over ranks of the loss vs the global loss",
                     scale=(1 if case.reduction == "mean" else m) * term)


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.background
def test_supcon_ddp_training_equals_single_process_on_global_batch(world, world_results):
    """DDP + SupConLoss(gather_distributed=True), uneven shares whose positives all live on other
    ranks: after 3 SGD steps every rank holds the weights of one process on the global batch."""
    inputs, results = world_results(world)
    per_rank = [r["ddp-supcon"] for r in results]
    errors = [r["error"] for r in per_rank if r.get("error")]
    assert not errors, errors[0][2]
    data = inputs["supcon_ddp"]
    model = torch.nn.Linear(DDP_IN, DIM, dtype=torch.float64)
    model.load_state_dict(data["init"])
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    spec = make_spec("infonce", SUPCON_TAU, eps=1.0)
    losses = []
    for x, labels in data["global"]:
        loss = reference.grouped_alpha_cl_loss([model(x)], positives.Groups.of(labels), spec, "mean")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    mean_losses = torch.stack([got["losses"] for got in per_rank]).mean(0)
    assert_close(mean_losses, torch.stack(losses), "float64", "mean over ranks of the step losses")
    for rank, got in enumerate(per_rank):
        for key, value in model.state_dict().items():
            assert_close(got["state"][key], value, "float64", f"rank {rank} {key} after {DDP_STEPS} steps")


# ----------------------------------------------------------------------------- ranks as threads

class ThreadWorld:
    """W ranks as threads of this process, standing in for torch.distributed inside
    fastalpha.distributed: the same code path (layout exchange, all-gather, fused anchor
    blocks, reduce-scatter in backward) without gloo, so a wrong value shows as a value in
    seconds, and a rank that fails breaks the barrier of the others at once instead of
    leaving them in a collective until a timeout."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots = [None] * world
        self.local = threading.local()

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def get_rank(self, group=None):
        return self.local.rank

    def get_world_size(self, group=None):
        return self.world

    def get_backend(self, group=None):
        return "gloo"

    def _exchange(self, tensor):
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        gathered = list(self.slots)
        self.barrier.wait()
        return gathered

    def all_gather_into_tensor(self, output, tensor, group=None):
        output.copy_(torch.cat([t.reshape(-1) for t in self._exchange(tensor)]).view_as(output))

    def reduce_scatter_tensor(self, output, tensor, group=None):
        total = torch.stack(self._exchange(tensor)).sum(0)
        output.copy_(total.view(self.world, *output.shape)[self.local.rank])

    def run(self, fn):
        """fn(rank) on every rank concurrently; returns the results, re-raising the first error."""
        results, errors = [None] * self.world, [None] * self.world

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - reported below
                errors[rank] = err
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        first = next((e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)), None)
        first = first or next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results


THREAD_SIZES = [(3, 5), (2, 4, 1), (1, 1, 3)]


@pytest.mark.parametrize("sizes", THREAD_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_unequal_shares_layout(sizes):
    """Rank r owns global rows [o_r, o_r + N_r) and [N + o_r, N + o_r + N_r), o_r = Σ_{s<r} N_s."""
    from fastalpha.distributed import GlobalLayout

    n = sum(sizes)
    for rank in range(len(sizes)):
        layout = GlobalLayout(group=None, rank=rank, sizes=tuple(sizes))
        own = _anchor_rows(sizes, rank)
        blocks = layout.anchor_blocks()
        assert [list(range(lo, hi)) for lo, hi in blocks] == [own[: sizes[rank]].tolist(), own[sizes[rank]:].tolist()], \
            f"rank {rank} of sizes {sizes}: anchor blocks {blocks}"
        # The padded all-gather buffer holds (rank, view, row) at (2·rank + view)·n_max + row.
        n_max = max(sizes)
        expected = [(2 * r + v) * n_max + k for v in (0, 1) for r, size in enumerate(sizes) for k in range(size)]
        assert layout.padded_index("cpu").tolist() == expected
        assert layout.n_global == n


@pytest.mark.parametrize("sizes", THREAD_SIZES, ids=lambda s: "x".join(map(str, s)))
def test_view_blocks_layout(sizes):
    """V = 3 views: rank r owns [v·N + o_r, v·N + o_r + N_r) for each view v, and the padded
    buffer holds (rank, view, row) at (V·rank + view)·n_max + row."""
    from fastalpha.distributed import GlobalLayout

    n, n_max, views = sum(sizes), max(sizes), 3
    for rank in range(len(sizes)):
        layout = GlobalLayout(group=None, rank=rank, sizes=tuple(sizes), views=views)
        own = _local_rows(torch.arange(views * n), sizes, rank, views)
        assert [k for lo, hi in layout.anchor_blocks() for k in range(lo, hi)] == own.tolist()
        expected = [(views * r + v) * n_max + k
                    for v in range(views) for r, size in enumerate(sizes) for k in range(size)]
        assert layout.padded_index("cpu").tolist() == expected


@pytest.mark.parametrize("sizes", THREAD_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["eager", "chunked", "cpp"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_unequal_shares_values_with_ranks_as_threads(monkeypatch, gen, sizes, backend, reduction):
    """Every rule on unequal shares: each rank's loss and the gradients of its own rows equal
    the global-batch reference (float64), with the ranks as threads (ThreadWorld)."""
    import fastalpha.distributed as distributed

    ok, reason = dispatch.backend_status(backend, torch.device("cpu"))
    if not ok:
        pytest.skip(reason)
    world = ThreadWorld(len(sizes))
    monkeypatch.setattr(distributed, "dist", world)
    n, m = sum(sizes), 2 * sum(sizes)
    for rule in RULES:
        z1 = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        z2 = z1 + 0.7 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)
        weights = torch.randn(m, generator=gen, dtype=torch.float64)
        own_weights = [torch.cat([weights[:n].split(list(sizes))[r], weights[n:].split(list(sizes))[r]])
                       for r in range(len(sizes))]

        def rank_fn(rank):
            lo = sum(sizes[:rank])
            a = z1[lo:lo + sizes[rank]].clone().requires_grad_()
            b = z2[lo:lo + sizes[rank]].clone().requires_grad_()
            loss = alpha_cl_loss_distributed(a, b, rule=rule, reduction=reduction, backend=backend)
            loss.backward(own_weights[rank] if reduction == "none" else None)
            return loss.detach(), a.grad, b.grad

        got = world.run(rank_fn)
        a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        spec = make_spec(rule)
        rows = reference.loss_rows(reference.stack_views(a, b, True), spec)
        objective = (rows * weights).sum() if reduction == "none" else rows.mean()
        g1, g2 = torch.autograd.grad(objective, (a, b))
        w = len(sizes)
        for rank, (value, grad1, grad2) in enumerate(got):
            own = _anchor_rows(sizes, rank)
            expected = rows.detach()[own] if reduction == "none" else w / m * rows.detach()[own].sum()
            assert_close(value, expected, "float64", f"{rule} rank {rank} of {sizes} loss")
            scale = 1.0 if reduction == "none" else w
            lo = sum(sizes[:rank])
            assert_close(grad1, scale * g1[lo:lo + sizes[rank]], "float64", f"{rule} rank {rank} of {sizes} grad z1")
            assert_close(grad2, scale * g2[lo:lo + sizes[rank]], "float64", f"{rule} rank {rank} of {sizes} grad z2")


def test_without_process_group_is_the_local_loss_and_warns_once(gen, monkeypatch):
    import fastalpha.distributed as distributed

    monkeypatch.setattr(distributed, "_warned_not_initialised", False)
    z1 = torch.randn(5, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(5, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="not initialised"):
        got = fastalpha.AlphaCLLoss(rule="inverse", backend="eager", gather_distributed=True)(z1, z2)
    expected = fastalpha.alpha_cl_loss(z1, z2, rule="inverse", backend="eager")
    assert_close(got, expected, "float64", "loss without a process group")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alpha_cl_loss_distributed(z1, z2, rule="inverse", backend="eager")
        labels = torch.tensor([0, 1, 0, 2, 1])
        got = SupConLoss(0.2, backend="eager", gather_distributed=True)(z1, labels)
        assert_close(got, SupConLoss(0.2, backend="eager")(z1, labels), "float64", "SupCon without a process group")


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])

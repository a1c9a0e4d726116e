r"""The implementations the benchmark compares ("providers"), behind one interface.

=============== ===================================================================== ==========
provider        what runs                                                             memory
=============== ===================================================================== ==========
eager           fastalpha.alpha_cl_loss(..., backend="eager"): dense autograd          O(M²)
chunked         fastalpha.alpha_cl_loss(..., backend="chunked"): full-row chunks in    O(R·M)
                plain PyTorch, gradient from the forward pass
compile         torch.compile(dynamic=True) of the dense reference                     O(M²)
cpp/cuda/triton fastalpha.alpha_cl_loss(..., backend=name): the fused kernels          O(M·D)
pml             pytorch_metric_learning.losses.SupConLoss (the labels set-up), its     O(M²), O(M·K)
                CrossBatchMemory of SupConLoss (the memory set-up)
=============== ===================================================================== ==========

Each provider gives `status(device) -> (available, reason)`, `loss_fn(rule, positives) ->
f(*views, **setup)` (default rule parameters but in the labels set-up, SUPCON; detach_alpha=True,
reduction="mean"; `setup` is the negatives/queue/labels arguments of a benchmark set-up, see
`setup_kwargs`), and a predicted peak memory used to skip sizes that would exceed the run's cap
(see `predicted_peak_bytes`).

Set-ups: the two-view ones (positives="pair": z1, z2 of N rows each, M = 2N, the partner is the
positive, negatives "all"/"cross"/"none" and an optional queue), the supervised one
(positives="labels": one view of M rows and `supcon_labels(M)`, SupCon's positive sets) and
the same labelled batch through a cross-batch memory of K slots (positives="memory": the
provider's module from `memory_loss_fn`, filled before it is measured, so that every measured
call sees a full memory; the memory is a module's state, not an argument).
"""
from __future__ import annotations

import functools
import inspect
import shutil
from typing import Callable

import torch

import fastalpha
from fastalpha import dispatch
from fastalpha.backends.chunked import default_chunk_rows

PROVIDERS = ("eager", "chunked", "compile", "cpp", "cuda", "triton", "pml")
#: Former names of providers, still read from older CSV files and accepted on the command line.
ALIASES = {"eager-chunked": "chunked"}
#: Providers backed by a fused fastalpha kernel: they alone get the extra large sizes.
FUSED = ("cpp", "cuda", "triton")
DEFAULT_PROVIDERS = {
    "cpu": ("eager", "chunked", "compile", "cpp"),
    "cuda": ("eager", "chunked", "compile", "triton", "cuda"),
}

#: Peak memory of the dense providers in units of M·C·itemsize (C = columns per anchor row:
#: M, plus K with a queue), measured on this project's CPU machine at M = 1024…4096, D = 128,
#: float32 for `direct` and `infonce` (bench/compare.py measures it on every run, column
#: peak_mb): eager ≈ 6.3–7.5 (fwd and fwd+bwd; 6.6–6.9 with labels), compile ≈ 1.05 (fwd) and
#: ≈ 4.1–4.5 (fwd+bwd); pml's SupConLoss (labels, M = 1024…4096) ≈ 10.2 (fwd) and 11.3–11.5 (fwd+bwd):
#: besides the similarity matrix and log_prob it builds float pos/neg masks and int64 index
#: vectors of every pair (16 bytes a pair). Rounded up, these predict which sizes exceed the cap.
DENSE_PEAK_FACTOR = {
    ("eager", "fwd"): 8.0,
    ("eager", "fwdbwd"): 8.0,
    ("compile", "fwd"): 1.5,
    ("compile", "fwdbwd"): 5.0,
    ("pml", "fwd"): 11.0,
    ("pml", "fwdbwd"): 12.0,
}

#: Ways to choose the negatives of an anchor (fastalpha.alpha_cl_loss's `negatives`).
NEGATIVES = ("all", "cross", "none")
#: Ways to choose its positives: "pair" (the partner row of the other view of two) or "labels"
#: (every other row with its label, one view: SupCon).
POSITIVES = ("pair", "labels", "memory")
#: The positive sets whose rows carry labels (one view of M rows and `supcon_labels(M)`).
LABELLED = ("labels", "memory")

#: The rule parameters of the labels set-up's `infonce`: SupCon's (pytorch-metric-learning's
#: SupConLoss default τ, positives in the denominator), so that every provider computes the
#: same loss as pml's SupConLoss(temperature=0.1). Other rules keep their defaults.
SUPCON = dict(temperature=0.1, eps=1.0)
#: Labels of the labels set-up: classes of ROWS_PER_CLASS rows (an anchor has 7 positives)
#: and one singleton per SINGLETON_EVERY rows, an anchor without a positive (no loss term of
#: its own, still a negative of every other anchor), as a real batch has.
ROWS_PER_CLASS = 8
SINGLETON_EVERY = 64


def canonical(name: str) -> str:
    """The current name of a provider (maps ALIASES)."""
    return ALIASES.get(name, name)


def check_provider(name: str) -> str:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")
    return name


def status(name: str, device: torch.device) -> tuple[bool, str]:
    """(available, reason) of a provider for tensors on `device`."""
    check_provider(name)
    if name == "eager":
        return True, "fastalpha dense reference (autograd), O(M^2) memory"
    if name == "pml":
        try:
            import pytorch_metric_learning
        except ImportError as err:
            return False, f"pytorch-metric-learning is not installed (pip install pytorch-metric-learning): {err}"
        return True, f"pytorch-metric-learning {pytorch_metric_learning.__version__} SupConLoss, O(M^2) memory"
    if name == "compile":
        if not torch._dynamo.is_dynamo_supported():
            return False, "torch.compile is not supported on this Python/platform"
        if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
            return False, "torch.compile on the CPU needs a C++ compiler (g++/c++/clang++ not found)"
        return True, "torch.compile(dynamic=True) of the dense reference"
    try:
        return dispatch.backend_status(name, device)
    except Exception as err:  # a backend under construction must not stop the benchmark
        return False, f"fastalpha backend {name!r} status check failed: {type(err).__name__}: {err}"


def supcon_labels(m: int, generator: torch.Generator) -> torch.Tensor:
    """The (M,) int64 labels of the labels set-up: M // SINGLETON_EVERY singletons (at least
    one), the other rows in classes of ROWS_PER_CLASS (the last one smaller where they do not
    divide), in an order drawn from `generator` (on the CPU), so that classes are not runs of
    rows."""
    singletons = max(1, m // SINGLETON_EVERY)
    grouped = torch.arange(m - singletons) // ROWS_PER_CLASS
    first_single = int(grouped[-1]) + 1 if len(grouped) else 0
    labels = torch.cat([grouped, torch.arange(first_single, first_single + singletons)])
    return labels[torch.randperm(m, generator=generator)]


def setup_kwargs(negatives: str, queue: torch.Tensor | None, labels: torch.Tensor | None = None) -> dict:
    """The keyword arguments of a loss function for a set-up; {} for the default (negatives="all",
    no queue, partner positives), so that the default set-up runs on any version of the API."""
    kwargs = {}
    if negatives != "all":
        kwargs["negatives"] = negatives
    if queue is not None:
        kwargs["queue"] = queue
    if labels is not None:
        kwargs["labels"] = labels
    return kwargs


def setup_support(name: str, rule: str, negatives: str, queue_rows: int, positives: str = "pair") -> tuple[str, str]:
    """("ok", "") if provider `name` can run a set-up; else ("skipped", why) when this
    fastalpha's API lacks the set-up's arguments, ("unavailable", why) when the provider does
    not compute that set-up (a backend without labels, pml outside SupCon)."""
    check_provider(name)
    if name == "pml":
        if positives not in LABELLED or rule != "infonce":
            return "unavailable", ("pytorch-metric-learning's SupConLoss (and its CrossBatchMemory) is the labels "
                                   "(and memory) set-up with rule infonce only")
        return "ok", ""
    if positives == "memory":
        if rule != "infonce" or name == "compile":
            return "unavailable", "the memory set-up is fastalpha.CrossBatchMemory of SupConLoss (rule infonce) on a backend"
        if not hasattr(fastalpha, "CrossBatchMemory"):
            return "skipped", "fastalpha has no CrossBatchMemory in this version"
    needed = [arg for arg, used in (("negatives", negatives != "all"), ("queue", queue_rows > 0),
                                    ("labels", positives in LABELLED)) if used]
    if not needed:
        return "ok", ""
    parameters = inspect.signature(fastalpha.alpha_cl_loss).parameters
    missing = [arg for arg in needed if arg not in parameters]
    if missing:
        return "skipped", f"fastalpha.alpha_cl_loss has no {' / '.join(repr(m) for m in missing)} parameter in this version"
    supports = getattr(dispatch, "supports", None)
    if supports is None:
        return "ok", ""
    ok, reason = supports("eager" if name == "compile" else name, negatives, queue_rows > 0, positives in LABELLED)
    return ("ok", "") if ok else ("unavailable", reason)


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    # Rules and sizes reuse one compiled function: shapes are symbolic (dynamic=True), so
    # a new M does not recompile; each rule is its own guard set, hence the raised limit.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(functools.partial(fastalpha.alpha_cl_loss, backend="eager"), dynamic=True)


def rule_kwargs(rule: str, positives: str, supcon: bool = False) -> dict:
    """Rule parameters every provider of a set-up gets: SUPCON for `infonce` with labels (and,
    with `supcon`, in every set-up: a run that compares labelled with unlabelled batches at
    the same parameters), else none (defaults)."""
    return dict(SUPCON) if (positives == "labels" or supcon) and rule == "infonce" else {}


def loss_fn(name: str, rule: str, positives: str = "pair", supcon: bool = False) -> Callable[..., torch.Tensor]:
    """f(*views, **setup) -> scalar loss of `rule` computed by provider `name`: f(z1, z2, ...) for
    the two-view set-ups, f(z, labels=y) for the labels one (`supcon`: see rule_kwargs)."""
    check_provider(name)
    params = rule_kwargs(rule, positives, supcon)
    if name == "pml":
        from pytorch_metric_learning.losses import SupConLoss

        return SupConLoss(temperature=SUPCON["temperature"])
    if name == "compile":
        return functools.partial(_compiled_reference(), rule=rule, **params)
    return functools.partial(fastalpha.alpha_cl_loss, rule=rule, backend=name, **params)


def memory_loss_fn(name: str, d: int, k: int) -> torch.nn.Module:
    """The memory set-up's module of provider `name`: xbm(z, labels=y) -> SupCon loss of the batch
    against a memory of `k` slots of width `d` (SUPCON's temperature): pml's
    CrossBatchMemory(SupConLoss) or fastalpha.CrossBatchMemory(SupConLoss(backend=name))."""
    check_provider(name)
    if name == "pml":
        from pytorch_metric_learning.losses import CrossBatchMemory, SupConLoss

        return CrossBatchMemory(SupConLoss(temperature=SUPCON["temperature"]), d, memory_size=k)
    return fastalpha.CrossBatchMemory(fastalpha.SupConLoss(temperature=SUPCON["temperature"], backend=name), d, k)


def fill_memory(xbm: torch.nn.Module, m: int, seed: int) -> None:
    """Write random rows into every slot of a memory from `memory_loss_fn`, labelled like the
    measured batch of m rows (`supcon_labels`, batch after batch: the same classes recur, as in
    training), and mark it full, the state after the first K rows of training. Written
    directly rather than by ⌈K / m⌉ calls, which cost pml minutes at K = 65536; both modules
    keep their memory in the attributes embedding_memory, label_memory and queue_idx."""
    generator = torch.Generator().manual_seed(seed)
    k, d = xbm.embedding_memory.shape
    labels = torch.cat([supcon_labels(m, generator) for _ in range(-(-k // m))])[:k]
    with torch.no_grad():
        xbm.embedding_memory.copy_(torch.randn(k, d, generator=generator))
        xbm.label_memory.copy_(labels)
    if isinstance(xbm, fastalpha.CrossBatchMemory):
        xbm.queue_idx.zero_()
        xbm.filled.fill_(k)
    else:
        xbm.queue_idx, xbm.has_been_filled = 0, True


def predicted_peak_bytes(name: str, m: int, d: int, dtype: torch.dtype, mode: str, device_type: str = "cpu",
                         queue_rows: int = 0) -> int:
    """Predicted peak memory of one call beyond its inputs (a guide for the cap, not a measurement).

    Dense providers: DENSE_PEAK_FACTOR · M · (M + K) · itemsize, whatever the negatives (a
    dense implementation may hold the full score matrix and mask it); pml with the float32
    itemsize whatever the dtype (its index vectors are int64 in any case). chunked: about three
    (R × (M + K)) float32 chunk buffers plus (M × D) accumulators. Fused kernels: a few
    (M × D) buffers.
    """
    check_provider(name)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows_bytes = m * d * max(itemsize, 4)
    columns = m + queue_rows
    if (name, mode) in DENSE_PEAK_FACTOR:
        return int(DENSE_PEAK_FACTOR[name, mode] * m * columns * (max(itemsize, 4) if name == "pml" else itemsize))
    if name == "chunked":
        return int(3 * default_chunk_rows(m, device_type) * columns * 4 + 4 * rows_bytes)
    return int(6 * rows_bytes)

r"""The call space of the Triton backend and the distinct compiled kernels it launches.

A call of the launcher (fastalpha.backends.triton.launch.fused_loss_and_grad) is a point of

    compute type × D × rule × detach_alpha × normalize × gradient mode × set-up

and launches 1–4 kernels, each with the static tile or, autotuned on Hopper, any of its
candidates (blocks.candidate_configs); IEEE float32's static tile is the first of an ordered
list (blocks.fallback_configs), of which the launcher runs the first that spills nothing, so
its kernel here is the list (`fallbacks_of`, compiled in order by report.compile_kernel).
What Triton compiles is keyed on the kernel, its constexprs, num_warps / num_stages and the *specialization* of the other arguments
(triton.runtime.jit, Triton 3.8): an integer argument equal to 1 becomes the constexpr 1, one
divisible by 16 gets `tt.divisibility = 16`; a tensor gets it when its address is a multiple
of 16 bytes; None is a constexpr; floats are never specialized. In these kernels

* the size arguments (C, half, row_lo, row_hi, m_bucket) are `do_not_specialize`
  (kernels/tiles.SIZE_ARGUMENTS): one kernel for every batch size, queue length and row range;
* every tensor argument is 16-byte aligned (launch._aligned, checked at every launch);
* what is left, D and the row strides (= D, or 1 for the unused accumulator of a forward),
  follows from D: per D̂ = max(16, 2^⌈log₂ D⌉) one class divisible by 16 and one not.

So a call's kernels follow from its constexprs and D's class alone: the space is recorded at
one size (`launch.recording_launches`: nothing runs) and deduplicated on Triton's own key
(`kernel_key`: the binder's specialization, as the JIT cache sees it). `DEFINITION` lists the
space; `inputs_hash` hashes it with the sources that decide what is launched and how it
compiles, so that a test can tell a stale report without compiling.

Out of the space (stated in docs/gpu-static-report.md): D̂ other than 64, 128, 256 (D ≤ 32,
D > 256) and D = 1; float64 (not autotuned, off the tensor cores: report.py compiles a sample);
integer arguments of 2³¹ or more (C·D ≥ 2³¹ elements keep i64 offsets, C ≥ 2³¹ rows an i64
signature).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
from dataclasses import dataclass

import torch

#: Compute types by name: (input dtype, torch float32 matmul precision that selects it).
COMPUTE_TYPES = {"bf16": (torch.bfloat16, "highest"), "fp16": (torch.float16, "highest"),
                 "tf32": (torch.float32, "high"), "fp32": (torch.float32, "highest"),
                 "fp64": (torch.float64, "highest")}

#: Rule settings: one per distinct set of rule constexprs (WEIGHT, POWER, EPS, LOG_LOSS): the
#: exponent k = p/2 is compiled as POWER = 1 (entropy, direct p = 2), 2 (direct's default p = 4)
#: or 0 (any other p: d2^k through exp/log); ε > 0 adds the ε-term (EPS); `quadratic` is a
#: closed form and launches no kernel.
RULES = {
    "entropy": dict(rule="entropy"),
    "entropy-eps": dict(rule="entropy", eps=0.1),
    "direct": dict(rule="direct"),
    "direct-eps": dict(rule="direct", eps=0.1),
    "direct-p3": dict(rule="direct", p=3.0),
    "direct-p3-eps": dict(rule="direct", p=3.0, eps=0.1),
    "inverse": dict(rule="inverse"),
    "square": dict(rule="square"),
    "infonce": dict(rule="infonce"),
    "infonce-eps0": dict(rule="infonce", eps=0.0),
}

#: Gradient modes: (need_grad, row weights). `forward` is a call without autograd (or
#: reduction="none"'s forward), `backward` the fused gradient of mean/sum, `weighted` the
#: backward of reduction="none" (row weights = the incoming gradient).
GRAD_MODES = {"forward": (False, False), "backward": (True, False), "weighted": (True, True)}

#: Set-ups: (negatives, queue, groups). `groups` is the GROUPS constexpr's source (labels, V ≥ 3
#: views or a labelled queue: the launcher sees group ids either way): "every" anchor has a
#: positive, or a "lonely" one has none, which gives every grouped call row weights
#: (w_i [|P_i| > 0]). A distributed rank's anchor range [row_lo, row_hi) and its slice of the
#: incoming gradient change no key (sizes are not specialized, tensors are aligned: module
#: docstring), so they are sizes of these set-ups, not set-ups of their own.
SET_UPS = {
    "all": ("all", False, None),
    "all+queue": ("all", True, None),
    "cross": ("cross", False, None),
    "cross+queue": ("cross", True, None),
    "none+queue": ("none", True, None),
    "grouped": ("all", False, "every"),
    "grouped-lonely": ("all", False, "lonely"),
    "grouped+queue": ("all", True, "every"),
    "grouped-lonely+queue": ("all", True, "lonely"),
}

#: Feature counts: per padded D̂ ∈ {64, 128, 256} one D divisible by 16 and one not (the two
#: specialization classes of D and of the row strides, which equal D: Z is contiguous).
FEATURES = (64, 50, 128, 100, 256, 200)

#: The sizes every call is recorded at: N rows per view, K queue rows (any sizes give the same
#: kernels; tests/test_triton_static.py records real calls at others).
ROWS_PER_VIEW, QUEUE_ROWS = 5, 3


@dataclass(frozen=True)
class Call:
    compute: str
    d: int
    rule: str          # a key of RULES
    detach: bool
    unit: bool         # normalize=True
    grad: str          # a key of GRAD_MODES
    set_up: str        # a key of SET_UPS

    @property
    def name(self) -> str:
        return f"{self.compute} D={self.d} {self.rule} detach={self.detach} normalize={self.unit} {self.grad} {self.set_up}"


def record(call: Call, arch: int = 90) -> list:
    """The launches (launch.Launch) of one call on an sm_`arch` GPU, recorded on small CPU
    tensors (nothing runs)."""
    from fastalpha.backends.triton import launch
    from fastalpha.rules import make_spec

    dtype, precision = COMPUTE_TYPES[call.compute]
    negatives, queue, grouped = SET_UPS[call.set_up]
    need_grad, weighted = GRAD_MODES[call.grad]
    m = 2 * ROWS_PER_VIEW
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(m, call.d, generator=gen, dtype=torch.float64)
    z = (torch.nn.functional.normalize(z, dim=1) if call.unit else z).to(dtype)
    spec = make_spec(**RULES[call.rule], normalize=call.unit, detach_alpha=call.detach, negatives=negatives)
    extra = {}
    if queue:
        extra["queue"] = torch.nn.functional.normalize(torch.randn(QUEUE_ROWS, call.d, generator=gen,
                                                                   dtype=torch.float64), dim=1).to(dtype)
    if grouped:
        ids = torch.arange(m) % ROWS_PER_VIEW                 # two views as groups of two
        if grouped == "lonely":
            ids[0] = m                                        # an anchor without a positive
        extra["groups"] = ids
    weight = torch.rand(m, generator=gen, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        with launch.recording_launches(arch // 10) as recorded:
            launch.fused_loss_and_grad(z, spec, 0, m, weight if weighted else None, need_grad, **extra)
    finally:
        torch.set_float32_matmul_precision(old)
    # UPCAST is an interpreter-only workaround (tiles._mma): compiled code never has it.
    return [dataclasses.replace(item, kwargs={**item.kwargs, "UPCAST": False}) for item in recorded]


COMPUTES = ("bf16", "fp16", "tf32", "fp32")


def calls(computes=COMPUTES, features=FEATURES, rules=tuple(RULES), detaches=(True, False), units=(True, False),
          grads=tuple(GRAD_MODES), set_ups=tuple(SET_UPS)):
    """Every point of the call space (or of the sub-space the arguments name), in a fixed order."""
    for point in itertools.product(computes, features, rules, detaches, units, grads, set_ups):
        yield Call(*point)


def _jit(kernel):
    """The JITFunction of a kernel; under TRITON_INTERPRET one built from the interpreted
    kernel's function and its decorator's arguments (do_not_specialize)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    options = {name: kernel.kwargs[name] for name in ("do_not_specialize", "do_not_specialize_on_alignment")
               if kernel.kwargs.get(name) is not None}
    return JITFunction(kernel.fn, **options)


@functools.lru_cache(maxsize=None)
def _binder(kernel, arch: int):
    """Triton's argument binder of `kernel` for sm_`arch`: it computes the specialization.

    Under TRITON_INTERPRET the kernels are InterpretedFunctions; the binder then comes from a
    JITFunction of the same Python function, so that a launch recorded in the interpreter gets
    the key that the compiled launch would have.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return [p.name for p in jit.params], create_function_from_signature(jit.signature, jit.params, backend)


def specialization(launch_item, config, arch: int = 90) -> tuple:
    """Triton's specialization of a launch with a tile `config`: per parameter (name, type,
    attribute or constexpr value), as the JIT cache key sees it."""
    # UPCAST is an interpreter-only workaround (tiles._mma): compiled code never has it.
    kwargs = {**launch_item.launch_kwargs(config), "UPCAST": False}
    names, binder = _binder(launch_item.kernel, arch)
    _, spec, options = binder(*launch_item.args, **kwargs)
    # maxnreg joins the key only where a shape sets it (Triton's cache key has it), so that the
    # other kernels' keys do not change.
    bound = (("maxnreg", str(options["maxnreg"]), ""),) if options.get("maxnreg") is not None else ()
    return tuple((name, str(kind), str(attr)) for name, (kind, attr) in zip(names, spec)) + (
        ("num_warps", str(options["num_warps"]), ""), ("num_stages", str(options["num_stages"]), "")) + bound


def fallbacks_of(launch_item, config) -> tuple:
    """The shapes that the launch of `config` chooses from when it compiles them in order
    (launch._spill_free: IEEE float32's static shape), else ()."""
    fallbacks = launch_item.fallbacks
    return fallbacks if len(fallbacks) > 1 and config == launch_item.config else ()


def kernel_key(launch_item, config, arch: int = 90) -> str:
    """A short stable name of one compiled kernel: its pass, arch and a hash of its specialization
    (and, where the launch chooses among shapes, of the shapes in their order)."""
    fallbacks = fallbacks_of(launch_item, config)
    shapes = (tuple((c.block_m, c.block_n, c.num_warps, c.num_stages) for c in fallbacks),) if fallbacks else ()
    text = repr((arch, launch_item.kind, specialization(launch_item, config, arch)) + shapes)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Kernel:
    """One distinct compiled kernel: the first call that launches it, the launch, the tile
    config, whether that config is the static one, and how many calls of the space launch it."""
    key: str
    call: Call
    launch: object
    config: object
    role: str            # "static" or "candidate"
    calls: int = 1


def kernels(points, arch: int = 90, tuned: bool = True) -> dict:
    """key → Kernel over the calls `points`, in first-launch order; `tuned`: every autotuning
    candidate of each launch (else the static tile only, as on GPUs that do not autotune)."""
    found: dict = {}
    for call in points:
        for item in record(call, arch):
            for config in (item.candidates if tuned else (item.config,)):
                key = kernel_key(item, config, arch)
                if key in found:
                    found[key].calls += 1
                else:
                    found[key] = Kernel(key, call, item, config, "static" if config == item.config else "candidate")
    return found


#: The call space, axis by axis (rendered into docs/gpu-static-report.md and hashed).
DEFINITION = (
    ("compute types", ", ".join(COMPUTES) + " (fp32 = IEEE float32; tf32 = float32 with "
                      "`set_float32_matmul_precision(\"high\")`)"),
    ("feature counts D", ", ".join(map(str, FEATURES)) + " (D̂ = 64, 128, 256; divisible by 16 and not)"),
    ("rules", "; ".join(f"{name} ({', '.join(f'{k}={v}' for k, v in kw.items() if k != 'rule') or 'defaults'})"
                        if name != kw["rule"] else name for name, kw in RULES.items()) + "; quadratic launches no kernel"),
    ("detach_alpha", "True, False"),
    ("normalize", "True, False"),
    ("gradient", "; ".join(f"{name} (need_grad={g}, row weights={w})" for name, (g, w) in GRAD_MODES.items())),
    ("set-ups", "; ".join(f"{name} (negatives={n}{', queue' if q else ''}{', groups: ' + g if g else ''})"
                          for name, (n, q, g) in SET_UPS.items())),
    ("sizes", f"N = {ROWS_PER_VIEW} rows per view, K = {QUEUE_ROWS} queue rows, all anchors (no size is specialized)"),
)

#: Files whose content decides what the launcher launches and what the kernels compile to.
_KERNELS = ("row_pass.py", "column_pass.py", "sparsemax.py", "tiles.py")
_LAUNCHER = ("launch.py", "blocks.py")


def _digest(paths, extra: str = "") -> str:
    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for path in paths:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(extra.encode())
    return digest.hexdigest()[:12]


def _kernel_paths() -> list:
    from fastalpha import kernels as package

    return [os.path.join(os.path.dirname(os.path.abspath(package.__file__)), name) for name in _KERNELS]


def kernel_source_hash() -> str:
    """The kernel sources and the Triton version: what one compiled kernel's code depends on."""
    return _digest(_kernel_paths())


def inputs_hash(extra: str = "") -> str:
    """The kernel sources, the launcher and its tile tables, this enumeration, the Triton
    version and `extra` (the report's sections): a report generated from other inputs is stale."""
    from fastalpha.backends.triton import launch

    here = os.path.dirname(os.path.abspath(launch.__file__))
    return _digest(_kernel_paths() + [os.path.join(here, name) for name in _LAUNCHER] + [os.path.abspath(__file__)],
                   extra)

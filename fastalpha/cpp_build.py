"""Compile and load the C++ and CUDA kernels of csrc/ on first use (ninja, cached).

Nothing is compiled at install time: the first call that needs a kernel builds it with
`torch.utils.cpp_extension.load` (ninja) into a per-user cache, keyed on everything that
changes the binary (source text, flags, torch and CUDA versions, Python ABI, the CPU for a
`-march=native` build, the GPU architectures), from a copy of the sources kept in that cache
folder, so that checkouts with the same sources share one build. Later processes load the
cached library in well under a second; a source edit or a torch upgrade builds a fresh one
beside it.

Two libraries, so a CPU-only machine never needs nvcc:

    fastalpha_cpu   csrc/alpha_cl_cpu.cpp                        -> torch.ops.fastalpha_cpu.alpha_cl_fused
    fastalpha_cuda  csrc/alpha_cl_cuda.cpp + alpha_cl_cuda_kernel.cu -> torch.ops.fastalpha_cuda.alpha_cl_fused

Environment variables:

    FASTALPHA_REBUILD=1        discard the cached build and compile again
    FASTALPHA_NO_CPP=1         never build or load the CPU library (backend "cpp" unavailable)
    FASTALPHA_NO_CUDA=1        never build or load the CUDA library (backend "cuda" unavailable)
    FASTALPHA_CACHE_DIR=DIR    build cache (default $XDG_CACHE_HOME/fastalpha, else ~/.cache/fastalpha)
    FASTALPHA_CSRC=DIR         the csrc/ folder (default: beside the fastalpha package, i.e. a checkout)
    FASTALPHA_MARCH=ARCH       -march of the CPU build (default native; e.g. x86-64-v3 for a portable one)
    FASTALPHA_VERBOSE_BUILD=1  show the compiler's output
    CXX, CUDA_HOME, TORCH_CUDA_ARCH_LIST   as for any torch extension (without CUDA_HOME the
                               toolkit is looked for beside nvcc and in /usr/local/cuda*)

Ahead of time (e.g. in CI, or to check that the CUDA sources compile on a machine without a GPU):

    CUDA_HOME=/usr/local/cuda-13.0 TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m fastalpha.cpp_build cuda
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import torch

logger = logging.getLogger("fastalpha")

CPU_SOURCES = ("alpha_cl_cpu.cpp",)
CUDA_SOURCES = ("alpha_cl_cuda.cpp", "alpha_cl_cuda_kernel.cu")
HEADERS = ("alpha_cl_common.h", "alpha_cl_rule.h", "alpha_cl_row_math.h", "vec_math.h", "alpha_cl_cuda_kernel.h")
NAMESPACES = {"cpu": "fastalpha_cpu", "cuda": "fastalpha_cuda"}


class BuildError(RuntimeError):
    """A kernel library could not be built or loaded; the message says why."""


def flag_set(name: str) -> bool:
    """True when the environment variable `name` is set to something other than 0/false/no."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def csrc_dir() -> Path:
    """The C++/CUDA sources: $FASTALPHA_CSRC, else the checkout's csrc/, else the wheel's _csrc/."""
    env = os.environ.get("FASTALPHA_CSRC")
    here = Path(__file__).resolve().parent
    # A checkout (editable install) has csrc/ beside the package; a wheel carries it as _csrc/.
    path = Path(env) if env else next((p for p in (here.parent / "csrc", here / "_csrc") if p.is_dir()), here.parent / "csrc")
    if not (path / CPU_SOURCES[0]).is_file():
        raise BuildError(
            f"the C++ sources are not at {path} (expected csrc/ of a checkout or fastalpha/_csrc/ of a wheel; "
            "set FASTALPHA_CSRC to a folder holding them)"
        )
    return path


def cache_dir() -> Path:
    env = os.environ.get("FASTALPHA_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastalpha"


def _march() -> str:
    return os.environ.get("FASTALPHA_MARCH", "native")


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU model and its feature flags."""
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                    lines.append(line.strip())
                if not line.strip() and lines:
                    break  # the first processor is enough
    except OSError:
        lines.append(platform.processor())
    return "\n".join([platform.machine()] + lines)


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _cpu_flags() -> tuple[list[str], list[str]]:
    # -fopenmp: at::parallel_for is a header template and only runs in parallel when the
    # extension itself is compiled with OpenMP (the backend torch's wheels use).
    # -fno-math-errno: lets sqrt vectorise; it changes no result. -fno-trapping-math: without
    # it GCC keeps the comparisons of the clamps and selects in csrc/vec_math.h as branches
    # (a comparison may trap), so no loop that calls exp/log vectorises: measured 8x slower
    # per pair. It changes no result either (nothing reads the FP exception flags; torch is
    # built with it too). -ffp-contract=fast: FMAs in the polynomials whatever the -std default.
    cflags = ["-O3", "-fopenmp", f"-march={_march()}", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
              "-DNDEBUG"]
    return cflags, ["-fopenmp"]


def _cuda_flags() -> tuple[list[str], list[str], list[str]]:
    return ["-O3", "-DNDEBUG"], ["-O3", "-DNDEBUG"], []


def _build_key(kind: str, src: Path, sources: tuple[str, ...], flags: list) -> str:
    digest = hashlib.sha256()
    for name in sorted(set(sources) | set(HEADERS)):
        path = src / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    parts = [
        kind, repr(flags), torch.__version__, str(torch.version.cuda), sys.version.split()[0],
        sysconfig.get_config_var("SOABI") or "", shutil.which(_cxx()) or _cxx(),
    ]
    if kind == "cpu" and _march() == "native":
        parts.append(_cpu_identity())
    if kind == "cuda":
        parts += [os.environ.get("TORCH_CUDA_ARCH_LIST", ""), os.path.realpath(os.environ.get("CUDA_HOME", ""))]
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def _import_cpp_extension(quiet: bool):
    """torch.utils.cpp_extension, without its CUDA_HOME warning when no CUDA build is wanted."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension as cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def find_cuda_home() -> str | None:
    """The CUDA toolkit to build with: $CUDA_HOME/$CUDA_PATH, else the one nvcc belongs to,
    else /usr/local/cuda or /usr/local/cuda-X.Y (the version torch was built with first).

    A toolkit counts only if it has bin/nvcc and include/cuda_runtime.h (an nvcc on PATH may
    be a wrapper script outside any toolkit).
    """
    def usable(path) -> bool:
        return bool(path) and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include" / "cuda_runtime.h").exists()

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if usable(os.environ.get(var)):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append(Path("/usr/local/cuda"))
    versioned = sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    wanted = f"cuda-{torch.version.cuda}" if torch.version.cuda else None
    candidates += [p for p in versioned if p.name == wanted] + [p for p in versioned if p.name != wanted]
    return next((str(p) for p in candidates if usable(p)), None)


def _check_toolchain(kind: str) -> None:
    if shutil.which(_cxx()) is None:
        raise BuildError(f"no C++ compiler: {_cxx()!r} is not on PATH (install g++ or set CXX)")
    if kind == "cuda":
        if torch.version.cuda is None:
            raise BuildError(f"this torch ({torch.__version__}) is not a CUDA build")
        home = find_cuda_home()
        if home is None:
            raise BuildError(f"no CUDA toolkit found (CUDA_HOME={os.environ.get('CUDA_HOME')!r}); "
                             "set CUDA_HOME to one with bin/nvcc and include/cuda_runtime.h")
        # torch.utils.cpp_extension reads CUDA_HOME once, when first imported. The resolved
        # path: the build key names the toolkit by it, and ninja's build file must too, or two
        # spellings of one toolkit (/usr/local/cuda and the folder it links to) rewrite the
        # build file in turn and every switch recompiles.
        os.environ["CUDA_HOME"] = os.path.realpath(home)
    cpp_extension = _import_cpp_extension(quiet=kind == "cpu")
    if kind == "cuda":
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if not cpp_extension.is_ninja_available():
        raise BuildError("ninja is not installed (pip install ninja)")


def _stage_sources(src: Path, build_dir: Path, sources: tuple[str, ...]) -> Path:
    """Copy the sources the build key hashed into `build_dir`/src and return that folder.

    ninja's build file names its source paths, so building from a checkout's own csrc/ made
    two checkouts with the same sources (a worktree, a wheel beside an editable install)
    rewrite each other's build file and recompile on every switch. Built from the copy, the
    same key gives the same build file. A file is written only when missing, so that its
    modification time never makes ninja rebuild; the copy lands under its name atomically."""
    staged = build_dir / "src"
    staged.mkdir(exist_ok=True)
    for name in sorted(set(sources) | set(HEADERS)):
        target = staged / name
        if (src / name).is_file() and not target.exists():
            partial = staged / f".{name}.{os.getpid()}.{threading.get_ident()}"
            shutil.copyfile(src / name, partial)
            os.replace(partial, target)
    return staged


def _build(kind: str) -> str:
    """Compile (or reuse) and load one library; returns the path of the loaded .so."""
    if kind == "cpu" and flag_set("FASTALPHA_NO_CPP"):
        raise BuildError("disabled by FASTALPHA_NO_CPP=1")
    if kind == "cuda" and flag_set("FASTALPHA_NO_CUDA"):
        raise BuildError("disabled by FASTALPHA_NO_CUDA=1")
    src = csrc_dir()
    _check_toolchain(kind)
    cpp_extension = _import_cpp_extension(quiet=kind == "cpu")
    if kind == "cpu":
        sources, (cflags, ldflags) = CPU_SOURCES, _cpu_flags()
        cuda_cflags = None
    else:
        sources, (cflags, cuda_cflags, ldflags) = CUDA_SOURCES, _cuda_flags()
    key = _build_key(kind, src, sources, [cflags, cuda_cflags, ldflags])
    name = f"{NAMESPACES[kind]}_{key}"
    build_dir = cache_dir() / name
    if flag_set("FASTALPHA_REBUILD") and build_dir.exists():
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    staged = _stage_sources(src, build_dir, sources)
    library = build_dir / f"{name}.so"
    if not library.exists():
        logger.warning("fastalpha: compiling the %s kernels in %s (first use; later runs load the cache)", kind, build_dir)
    verbose = flag_set("FASTALPHA_VERBOSE_BUILD")
    try:
        cpp_extension.load(
            name=name,
            sources=[str(staged / s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_cflags,
            extra_ldflags=ldflags,
            extra_include_paths=[str(staged)],
            build_directory=str(build_dir),
            verbose=verbose,
            with_cuda=kind == "cuda",
            is_python_module=False,
        )
    except Exception as err:  # the compiler's message is in err; keep its tail readable
        text = str(err).strip().splitlines()
        errors = [line.strip() for line in text if "error" in line.lower() and "ninja" not in line.lower()]
        tail = " | ".join((errors or text)[:3]) if text else type(err).__name__
        raise BuildError(f"building {name} failed: {tail} (rerun with FASTALPHA_VERBOSE_BUILD=1; build folder {build_dir})") from err
    return str(library)


_lock = threading.Lock()
_results: dict[str, tuple[bool, str]] = {}


def ensure_built(kind: str) -> str:
    """Build/load the `kind` ("cpu" or "cuda") library once per process; raise BuildError if impossible."""
    with _lock:
        if kind not in _results:
            try:
                _results[kind] = (True, _build(kind))
            except BuildError as err:
                _results[kind] = (False, str(err))
        ok, detail = _results[kind]
    if not ok:
        raise BuildError(detail)
    return detail


def status(kind: str) -> tuple[bool, str]:
    """(available, reason) of one library; builds it on first call."""
    try:
        return True, f"compiled library {ensure_built(kind)}"
    except BuildError as err:
        return False, str(err)


def ops(kind: str):
    """The torch.ops namespace of a library (building it first if needed)."""
    ensure_built(kind)
    return getattr(torch.ops, NAMESPACES[kind])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalpha.cpp_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("kinds", nargs="*", choices=("cpu", "cuda"), default=["cpu"], help="which library (default: cpu)")
    parser.add_argument("--rebuild", action="store_true", help="same as FASTALPHA_REBUILD=1")
    parser.add_argument("--verbose", action="store_true", help="same as FASTALPHA_VERBOSE_BUILD=1")
    args = parser.parse_args(argv)
    if args.rebuild:
        os.environ["FASTALPHA_REBUILD"] = "1"
    if args.verbose:
        os.environ["FASTALPHA_VERBOSE_BUILD"] = "1"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failed = False
    for kind in args.kinds:
        ok, detail = status(kind)
        print(f"{kind}: {'ok' if ok else 'FAILED'}: {detail}")
        failed |= not ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The repository's layout holds: kernels on the ground floor, and a wheel that runs outside it.

* kernels/ (the Triton kernels) imports nothing from fastalpha, and fastalpha/ holds no
  `@triton.jit` function: the arrows point from the package down to the kernels, never up.
* `pip install .` (not editable) runs from outside the repository. The kernel sources sit
  outside the package in a checkout (kernels/ and csrc/ at the top), and a wheel must carry
  them inside it (fastalpha.kernels, fastalpha._csrc; setup.py). The test builds the package
  from a clean copy of the checkout into a fresh virtual environment (with the system
  site-packages, so torch and triton are not installed again), then, in a directory outside
  the repository, runs the cpp backend and the Triton backend (in Triton's interpreter) on a
  tiny input and checks that every module came from the installed wheel, not the checkout.
"""
import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import background

REPO = Path(__file__).resolve().parent.parent

#: What `pip install .` reads: the build's configuration and the folders setup.py packages.
BUILD_INPUTS = ("setup.py", "pyproject.toml", "README.md", "fastalpha", "kernels", "csrc")
WHEEL_TEST = "test_installed_package_runs_cpp_and_triton_outside_the_checkout"

#: What the installed package must do, from a directory with no checkout in it.
OUTSIDE = r'''
import json
import torch
import fastalpha, fastalpha.cpp_build, fastalpha.kernels
z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
losses = {backend: fastalpha.alpha_cl_loss(z1, z2, rule="direct", backend=backend).item()
          for backend in ("chunked", "cpp", "triton")}
print(json.dumps({"losses": losses, "fastalpha": fastalpha.__file__, "kernels": fastalpha.kernels.__file__,
                  "csrc": str(fastalpha.cpp_build.csrc_dir())}))
'''


def _python_files(folder: str) -> list:
    return sorted((REPO / folder).rglob("*.py"))


def test_kernels_import_nothing_from_fastalpha():
    for path in _python_files("kernels"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                # `from .tiles` stays inside kernels/; `from ..` would reach into fastalpha.kernels' parent.
                names = [node.module or ""] if node.level == 0 else ["fastalpha"] if node.level > 1 else []
            else:
                continue
            assert not any(name.split(".")[0] == "fastalpha" for name in names), f"{path}:{node.lineno} imports fastalpha"


def test_no_triton_kernel_inside_the_package():
    jitted = [f"{path}:{node.lineno}" for path in _python_files("fastalpha")
              for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
              for decorator in node.decorator_list if "triton.jit" in ast.unparse(decorator)]
    assert not jitted, f"@triton.jit outside kernels/: {jitted}"
    assert any("triton.jit" in path.read_text() for path in _python_files("kernels"))


def start_in_background(tmp_path_factory, items) -> None:
    """Build and install beside the other tests (tests/background.py)."""
    if any(item.name == WHEEL_TEST for item in items):
        background.start(WHEEL_TEST, _install_and_run, tmp_path_factory.mktemp("wheel"))


def _install_and_run(root: Path) -> dict:
    env = background.environment()
    for name in ("PYTHONPATH", "FASTALPHA_CSRC", "FASTALPHA_NO_CPP"):
        env.pop(name, None)
    # A copy of what the build reads, so that the in-tree build (build/, *.egg-info) leaves the
    # checkout untouched and nothing else of it (data/, runs/) is copied.
    source = root / "source"
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    venv = root / "venv"
    # Without a pip of its own: ensurepip's bundled setuptools would shadow the system's, which
    # builds the wheel (and the bundled one cannot, without the `wheel` package).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   env=env, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
                             env=env, capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    outside = root / "elsewhere"
    outside.mkdir()
    run = subprocess.run([python, "-c", OUTSIDE], cwd=outside, env=dict(env, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    found = json.loads(run.stdout.strip().splitlines()[-1])
    found["site"] = str(venv)
    return found


@pytest.mark.background
def test_installed_package_runs_cpp_and_triton_outside_the_checkout(tmp_path):
    found = background.result(WHEEL_TEST, _install_and_run, tmp_path)
    for what in ("fastalpha", "kernels", "csrc"):
        assert found[what].startswith(found["site"]), f"{what} came from {found[what]}, not the installed wheel"
    losses = found["losses"]
    assert losses["cpp"] == pytest.approx(losses["chunked"], rel=1e-9)
    assert losses["triton"] == pytest.approx(losses["chunked"], rel=1e-9)

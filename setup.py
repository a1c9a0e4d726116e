"""Package layout for fastalpha (metadata lives in pyproject.toml).

Nothing here imports torch: the C++/CUDA parts in csrc/ are compiled on first use with ninja
(fastalpha/cpp_build.py), so `pip install -e .` works on a machine with no torch. This file
exists for one computed fact: the kernel sources sit at the top of the repository, outside the
package, and wheels carry them inside it. csrc/ becomes `fastalpha._csrc` so that a
non-editable install can still compile the C++/CUDA kernels; kernels/ (the Triton kernels)
becomes the subpackage `fastalpha.kernels`, the name fastalpha/__init__.py also gives a
checkout's kernels/. The tooling in bench/ (bench/static/: static reports, roofline) is not
carried: nothing at run time needs it.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastalpha", "fastalpha.*"]) + ["fastalpha._csrc", "fastalpha.kernels"],
    package_dir={"fastalpha._csrc": "csrc", "fastalpha.kernels": "kernels"},
    package_data={"fastalpha._csrc": ["*.cpp", "*.cu", "*.h"]},
)

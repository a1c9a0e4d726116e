"""Package layout for fastalpha (metadata lives in pyproject.toml).

Nothing here imports torch: the C++/CUDA parts in csrc/ are compiled on first use with ninja
(fastalpha/cpp_build.py), so `pip install -e .` works on a machine with no torch. This file
exists for one computed fact: csrc/ sits at the top of the repository, and wheels carry it as
the package `fastalpha._csrc` so that a non-editable install can still compile the kernels.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastalpha", "fastalpha.*"]) + ["fastalpha._csrc"],
    package_dir={"fastalpha._csrc": "csrc"},
    package_data={"fastalpha._csrc": ["*.cpp", "*.cu", "*.h"]},
)

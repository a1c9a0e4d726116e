"""Packaging for fastalpha.

Nothing here imports torch: the C++/CUDA parts in csrc/ are compiled on first use with
ninja (see fastalpha/cpp_build.py), so `pip install -e .` works on a machine with no torch.
"""
from setuptools import find_packages, setup

setup(
    name="fastalpha",
    version="0.1.0",
    description="Pair-weighted contrastive losses (alpha-CL) with fused kernels that never build the NxN matrix",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ sits at the top of the repository (DESIGN.md §3); wheels carry it as fastalpha/_csrc
    # so that a non-editable install can still compile the kernels on first use.
    packages=find_packages(include=["fastalpha", "fastalpha.*"]) + ["fastalpha._csrc"],
    package_dir={"fastalpha._csrc": "csrc"},
    package_data={"fastalpha._csrc": ["*.cpp", "*.cu", "*.h"]},
    install_requires=[
        # The pair these machines install from their local cache; torchvision must match it.
        "torch>=2.4,<=2.14.1",
        "triton; platform_system == 'Linux'",
        "numpy",
        "ninja",
    ],
    extras_require={
        "train": ["torchvision<=0.29.1", "scikit-learn", "tqdm", "matplotlib"],
        "test": ["pytest", "hypothesis", "scipy", "torchvision<=0.29.1", "scikit-learn", "tqdm", "matplotlib"],
    },
)

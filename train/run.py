"""Entry point: `python train/run.py --loss direct --batch 1024` (see `--help` and docs/training.md)."""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
# `python train/run.py` puts train/ itself first on sys.path; put the repository root there
# instead, so that `train` and `fastalpha` import as packages (even without `pip install -e .`)
# and train/data.py cannot shadow an unrelated top-level module called `data`.
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)
elif os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

_HARNESS = {"torchvision": "torchvision", "sklearn": "scikit-learn", "tqdm": "tqdm", "matplotlib": "matplotlib"}
_missing = [pip_name for module, pip_name in _HARNESS.items() if importlib.util.find_spec(module) is None]
if _missing:
    sys.exit(f"train/run.py needs the training extras ({', '.join(_missing)} missing): pip install -e \".[train]\"")

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

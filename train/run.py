"""Entry point: `python train/run.py --loss direct --batch 1024` (see `--help` and docs/train.md)."""
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

from train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

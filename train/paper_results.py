"""Tables 1 and 2 of Tian (NeurIPS 2022, α-CL) as data: every number, as printed in the paper.

Each row is one cell: (table, dataset, arch, loss, epochs, mean, std), top-1 linear-evaluation
accuracy in %, mean ± std over 5 seeds ("Each setting is repeated 5 times with different random
seeds", Table 1's caption). `loss` uses fastalpha's names (`fastalpha.PAPER_LOSSES`):

    paper's row          fastalpha loss
    L_quadratic          quadratic
    L_nce                nce
    backprop α(θ)        backprop
    α-CL-r_H             entropy
    α-CL-r_γ             inverse   (α as the authors' code sets it; see docs/theory.md)
    α-CL-r_s             square
    α-CL-direct          direct

Recipe of both tables (captions and Sec. 6): batch 128, Adam, τ 0.5 (square: τ 5; inverse: γ 2;
direct: p 4); ResNet18 at lr 0.01, ResNet50 at lr 0.001. Table 2 repeats Table 1's ResNet18
CIFAR-10 and STL-10 numbers for nce and direct; they are kept in both tables, as printed.
"""
from __future__ import annotations

from dataclasses import dataclass

EPOCHS = (100, 300, 500)
SEEDS = 5


@dataclass(frozen=True)
class PaperCell:
    table: int
    dataset: str
    arch: str
    loss: str
    epochs: int
    mean: float
    std: float


def _rows(table: int, dataset: str, arch: str, block: dict) -> list[PaperCell]:
    return [PaperCell(table, dataset, arch, loss, epochs, mean, std)
            for loss, values in block.items()
            for epochs, (mean, std) in zip(EPOCHS, values)]


# Table 1: ResNet18, batch 128, τ 0.5, lr 0.01; CIFAR-10 and STL-10 at 100 / 300 / 500 epochs.
_TABLE1 = {
    "cifar10": {
        "quadratic": ((63.59, 2.53), (73.02, 0.80), (73.58, 0.82)),
        "nce": ((84.06, 0.30), (87.63, 0.13), (87.86, 0.12)),
        "backprop": ((83.42, 0.25), (87.18, 0.19), (87.48, 0.21)),
        "entropy": ((84.27, 0.24), (87.75, 0.25), (87.92, 0.24)),
        "inverse": ((83.72, 0.19), (87.51, 0.11), (87.69, 0.09)),
        "square": ((84.72, 0.10), (86.62, 0.17), (86.74, 0.15)),
        "direct": ((85.11, 0.19), (87.93, 0.16), (88.09, 0.13)),
    },
    "stl10": {
        "quadratic": ((55.59, 4.00), (64.97, 1.45), (67.28, 1.21)),
        "nce": ((78.46, 0.24), (82.49, 0.26), (83.70, 0.12)),
        "backprop": ((77.88, 0.17), (81.86, 0.30), (83.19, 0.16)),
        "entropy": ((78.53, 0.35), (82.62, 0.15), (83.74, 0.18)),
        "inverse": ((78.22, 0.28), (82.19, 0.52), (83.47, 0.34)),
        "square": ((76.95, 1.06), (80.64, 0.77), (81.65, 0.59)),
        "direct": ((79.32, 0.36), (82.95, 0.17), (84.05, 0.20)),
    },
}

# Table 2: nce and direct only; ResNet18 (lr 0.01) and ResNet50 (lr 0.001); batch 128.
_TABLE2 = {
    ("cifar100", "resnet18"): {
        "nce": ((55.70, 0.37), (59.71, 0.36), (59.89, 0.34)),
        "direct": ((57.63, 0.07), (60.12, 0.26), (60.27, 0.29)),
    },
    ("cifar100", "resnet50"): {
        "nce": ((60.16, 0.48), (65.40, 0.31), (65.53, 0.30)),
        "direct": ((62.93, 0.28), (65.84, 0.14), (65.87, 0.21)),
    },
    ("cifar10", "resnet18"): {
        "nce": ((84.06, 0.30), (87.63, 0.13), (87.86, 0.12)),
        "direct": ((85.11, 0.19), (87.93, 0.16), (88.09, 0.13)),
    },
    ("cifar10", "resnet50"): {
        "nce": ((86.39, 0.16), (89.97, 0.14), (90.19, 0.23)),
        "direct": ((87.79, 0.25), (90.41, 0.18), (90.50, 0.21)),
    },
    ("stl10", "resnet18"): {
        "nce": ((78.46, 0.24), (82.49, 0.26), (83.70, 0.12)),
        "direct": ((79.32, 0.36), (82.95, 0.17), (84.05, 0.20)),
    },
    ("stl10", "resnet50"): {
        "nce": ((81.64, 0.24), (86.57, 0.17), (87.90, 0.22)),
        "direct": ((83.20, 0.25), (87.17, 0.14), (87.85, 0.21)),
    },
}

TABLE1: tuple[PaperCell, ...] = tuple(
    cell for dataset, block in _TABLE1.items() for cell in _rows(1, dataset, "resnet18", block))
TABLE2: tuple[PaperCell, ...] = tuple(
    cell for (dataset, arch), block in _TABLE2.items() for cell in _rows(2, dataset, arch, block))
CELLS: tuple[PaperCell, ...] = TABLE1 + TABLE2

#: The learning rate each backbone used (Table 1 and Table 2 captions).
PAPER_LR = {"resnet18": 0.01, "resnet50": 0.001}


def lookup(dataset: str, arch: str, loss: str, epochs: int, table: int | None = None) -> PaperCell | None:
    """The paper's cell for this setting (Table 1 first when both print it), or None."""
    for cell in CELLS:
        if (cell.dataset, cell.arch, cell.loss, cell.epochs) == (dataset, arch, loss, epochs) and \
                (table is None or cell.table == table):
            return cell
    return None


def table(number: int) -> tuple[PaperCell, ...]:
    if number == 1:
        return TABLE1
    if number == 2:
        return TABLE2
    raise ValueError(f"the paper has Tables 1 and 2 of results, not {number}")

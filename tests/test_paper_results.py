"""Tables 1 and 2 of the paper as data (train/paper_results.py): complete, consistent, and with
the orderings the paper's text states about them (Sec. 6), which a mistyped number would break."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import fastalpha  # noqa: E402
from train import paper_results as P  # noqa: E402


def test_every_cell_of_both_tables_is_there_once():
    assert len(P.TABLE1) == 7 * 2 * 3  # 7 losses × (CIFAR-10, STL-10) × (100, 300, 500 epochs)
    assert len(P.TABLE2) == 2 * 3 * 2 * 3  # (nce, direct) × 3 datasets × 2 backbones × 3 epochs
    keys = [(c.table, c.dataset, c.arch, c.loss, c.epochs) for c in P.CELLS]
    assert len(set(keys)) == len(keys)
    assert {c.loss for c in P.TABLE1} == set(fastalpha.PAPER_LOSSES)
    assert {c.loss for c in P.TABLE2} == {"nce", "direct"}
    for c in P.CELLS:
        assert 0 < c.std < 5 and 50 < c.mean < 95 and c.epochs in P.EPOCHS


def test_table2_repeats_table1s_resnet18_numbers():
    for c in P.TABLE2:
        if c.arch == "resnet18" and c.dataset in ("cifar10", "stl10"):
            t1 = P.lookup(c.dataset, c.arch, c.loss, c.epochs, table=1)
            assert (t1.mean, t1.std) == (c.mean, c.std)


@pytest.mark.parametrize("cell, mean, std", [
    (("cifar10", "resnet18", "quadratic", 100), 63.59, 2.53),
    (("stl10", "resnet18", "square", 100), 76.95, 1.06),
    (("cifar10", "resnet18", "inverse", 100), 83.72, 0.19),
    (("cifar100", "resnet50", "direct", 100), 62.93, 0.28),
    (("stl10", "resnet50", "direct", 500), 87.85, 0.21),
    (("cifar100", "resnet18", "nce", 500), 59.89, 0.34),
])
def test_spot_values(cell, mean, std):
    c = P.lookup(*cell)
    assert (c.mean, c.std) == (mean, std)


def test_the_orderings_the_paper_states_hold_in_the_data():
    for dataset in ("cifar10", "stl10"):
        for epochs in P.EPOCHS:
            cell = {c.loss: c.mean for c in P.TABLE1 if (c.dataset, c.epochs) == (dataset, epochs)}
            # "backpropagating through α(θ) is worse": below L_nce and α-CL-r_H.
            assert cell["backprop"] < cell["nce"] and cell["backprop"] < cell["entropy"]
            # L_quadratic is far below every other loss.
            assert max(v for k, v in cell.items() if k != "quadratic") - cell["quadratic"] > 10
            # α-CL-direct is the highest (bold) in every column of Table 1.
            assert cell["direct"] == max(cell.values())


def test_lr_per_backbone_from_the_captions():
    assert P.PAPER_LR == {"resnet18": 0.01, "resnet50": 0.001}
    with pytest.raises(ValueError):
        P.table(3)

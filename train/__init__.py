"""Training harness: pre-train an encoder with any Table-1 loss of Tian (2022), then probe it.

    python train/run.py --loss direct --batch 1024        # see docs/training.md

Layout (one concept per file):
    cli.py         argparse flags, validation, the run's entry point `main(argv)`
    recipes.py     the paper's recipe and the small-data recipe; `auto` values resolved per dataset
    data.py        datasets as uint8 tensors (CIFAR, STL-10, Fashion-MNIST, digits, synthetic)
    batches.py     epoch order and per-rank batch slices (a DistributedSampler for tensor data)
    augment.py     batched two-view augmentation as tensor ops on the training device
    models.py      ResNet18/50 with the CIFAR stem, a small CNN, the projector
    trainer.py     the pre-training loop (checkpoints, resume, Ctrl-C, non-finite stop)
    evaluate.py    frozen-feature probes: weighted kNN and the authors' linear protocol
    check_eager.py K steps with the fused backend against the eager reference
    checkpoint.py  atomic checkpoints and RNG state capture/restore
    distributed.py torchrun / DDP process-group helpers
    records.py     the run folder: config.json, metrics.csv, summary.json, the accuracy table
    plots.py       PNG plots of loss and accuracy
    paper_results.py  Tables 1 and 2 of the paper as data
    grid.py        a reproduction grid: run list, run folders, resume/skip, claims
    grid_report.py the grid's mean ± std table, CSV and plot next to the paper's numbers
    reproduce.py   entry point of the grids: `python train/reproduce.py table1 --dry-run`
"""

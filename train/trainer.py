r"""The pre-training loop: V augmented views → encoder + projector → α-CL loss → optimizer.

One step, for the global batch of B images x_1..x_B (rank r holds its B/W of them):

    v1, v2 = aug(x), aug(x)              parameters from a generator seeded by (seed, epoch, step)
    z      = model(cat(v1, v2))          BatchNorm statistics over both views of the batch
    loss   = AlphaCLLoss(z[:B], z[B:])   the Table-1 loss; all ranks' rows are negatives (DDP)

With `--views V` (V ≥ 3) the step draws V views, z = model(cat(v1..vV)) and the loss gets the V
views (positives: the other V − 1 views of an image). With `--supervised` it also gets the
images' labels y_1..y_B (positives: every other row of the same label, SupCon style;
docs/design.md, "Positive sets"). Both run in one process, with negatives "all".

With `--queue-size K` the loss also gets the last K second views of earlier steps (detached)
as extra columns: negatives of every anchor, or, with `--supervised`, labelled rows that are
positives of the anchors of their label and negatives of the others.

Trust features:
* checkpoint.pt (atomic) after every epoch, and at the first step boundary after Ctrl-C
  (a second Ctrl-C aborts at once; the last checkpoint on disk is then still complete);
* resume restores model, optimizer, epoch/step, the data-order generator, the python/numpy/torch
  RNG states and the partial epoch sums, so a resumed CPU run equals an uninterrupted one bit for bit;
* a non-finite loss stops the run before the optimizer step: the checkpoint on disk is the
  last good state.
"""
from __future__ import annotations

import math
import os
import time

import torch

import fastalpha

from . import augment, checkpoint, distributed, evaluate
from .batches import BatchPlan
from .config import grouped_positives_error
from .labelled_queue import LabelledQueue
from .models import ContrastiveModel

CHECKPOINT_NAME = "checkpoint.pt"


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    """Ctrl-C was honoured: the state was checkpointed at a step boundary."""


def build_optimizer(name: str, params, lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {name!r}")


#: Epochs at the start of the `authors` schedule during which the lr stays at its initial value.
AUTHORS_WARM_EPOCHS = 10
SCHEDULES = ("constant", "cosine", "authors")


def learning_rate(cfg, global_step: int, total_steps: int, steps_per_epoch: int = 1) -> float:
    """The lr of the step `global_step` (0-based) of a run of `total_steps` steps.

    constant  cfg.lr throughout.
    cosine    cfg.lr·(1 + cos(π·t/T))/2 over all T = total_steps steps (to 0 at the end).
    authors   what the authors' code does (facebookresearch/luckmatters, ssl/real-dataset/
              simclr_trainer.py): torch's CosineAnnealingLR with T_max = len(train_loader), i.e.
              the steps of ONE epoch, stepped once per epoch and only after epoch 10. The lr of
              0-based epoch e is therefore cfg.lr·(1 + cos(π·k/S))/2 with k = max(0, e − 10) and
              S = steps per epoch: constant for the first 11 epochs, then a slow decay (at batch
              128 on CIFAR-10, S = 390, epoch 100 runs at 0.87·lr) that is periodic in k with
              period 2S (the closed form CosineAnnealingLR follows). It does not depend on the
              total number of epochs, so a 100-epoch run is the start of a 500-epoch run.
    """
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(global_step, total_steps) / max(total_steps, 1)))
    if cfg.schedule == "authors":
        k = max(0, global_step // max(steps_per_epoch, 1) - AUTHORS_WARM_EPOCHS)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * k / max(steps_per_epoch, 1)))
    if cfg.schedule != "constant":
        raise ValueError(f"unknown schedule {cfg.schedule!r}; expected one of {SCHEDULES}")
    return cfg.lr


class Trainer:
    def __init__(self, cfg, data, spec, device: torch.device, topology=distributed.Topology(), log=print):
        self.cfg, self.data, self.spec, self.device, self.topology, self.log = cfg, data, spec, device, topology, log
        self.amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else None
        # The flags are checked when parsed; a configuration that did not come from them (a
        # resumed run's, a caller's) is checked here, before any weight is built, instead of
        # failing at the first loss.
        problem = grouped_positives_error(cfg.supervised, cfg.views, cfg.loss_kwargs.get("negatives", "all"))
        if problem:
            raise ValueError(problem)
        if cfg.supervised and data.pretrain_labels is None:
            why = " (it pre-trains on its train+unlabeled split)" if data.name == "stl10" else ""
            raise ValueError(f"--supervised needs labels of the pre-training images; the {len(data.pretrain)} "
                             f"pre-training images of {data.name} have none{why}")
        torch.manual_seed(cfg.seed)  # the initial weights depend on the seed only
        self.model = ContrastiveModel(cfg.arch, data.channels, spec.size).to(device, memory_format=torch.channels_last)
        self.ddp_model = self.model
        if topology.enabled:
            if device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.loss_fn = fastalpha.AlphaCLLoss(**cfg.loss_kwargs, backend=cfg.backend, gather_distributed=topology.enabled)
        # The memory bank of --queue-size: the same rows on every rank (all ranks enqueue the
        # global batch's second views), part of the checkpoint so that a resumed run sees them.
        # With --supervised it keeps each row's label too: the label says which anchors it is a
        # positive of.
        self.queue = None
        if cfg.queue_size:
            bank = LabelledQueue if cfg.supervised else fastalpha.Queue
            self.queue = bank(cfg.queue_size, self.model.embedding_dim).to(device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters(), cfg.lr, cfg.wd)
        self.plan = BatchPlan(len(data.pretrain), cfg.batch, cfg.seed, topology.world_size, topology.rank)
        self.images = data.pretrain.to(device)
        self.labels = data.pretrain_labels.to(device) if cfg.supervised else None
        self.epochs_done = 0
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "steps": 0, "time": 0.0}
        self.order_state = self.plan.order_generator.get_state()
        self.history: list[dict] = []
        self.probes: dict = {}
        self.stop_requested = False  # set by the Ctrl-C handler, at any moment
        self.stop_agreed = False  # the step-boundary decision, identical on every rank
        self.mid_step = False
        self.last_features = None

    # ----------------------------------------------------------------- state
    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    def state_dict(self) -> dict:
        return {
            "format": 1,
            "config": self.cfg.as_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epochs_done": self.epochs_done,
            "step_in_epoch": self.step_in_epoch,
            "partial": dict(self.partial),
            "order_state": self.order_state,
            "rng": checkpoint.capture_rng(),
            "history": list(self.history),
            "probes": dict(self.probes),
            "queue": self.queue.state_dict() if self.queue is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epochs_done = state["epochs_done"]
        self.step_in_epoch = state["step_in_epoch"]
        self.partial = dict(state["partial"])
        self.order_state = state["order_state"]
        self.history = list(state["history"])
        self.probes = dict(state["probes"])
        if self.queue is not None:
            self.queue.load_state_dict(state["queue"])
        checkpoint.restore_rng(state["rng"])

    def save(self) -> None:
        if self.topology.is_main:
            checkpoint.save(self.state_dict(), self.checkpoint_path)

    # ----------------------------------------------------------------- steps
    def embed_step(self, epoch: int, step: int, order: torch.Tensor):
        """The embeddings of this rank's images at `step`: (V tensors (n, D), one per view; their labels
        or None). One forward pass over all views, so BatchNorm sees every view of the batch."""
        idx, offset = self.plan.local_indices(order, step)
        idx = idx.to(self.device)
        gen = augment.step_generator(self.cfg.seed, epoch, step)
        views = augment.views(self.images[idx], self.spec, gen, self.plan.global_batch, offset, self.cfg.views)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            z = self.ddp_model(torch.cat(views))
        return z.chunk(self.cfg.views), (self.labels[idx] if self.labels is not None else None)

    def loss_of(self, loss_fn, embeddings, labels) -> torch.Tensor:
        """`loss_fn` on one step's embeddings: the (z1, z2) pair for two views, the list of views
        otherwise, with the memory bank's rows (and, with labels, the bank's labels) as extra columns."""
        queue = self.queue.rows() if self.queue is not None else None
        queue_labels = self.queue.labels() if queue is not None and labels is not None else None
        if len(embeddings) == 2:
            z1, z2 = embeddings
            return loss_fn(z1, z2, queue=queue, labels=labels, queue_labels=queue_labels)
        return loss_fn(list(embeddings), queue=queue, labels=labels, queue_labels=queue_labels)

    def enqueue(self, embeddings, labels) -> None:
        """After the step: the global batch's second views (detached, from the weights the loss
        saw) enter the memory bank, with their images' labels under --supervised."""
        if self.queue is None:
            return
        rows = distributed.all_gather_rows(embeddings[1].detach().float(), self.topology)
        if labels is None:
            self.queue.enqueue(rows)
        else:
            self.queue.enqueue(rows, distributed.all_gather_rows(labels[:, None], self.topology)[:, 0])

    def train_step(self, epoch: int, step: int, order: torch.Tensor) -> float:
        """One optimizer step; returns the global-batch loss (checked finite before the update)."""
        embeddings, labels = self.embed_step(epoch, step, order)
        loss = self.loss_of(self.loss_fn, embeddings, labels)
        # fastalpha.distributed returns W × (this rank's share), so the mean over ranks is the global loss.
        stats = torch.stack([loss.detach().float(), torch.tensor(float(self.stop_requested), device=loss.device)])
        stats = distributed.all_reduce_sum(stats, self.topology).cpu()
        value = stats[0].item() / self.topology.world_size
        self.stop_agreed = bool(stats[1].item() > 0)
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite loss ({value}) at epoch {epoch}, step {step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.enqueue(embeddings, labels)
        return value

    def set_lr(self, epoch: int, step: int) -> float:
        total = self.cfg.epochs * self.plan.steps_per_epoch
        lr = learning_rate(self.cfg, (epoch - 1) * self.plan.steps_per_epoch + step, total, self.plan.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_epoch(self, epoch: int, progress) -> dict:
        """Train epoch `epoch` (1-based) from `self.step_in_epoch`; returns its metrics row."""
        self.plan.order_generator.set_state(self.order_state)
        order = self.plan.epoch_order()
        steps = self.plan.steps_per_epoch
        lr = self.cfg.lr
        bar = progress(range(self.step_in_epoch, steps), total=steps, initial=self.step_in_epoch,
                       desc=f"epoch {epoch}/{self.cfg.epochs}", unit="step")
        for step in bar:
            start = time.perf_counter()
            self.mid_step = True  # from here until the counters agree with the weights again
            lr = self.set_lr(epoch, step)
            value = self.train_step(epoch, step, order)
            self.partial["time"] += time.perf_counter() - start
            self.partial["loss_sum"] += value
            self.partial["steps"] += 1
            self.step_in_epoch = step + 1
            self.mid_step = False
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if self.stop_agreed and self.step_in_epoch < steps:
                self.save()
                raise Interrupted(f"stopped at epoch {epoch}, step {self.step_in_epoch}/{steps}")
        if hasattr(bar, "close"):
            bar.close()
        elapsed = self.partial["time"]
        row = {"epoch": epoch, "steps": steps, "loss": self.partial["loss_sum"] / max(self.partial["steps"], 1), "lr": lr,
               "knn_top1": None, "epoch_time_s": round(elapsed, 3),
               "images_per_s": round(steps * self.plan.global_batch / max(elapsed, 1e-9), 1), "eval_time_s": None}
        self.epochs_done = epoch
        self.step_in_epoch = 0
        self.partial = {"loss_sum": 0.0, "steps": 0, "time": 0.0}
        self.order_state = self.plan.order_generator.get_state()
        return row

    # ----------------------------------------------------------------- probes
    def features(self):
        return (evaluate.extract_features(self.model, self.data.train, self.spec, self.device, amp_dtype=self.amp_dtype),
                evaluate.extract_features(self.model, self.data.test, self.spec, self.device, amp_dtype=self.amp_dtype))

    def probe(self, which: str, features=None) -> evaluate.ProbeResult:
        cfg = self.cfg
        return evaluate.probe(self.model, self.data, self.spec, self.device, which, cfg.knn_k, cfg.knn_t, cfg.linear_epochs,
                              cfg.seed, amp_dtype=self.amp_dtype, features=features)

    def knn_monitor(self) -> float:
        self.last_features = self.features()
        return self.probe("knn", self.last_features).knn

    def wants_knn(self, epoch: int) -> bool:
        every = self.cfg.eval_every
        return every > 0 and (epoch % every == 0 or epoch == self.cfg.epochs)

    # ----------------------------------------------------------------- driver
    def baseline(self) -> None:
        """Row 0 and the untrained-encoder probes (skipped when resuming: they are in the checkpoint)."""
        if self.history:
            return
        if self.topology.is_main:
            which = self.cfg.eval
            if self.cfg.eval_every > 0 and which == "linear":
                which = "both"
            result = self.probe(which)
            self.probes["untrained"] = result.as_dict()
            knn = result.knn if self.cfg.eval_every > 0 else None
            self.history.append({"epoch": 0, "steps": 0, "loss": None, "lr": None, "knn_top1": knn,
                                 "epoch_time_s": None, "images_per_s": None})
        self.history = distributed.broadcast_object(self.history, self.topology)
        self.probes = distributed.broadcast_object(self.probes, self.topology)

    def fit(self, progress, on_epoch=None) -> None:
        """Train from `epochs_done` to cfg.epochs, checkpointing after every epoch."""
        for epoch in range(self.epochs_done + 1, self.cfg.epochs + 1):
            row = self.train_epoch(epoch, progress)
            self.last_features = None
            if self.wants_knn(epoch) and self.topology.is_main:
                start = time.perf_counter()
                row["knn_top1"] = self.knn_monitor()
                row["eval_time_s"] = round(time.perf_counter() - start, 3)
            distributed.barrier(self.topology)
            self.history.append(row)
            self.save()
            if on_epoch is not None:
                on_epoch(row)
            if self.stop_agreed and epoch < self.cfg.epochs:
                raise Interrupted(f"stopped after epoch {epoch}")

    def final_probes(self) -> evaluate.ProbeResult:
        return self.probe(self.cfg.eval, self.last_features)

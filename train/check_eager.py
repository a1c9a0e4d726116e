r"""--check-eager K: the fused backend against the eager reference over K training steps.

Both start from the same initial weights (the seed) and see the same batches and the same
augmentation (generators seeded by (seed, epoch, step)), with the run's views and, with
--supervised, its labels, so they differ only in how the loss and its gradient are computed.
Two comparisons:

1. Lockstep (the pass/fail criterion). The trajectory follows the eager reference; at each of
   the K steps both backends evaluate the loss and all parameter gradients at the *same*
   weights on the same batch:

       loss deviation     = max_k |L_fused − L_eager| / |L_eager|
       gradient deviation = max_k max over parameter tensors θ of ||g_fused − g_eager|| / ||g_eager||

   The check fails (exit status 1) if either exceeds the tolerance (default 1e-3 in float32,
   5e-2 with --amp bf16; --check-tol overrides). An exact kernel sits at rounding level
   (≈1e-6 in float32); a wrong term in a gradient shows up at O(1e-2) or more.

2. Free-running (reported, not judged). Each backend trains its own K steps; the largest
   relative loss deviation and ||θ_fused − θ_eager|| / ||θ_eager|| after K steps are printed.
   Adam turns rounding differences in near-zero gradient entries into ±lr steps, so these
   grow quickly even for an exact kernel (measured: 5e-3 in the loss and 3e-2 in a parameter
   after 10 steps on Fashion-MNIST, batch 256, with a bit-exact re-implementation of eager);
   a tolerance on them would fail correct kernels.
"""
from __future__ import annotations

import dataclasses

import torch

import fastalpha

from . import distributed
from .trainer import Trainer

DEFAULT_TOLERANCE = {"none": 1e-3, "bf16": 5e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return (torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float()).clamp_min(1e-30)).item()


def _lockstep(cfg, data, spec, device, backend: str, steps: int, log) -> dict:
    trainer = Trainer(dataclasses.replace(cfg, backend="eager"), data, spec, device, log=log)
    fused_loss = fastalpha.AlphaCLLoss(**cfg.loss_kwargs, backend=backend)
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    rows = []
    for epoch, step, order in _first_steps(trainer, steps):
        # The trainer's own step inputs: its views (--views), labels (--supervised) and, through
        # loss_of, the memory bank of --queue-size as the trainer fills it (on the eager trajectory).
        embeddings, labels = trainer.embed_step(epoch, step, order)
        loss_f = trainer.loss_of(fused_loss, embeddings, labels)
        grads_f = torch.autograd.grad(loss_f, params, retain_graph=True)
        loss_e = trainer.loss_of(trainer.loss_fn, embeddings, labels)
        grads_e = torch.autograd.grad(loss_e, params)
        devs = [_rel(gf, ge) for gf, ge in zip(grads_f, grads_e)]
        worst = max(range(len(devs)), key=devs.__getitem__)
        rows.append({"loss_fused": loss_f.item(), "loss_eager": loss_e.item(),
                     "loss_rel_dev": abs(loss_f.item() - loss_e.item()) / max(abs(loss_e.item()), 1e-30),
                     "grad_rel_dev": devs[worst], "worst_grad": names[worst]})
        trainer.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, grads_e):
            p.grad = g
        trainer.optimizer.step()
        trainer.enqueue(embeddings, labels)
    return rows


def _first_steps(trainer, steps: int):
    """(epoch, step, data order) of the run's first `steps` steps, the lr of each set on the way."""
    order = None
    for k in range(steps):
        epoch, step = 1 + k // trainer.plan.steps_per_epoch, k % trainer.plan.steps_per_epoch
        if step == 0:
            order = trainer.plan.epoch_order()
        trainer.set_lr(epoch, step)
        yield epoch, step, order


def _free_run(cfg, data, spec, device, backend: str, steps: int, log):
    trainer = Trainer(dataclasses.replace(cfg, backend=backend), data, spec, device, log=log)
    losses = [trainer.train_step(epoch, step, order) for epoch, step, order in _first_steps(trainer, steps)]
    return losses, {name: p.detach().float().cpu().clone() for name, p in trainer.model.named_parameters()}


def check_against_eager(cfg, data, spec, device, backend: str, steps: int, tolerance: float,
                        topology=distributed.Topology(), log=print) -> dict:
    """Run both comparisons; returns the report (with "passed") and logs tables."""
    if topology.enabled:
        raise ValueError("--check-eager runs in a single process; start it without torchrun")
    rows = _lockstep(cfg, data, spec, device, backend, steps, log)
    loss_dev = max(r["loss_rel_dev"] for r in rows)
    worst = max(rows, key=lambda r: r["grad_rel_dev"])
    fused_losses, fused_params = _free_run(cfg, data, spec, device, backend, steps, log)
    eager_losses, eager_params = _free_run(cfg, data, spec, device, "eager", steps, log)
    free_loss = max(abs(f - e) / max(abs(e), 1e-30) for f, e in zip(fused_losses, eager_losses))
    param_devs = {name: _rel(fused_params[name], p) for name, p in eager_params.items()}
    worst_param = max(param_devs, key=param_devs.get)
    report = {
        "backend": backend, "steps": steps, "tolerance": tolerance,
        "lockstep": rows, "max_loss_rel_dev": loss_dev, "max_grad_rel_dev": worst["grad_rel_dev"],
        "worst_grad": worst["worst_grad"],
        "free_run": {"losses_fused": fused_losses, "losses_eager": eager_losses, "max_loss_rel_dev": free_loss,
                     "max_param_rel_dev": param_devs[worst_param], "worst_param": worst_param},
    }
    report["passed"] = loss_dev <= tolerance and worst["grad_rel_dev"] <= tolerance
    log(f"--check-eager {steps}: backend {backend!r} against the eager reference (same weights, batches, augmentation)")
    log("lockstep: both backends at the same weights every step (the trajectory follows eager)")
    log(f"{'step':>5} {'loss (' + backend + ')':>18} {'loss (eager)':>18} {'loss dev':>10} {'grad dev':>10}  worst tensor")
    for k, r in enumerate(rows, 1):
        log(f"{k:>5} {r['loss_fused']:>18.10f} {r['loss_eager']:>18.10f} {r['loss_rel_dev']:>10.2e} "
            f"{r['grad_rel_dev']:>10.2e}  {r['worst_grad']}")
    log(f"largest relative loss deviation           : {loss_dev:.3e}")
    log(f"largest relative parameter-gradient dev.  : {worst['grad_rel_dev']:.3e} ({worst['worst_grad']})")
    log(f"free-running {steps} steps each (reported only; Adam amplifies rounding, see --help):")
    log(f"  largest relative loss deviation         : {free_loss:.3e}")
    log(f"  largest relative parameter deviation    : {param_devs[worst_param]:.3e} ({worst_param})")
    log(f"tolerance (lockstep)                      : {tolerance:.1e}  →  {'PASSED' if report['passed'] else 'FAILED'}")
    return report

r"""Theorem 1 of Tian (2022) for every listed member of the family L_{φ,ψ} (Eqn. 1).

    python -m train.theory.phi_psi                     # from the repository root; a few seconds

For each preset (fastalpha.theory.PHI_PSI_PRESETS) and a small float64 MLP θ, prints the
relative gap  max|∂L/∂θ + ∂E_α/∂θ| / max|∂L/∂θ|  with α = sg(α(θ)) from Eqn. 4,
α_ij = φ'(ξ_i) ψ'(d2_i − d2_ij), which Theorem 1 says is 0 (here: round-off, ~1e-16), and plots
each member's pair weights α_ij against the margin v_ij = d2_i − d2_ij: how much a negative
pair counts as a function of how "hard" it is.

Writes <out>/phi_psi_alpha.png.
"""
from __future__ import annotations

import os
import time

import torch

from fastalpha import theory as T

from . import script

DT = torch.float64


def theorem1_gap(preset, net, x1, x2):
    params = list(net.parameters())
    z1, z2 = net(x1), net(x2)
    g_loss = torch.autograd.grad(T.phi_psi_loss(z1, z2, preset), params)
    z1, z2 = net(x1), net(x2)
    alpha = T.alpha_phi_psi(z1, z2, preset)
    g_energy = torch.autograd.grad(T.energy(z1, z2, alpha), params)
    gap = max(float((a + b).abs().max()) for a, b in zip(g_loss, g_energy))
    return gap / max(float(a.abs().max()) for a in g_loss), alpha, (z1.detach(), z2.detach())


def main(argv=None) -> dict:
    ap = script.parser(__doc__)
    ap.add_argument("--samples", type=int, default=16, help="N, samples per view")
    args, t0 = script.start(ap, argv)
    torch.manual_seed(args.seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(DT)
    with torch.no_grad():
        net[2].weight.mul_(3.0)  # O(1) margins
    g = torch.Generator().manual_seed(args.seed + 1)
    x1 = torch.randn(args.samples, 6, dtype=DT, generator=g)
    x2 = x1 + 0.8 * torch.randn(args.samples, 6, dtype=DT, generator=g)  # margins on both sides of 0

    results, panels = {}, []
    print(f"Theorem 1, relative gap |dL/dθ + dE_α/dθ| / |dL/dθ| (float64, N = {args.samples}):")
    for name, factory in T.PHI_PSI_PRESETS.items():
        preset = factory()
        gap, alpha, (z1, z2) = theorem1_gap(preset, net, x1, x2)
        v, mask = T.pair_margins(T.stack_views(z1, z2))
        results[name] = gap
        panels.append((preset, v[mask], alpha[mask]))
        print(f"  {preset.name:<34s} {preset.formula:<44s} gap = {gap:.2e}   α ∈ [{float(alpha[mask].min()):.3g}, {float(alpha[mask].max()):.3g}]")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "phi_psi_alpha.png")
    plot(panels, path)
    print(f"wrote {path}   ({time.time() - t0:.1f} s)")
    return {"gaps": results, "figure": path}


def plot(panels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), constrained_layout=True, squeeze=False)
    for ax, (preset, v, a) in zip(axes.ravel(), panels):
        ax.scatter(v, a, s=3, alpha=0.5)
        ax.set_title(f"{preset.name}\n{preset.formula}", fontsize=7)
        ax.set_xlabel(r"margin $v_{ij} = d^2_i - d^2_{ij}$", fontsize=7)
        ax.set_ylabel(r"$\alpha_{ij}$", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.suptitle(r"Pair importance of the $L_{\phi,\psi}$ family (Eqn. 4): $\alpha_{ij} = \phi'(\xi_i)\,\psi'(v_{ij})$", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

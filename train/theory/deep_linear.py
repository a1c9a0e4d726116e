r"""Fig. 2 of Tian (2022): the max player on an L-layer deep linear network with fixed α.

    python -m train.theory.deep_linear                 # from the repository root; < 10 s on a CPU
    python -m train.theory.deep_linear --layers 5 --steps 1000 --out train/theory/figures

For z = W_L ⋯ W_1 x and a fixed pair importance α, E_α = ½ tr(W X_α Wᵀ) with X_α = C_α[x]
(here α = InfoNCE's, Eqn. 4, evaluated on the inputs). The normalised gradient flow of Eqn. 11
(ascent on E_α with every ||W_l||_F = 1) is integrated from a random start. Theorem 3 says
the maximum is ½ λ_max(X_α), reached by rank-1 layers; the script prints and plots

* E_α(t) against ½ λ_max(X_α)                                            (Theorem 3)
* the singular values of every W_l: the largest → 1, all others → 0     (rank-1 collapse)
* the balancedness drift of W_l W_lᵀ − W_{l+1}ᵀ W_{l+1} along the *un*normalised flow,
  integrated with RK4 (≈ 0: Lemma 1's invariant), against the normalised flow (not ≈ 0).

Writes <out>/deep_linear_fig2.png.
"""
from __future__ import annotations

import os
import time

import torch

from fastalpha import theory as T

from . import script

DT = torch.float64


def make_problem(seed: int, n: int, d: int, aug: float):
    """Anisotropic Gaussian data, two noisy views, α from InfoNCE (τ = 2) on the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=DT, generator=g) * torch.linspace(2.0, 0.3, d, dtype=DT)
    x1 = x + aug * torch.randn(n, d, dtype=DT, generator=g)
    x2 = x + aug * torch.randn(n, d, dtype=DT, generator=g)
    alpha = T.alpha_phi_psi(x1, x2, T.infonce(tau=2.0, eps=1.0))
    return T.contrastive_covariance(x1, x2, alpha), g


def balancedness_drift(ws0, ws1):
    """(max_l ||Δ_l(T) − Δ_l(0)||_F / moved, moved) with moved = max_l ||W_l W_lᵀ(T) − W_l W_lᵀ(0)||_F."""
    d0, d1 = T.balancedness(ws0), T.balancedness(ws1)
    moved = max(float(torch.linalg.matrix_norm(b @ b.T - a @ a.T)) for a, b in zip(ws0, ws1))
    return max(float(torch.linalg.matrix_norm(b - a)) for a, b in zip(d0, d1)) / moved, moved


def main(argv=None) -> dict:
    ap = script.parser(__doc__)
    ap.add_argument("--layers", type=int, default=5, help="L, the number of linear layers (Fig. 2: 5)")
    ap.add_argument("--input-dim", type=int, default=16)
    ap.add_argument("--width", type=int, default=12, help="width of the hidden layers")
    ap.add_argument("--output-dim", type=int, default=8)
    ap.add_argument("--samples", type=int, default=64, help="N, samples per view")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1.0, help="step size in units of 1/λ_max(X_α)")
    ap.add_argument("--balance-scale", type=float, default=1.1, help="||W_l||_F at the start of the balancedness run")
    ap.add_argument("--balance-steps", type=int, default=300)
    args, t0 = script.start(ap, argv)

    x_alpha, g = make_problem(args.seed, args.samples, args.input_dim, aug=0.2)
    lam = float(torch.linalg.eigvalsh(x_alpha)[-1])
    dims = [args.input_dim] + [args.width] * (args.layers - 1) + [args.output_dim]
    ws = T.frobenius_normalize([torch.randn(dims[l + 1], dims[l], dtype=DT, generator=g) for l in range(args.layers)])
    run = T.deep_linear_flow(ws, x_alpha, steps=args.steps, lr=args.lr / lam, record_every=5)

    # Balancedness: the unnormalised flow of the first three layers from a small start (the
    # unnormalised ascent blows up in finite time), RK4 so that the discrete trajectory follows
    # the continuous one to O(h⁴).
    small = [args.balance_scale * w for w in ws[:3]]
    kw = dict(steps=args.balance_steps, lr=0.02 / lam, method="rk4", record_every=args.balance_steps)
    plain = T.deep_linear_flow(small, x_alpha, normalize=False, **kw)
    normed = T.deep_linear_flow(small, x_alpha, normalize=True, **kw)
    drift_plain, moved = balancedness_drift(small, plain.ws)
    drift_normed, _ = balancedness_drift(small, normed.ws)

    final_sv = [s.tolist() for s in run.singular_values[-1]]
    out = {
        "half_lambda_max": lam / 2,
        "objective_final": run.objective[-1],
        "objective_gap_rel": abs(run.objective[-1] - lam / 2) / (lam / 2),
        "sigma1": [s[0] for s in final_sv],
        "sigma2": [s[1] for s in final_sv],
        "balancedness_moved": moved,
        "balancedness_drift_unnormalised": drift_plain,
        "balancedness_drift_normalised": drift_normed,
    }
    print(f"L = {args.layers}, dims = {dims}, N = {args.samples}, steps = {args.steps}")
    print(f"Theorem 3: ½ λ_max(X_α) = {lam / 2:.10f}   E_α(final) = {run.objective[-1]:.10f}   rel. gap = {out['objective_gap_rel']:.2e}")
    for l, s in enumerate(final_sv, 1):
        print(f"  W_{l}: σ_1 = {s[0]:.12f}   σ_2 = {s[1]:.2e}   (σ_2..: max {max(s[1:]):.2e})")
    print(f"Balancedness (3 layers, RK4, W_l W_lᵀ moved by {moved:.3f}): drift of W_l W_lᵀ − W_(l+1)ᵀ W_(l+1) "
          f"relative to that = {drift_plain:.2e} unnormalised (invariant), {drift_normed:.2e} normalised (not)")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "deep_linear_fig2.png")
    plot(run, lam, path, args.layers)
    print(f"wrote {path}   ({time.time() - t0:.1f} s)")
    out["figure"] = path
    return out


def plot(run, lam, path, n_layers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = run.steps
    cols = 3
    rows = -(-(n_layers + 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), constrained_layout=True, squeeze=False)
    axes = axes.ravel()
    for ax in axes[n_layers + 1 :]:
        ax.axis("off")
    ax = axes[0]
    ax.plot(steps, run.objective, color="k", lw=1.6, label=r"$\mathcal{E}_\alpha(t)$")
    ax.axhline(lam / 2, color="tab:red", ls="--", lw=1.2, label=r"$\lambda_{\max}(X_\alpha)/2$")
    ax.set_xlabel("step")
    ax.set_title("objective (Theorem 3)")
    ax.legend(loc="lower right", fontsize=8)
    for l in range(n_layers):
        ax = axes[l + 1]
        sv = torch.stack([s[l] for s in run.singular_values])
        for k in range(sv.shape[1]):
            ax.plot(steps, sv[:, k], lw=1.4 if k == 0 else 0.8, color="tab:blue" if k == 0 else "tab:gray")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_title(f"singular values of $W_{l + 1}$")
    fig.suptitle(f"Deep linear network, L = {n_layers}, fixed α, per-layer Frobenius normalisation (Eqn. 11)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

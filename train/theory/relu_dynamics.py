r"""Section 5 of Tian (2022): the max player on a two-layer ReLU net, z = W_2 σ(W_1 x).

    python -m train.theory.relu_dynamics               # from the repository root; < 30 s on a CPU
    python -m train.theory.relu_dynamics --out train/theory/figures --seed 0

Data: the orthogonal mixture (Assumption 1) with d components, x = a e_m, a > 0, two views
differing in the magnitude a. With a fixed α ≥ 0 and X_α = C_α[x] (off-diagonal ≤ 0),
E_α = ½ tr(W_2ᵀW_2 U X_α Uᵀ), U = [W_1]_+ (fastalpha/theory/relu.py states each item, and
says which are the paper's and which are this project's own propositions).
The script runs projected gradient ascent and prints / plots:

* Theorem 4 (sticky weights): a first-layer weight that is ≤ 0 gets exactly zero gradient,
  so it never becomes positive again (counted along a single-node run);
* Theorem 5 (one node): W_1 → e_{m*}, E_α → ½ X_α[m*, m*], m* depending on the start;
* K nodes, in the style of Fig. 3: converged W_1 and W_2ᵀW_2 heat maps for
  (a) Proposition A (this project's): W_2 fixed with W_2ᵀW_2 > 0 entrywise → W_1 = v e_mᵀ,
  (b) Proposition B (this project's): W_2 fixed with orthonormal columns, per-node
      normalisation (outside the paper's Θ) → each node its own e_m, rank(W_1) > 1,
  (c) the setting of the paper's Theorem 6: W_2 trained as well in Θ, fixed α (measured:
      W_1 = v e_mᵀ, the rank-1 branch of the theorem; Fig. 3's rank > 1 does not appear here),
  (d) α-CL proper: InfoNCE's α recomputed from the outputs every step, W_2 trained
      (measured; illustration only, no theorem claimed).

Writes <out>/relu_theorem4_5.png and <out>/relu_fig3.png.
"""
from __future__ import annotations

import os
import time

import torch

from fastalpha import theory as T

from . import script

DT = torch.float64


def summary(w1: torch.Tensor) -> dict:
    """Row concentration, picked components and numerical rank of U = [W_1]_+."""
    u = torch.relu(w1)
    conc = T.row_concentration(w1)
    norms = torch.linalg.vector_norm(u, dim=1)
    # A node whose live part has decayed below 1e-6 of the largest one no longer matters.
    live = norms > 1e-6 * norms.max()
    s = torch.linalg.svdvals(u)
    return {
        "min_concentration_live": float(conc[live].min()) if live.any() else 0.0,
        "negligible_nodes": int((~live).sum()),
        "components": sorted(set(u[live].argmax(1).tolist())),
        "rank": int((s > 1e-6 * s[0]).sum()),
        "sigma2_over_sigma1": float(s[1] / s[0]),
    }


def sticky_violations(history) -> tuple[int, int]:
    """(# entries that went from ≤ 0 to > 0, # entries that died) along a recorded run."""
    revived = died = 0
    for before, after in zip(history, history[1:]):
        dead = before <= 0
        revived += int((after[dead] > 0).sum())
        died += int(((after <= 0) & ~dead).sum())
    return revived, died


def main(argv=None) -> dict:
    ap = script.parser(__doc__)
    ap.add_argument("--components", type=int, default=10, help="d, the number of mixture components")
    ap.add_argument("--hidden", type=int, default=10, help="K, hidden nodes for Fig. 3")
    ap.add_argument("--samples", type=int, default=128, help="N, samples per view (fixed-α runs)")
    ap.add_argument("--live-samples", type=int, default=48, help="N for the α-CL run (α recomputed each step)")
    args, t0 = script.start(ap, argv)
    d, k = args.components, args.hidden
    mags = torch.linspace(2.0, 1.0, d).tolist()
    g = torch.Generator().manual_seed(args.seed)
    x1, x2, _ = T.orthogonal_mixture(args.samples, mags, aug_std=0.1, generator=g)
    m_rows = 2 * args.samples
    x_alpha = T.contrastive_covariance(x1, x2, T.negative_mask(m_rows).to(DT) / (m_rows - 2))  # quadratic α
    lam = float(torch.linalg.eigvalsh(x_alpha)[-1])
    diag = torch.diagonal(x_alpha)
    off = x_alpha[~torch.eye(d, dtype=torch.bool)]
    print(f"d = {d} components, N = {args.samples}, α = 1/(M−2): X_α diag in [{float(diag.min()):.2f}, {float(diag.max()):.2f}], "
          f"max off-diagonal = {float(off.max()):.2e} (≤ 0 under Assumption 1)")
    out = {"x_alpha_diag": diag.tolist(), "max_offdiag": float(off.max())}

    # --- Theorems 4 and 5: one hidden node, mixed-sign start ---------------------------
    w1 = torch.randn(1, d, dtype=DT, generator=g)
    w1 = w1 / w1.norm()
    w2 = torch.randn(4, 1, dtype=DT, generator=g)
    single = T.relu2_flow(w1, w2 / w2.norm(), x_alpha, steps=3000, lr=0.02 / lam, record_every=1)
    revived, died = sticky_violations(single.w1_history)
    m_star = int(single.w1.argmax())
    print(f"Theorem 4: along the single-node run {died} weights died and {revived} came back (must be 0)")
    print(f"Theorem 5: W_1 → e_{m_star} (concentration {float(T.row_concentration(single.w1)[0]):.15f}, "
          f"largest other |w| = {float(single.w1[0].abs().sort().values[-2]):.1e}); "
          f"E = {single.objective[-1]:.10f}, ½ X[m*,m*] = {0.5 * float(diag[m_star]):.10f}, ½ max_m X_mm = {0.5 * float(diag.max()):.10f}")
    winners = []
    for s in range(20):
        gs = torch.Generator().manual_seed(1000 + s)
        w = torch.rand(1, d, dtype=DT, generator=gs)
        r = T.relu2_flow(w / w.norm(), torch.ones(1, 1, dtype=DT), x_alpha, steps=1500, lr=0.2 / lam, record_every=1500)
        winners.append(int(r.w1.argmax()))
    print(f"Theorem 5: winners over 20 random non-negative starts: {winners}")
    out.update(theorem4_revived=revived, theorem4_died=died, theorem5_winner=m_star,
               theorem5_objective=single.objective[-1], theorem5_winners=winners)

    # --- K hidden nodes: Propositions A/B, Theorem 6's setting, α-CL (Fig. 3 style) --------
    runs, titles = {}, {
        "a": "(a) Prop. A: $W_2$ fixed, $W_2^TW_2>0$",
        "b": "(b) Prop. B: $W_2$ fixed, $W_2^TW_2=I$",
        "c": r"(c) Thm. 6 setting: $W_2$ trained, fixed $\alpha$",
        "d": r"(d) $\alpha$-CL: InfoNCE $\alpha$ each step",
    }
    w1 = torch.rand(k, d, dtype=DT, generator=g)
    w2 = 1 + 0.5 * torch.rand(8, k, dtype=DT, generator=g)
    runs["a"] = T.relu2_flow(
        w1 / w1.norm(), w2 / w2.norm(), x_alpha, steps=4000, lr=0.05 / lam, train_w2=False, record_every=4000)
    w1 = torch.randn(k, d, dtype=DT, generator=g).abs()
    q, _ = torch.linalg.qr(torch.randn(16, k, dtype=DT, generator=g))
    runs["b"] = T.relu2_flow(
        w1 / w1.norm(dim=1, keepdim=True), q, x_alpha, steps=3000, lr=0.2 / lam, train_w2=False, w1_norm="row", record_every=3000)
    w1 = torch.rand(k, d, dtype=DT, generator=g)
    w2 = torch.randn(8, k, dtype=DT, generator=g)
    runs["c"] = T.relu2_flow(
        w1 / w1.norm(), w2 / w2.norm(), x_alpha, steps=6000, lr=0.05 / lam, record_every=6000)
    lx1, lx2, _ = T.orthogonal_mixture(args.live_samples, mags, aug_std=0.1, generator=g)
    nce = T.infonce(tau=0.1, eps=1.0)
    w1 = torch.rand(k, d, dtype=DT, generator=g)
    w2 = torch.randn(8, k, dtype=DT, generator=g)
    runs["d"] = T.relu2_flow(
        w1 / w1.norm(), w2 / w2.norm(), None, steps=1500, lr=0.1, record_every=1500,
        alpha_fn=lambda z1, z2: T.alpha_phi_psi(z1, z2, nce), views=(lx1, lx2))
    out["fig3"] = {}
    for name, run in runs.items():
        info = summary(run.w1)
        info["objective"] = run.objective[-1]
        out["fig3"][name] = info
        print(f"Fig. 3 ({name}): live nodes on components {info['components']}, rank(W_1) = {info['rank']}, "
              f"σ2/σ1 = {info['sigma2_over_sigma1']:.2e}, min live-row concentration = {info['min_concentration_live']:.6f}, "
              f"negligible nodes = {info['negligible_nodes']}, E = {info['objective']:.4f}")

    os.makedirs(args.out, exist_ok=True)
    p45 = os.path.join(args.out, "relu_theorem4_5.png")
    p3 = os.path.join(args.out, "relu_fig3.png")
    plot_single(single, diag, winners, p45)
    plot_fig3(runs, titles, p3)
    print(f"wrote {p45} and {p3}   ({time.time() - t0:.1f} s)")
    out["figures"] = [p45, p3]
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_single(run, diag, winners, path):
    plt = _plt()
    hist = torch.stack([w[0] for w in run.w1_history])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), constrained_layout=True)
    ax = axes[0]
    for m in range(hist.shape[1]):
        ax.plot(run.steps, hist[:, m], lw=1.2, label=f"$w_{{{m}}}$")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, run.steps[-1])
    ax.set_xlabel("step")
    ax.set_title("one node: entries of $w$ (Thm. 4: ≤0 stays ≤0;\nThm. 5: one $e_m$ wins)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    ax = axes[1]
    m_star = int(run.w1.argmax())
    ax.plot(run.steps, run.objective, color="k", lw=1.5, label=r"$\mathcal{E}_\alpha(t)$")
    ax.axhline(0.5 * float(diag[m_star]), color="tab:red", ls="--", label=rf"$X_\alpha[{m_star},{m_star}]/2$")
    ax.axhline(0.5 * float(diag.max()), color="tab:green", ls=":", label=r"$\max_m X_\alpha[m,m]/2$")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(0, run.steps[-1])
    ax.set_xlabel("step")
    ax.set_title("objective of the single node (Thm. 5)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    counts = torch.bincount(torch.tensor(winners), minlength=diag.numel())
    ax.bar(range(diag.numel()), counts.tolist(), color="tab:blue", label="# starts won (of 20)")
    ax2 = ax.twinx()
    ax2.plot(range(diag.numel()), diag.tolist(), "o-", color="tab:orange", label=r"$X_\alpha[m,m]$")
    ax.set_xlabel("component m")
    ax.set_title("winner depends on the start (local maxima)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _order(w1):
    """Hidden nodes sorted by the component they sit on (dead nodes last), for readability."""
    u = torch.relu(w1)
    key = torch.where(u.sum(1) > 0, u.argmax(1).to(DT) + 1e-3 * torch.arange(u.shape[0], dtype=DT), torch.full((u.shape[0],), 1e9, dtype=DT))
    return torch.argsort(key)


def plot_fig3(runs, titles, path):
    plt = _plt()
    fig, axes = plt.subplots(2, len(runs), figsize=(3.6 * len(runs), 6.4), constrained_layout=True)
    for c, (name, run) in enumerate(runs.items()):
        order = _order(run.w1)
        w1 = run.w1[order]
        b = (run.w2.T @ run.w2)[order][:, order]
        lim = float(w1.abs().max())
        im = axes[0, c].imshow(w1, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[0, c].set_title(f"{titles[name]}\n$W_1$ (nodes × components)", fontsize=9)
        axes[0, c].set_xlabel("component m")
        axes[0, c].set_ylabel("hidden node (sorted)")
        fig.colorbar(im, ax=axes[0, c], shrink=0.8)
        lim = float(b.abs().max())
        im = axes[1, c].imshow(b, cmap="RdBu_r", vmin=-lim, vmax=lim)
        axes[1, c].set_title("$W_2^TW_2$", fontsize=9)
        axes[1, c].set_xlabel("hidden node")
        fig.colorbar(im, ax=axes[1, c], shrink=0.8)
    fig.suptitle("Two-layer ReLU net on the orthogonal mixture: converged weights (cf. Fig. 3)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

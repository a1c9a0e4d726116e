r"""Two-layer ReLU networks z = W_2 σ(W_1 x) on the orthogonal mixture, fixed α (Sec. 5).

Setting (ReLU2Layer): K hidden nodes (rows w_k of W_1), inputs x = a e_m with a > 0
(Assumption 1 with the basis rotated to e_m), α ≥ 0 fixed, X_α = C_α[x], U = [W_1]_+,
B = W_2ᵀ W_2, and the constraint set Θ = {||W_1||_F = ||W_2||_F = 1} of Eqn. 11 (Lemma 2 holds
for ReLU nets). Then E_α = ½ tr(B U X_α Uᵀ) exactly (Lemma 3).

The paper's statements, as checked in tests/test_theory_relu.py:

* Lemma 3: [W_1]_+ gives the same outputs; for W_1 ≥ 0 the linear formula for E_α holds.
* Theorem 4 (sticky weights): ∂E_α/∂W_1[k, m] = 0 whenever W_1[k, m] ≤ 0, so a component
  that reaches 0 stays 0 (under the normalised flow it is only rescaled, and decays to 0).
* Theorem 5 (one hidden node, ReLU2Layer1Hid): w_1 → e_m for some m, which depends on the
  initialisation (every e_m is a local optimum).
* Theorem 6: any local optimum (W_2, W_1) ∈ Θ with E > 0 has either W_1 = v e_mᵀ (v ≥ 0) or
  rank(W_1) > 1. Checked by joint projected ascent in Θ from many starts
  (`relu2_flow(train_w2=True)`): every run ends at a local optimum, and every rank-1 W_1 found
  is v e_mᵀ, whereas the linear net z = W_2 W_1 x on the same X_α ends at W_1 = v v_0ᵀ with
  v_0 the top eigenvector of X_α, which is not an e_m. The runs here all end rank 1: the
  paper's Fig. 3 ("more diverse than rank 1") is not reproduced in Θ with a fixed α; rank > 1
  appears with the per-node normalisation of Proposition B (outside Θ) or with α recomputed
  every step (`relu2_flow(alpha_fn=...)`).

Lemma (orthogonal mixture): X_α[m, m'] ≤ 0 for m ≠ m' (a pair (i, j) in components m, m'
contributes −α_ij a_i a_j; the positive-pair term vanishes off the diagonal because both views of
a sample share its component). The paper uses this inside its proofs; it is checked directly.

This project's own propositions (not the paper's; proved here in a line each):

* Proposition A (W_2 fixed with B = W_2ᵀW_2 entrywise ≥ 0, nodes cooperate): the global
  maximum over ||W_1||_F = 1 is W_1 = v e_{m*}ᵀ (v the Perron vector of B, m* = argmax X_mm),
  because every cross-component term X_mm' c_mᵀ B c_m' (c_m = U e_m ≥ 0) is ≤ 0; the
  seeded flows end there.
* Proposition B (W_2 fixed with orthonormal columns, B = I, and every row of W_1 normalised
  on its own, outside Θ): row k evolves exactly as Theorem 5's single node, so node k
  converges to its own e_{m_k} and rank(W_1) = #{distinct m_k}, > 1 in general.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .geometry import contrastive_covariance

Tensor = torch.Tensor

__all__ = ["orthogonal_mixture", "relu2_forward", "relu2_objective", "relu2_gradients", "ReluRun", "relu2_flow",
           "row_concentration", "max_nonneg_quadratic", "rank_one_component", "relu2_stationarity"]


def orthogonal_mixture(
    n: int,
    magnitudes: Sequence[float],
    aug_std: float = 0.1,
    generator: torch.Generator | None = None,
    dtype=torch.float64,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Samples of the orthogonal mixture model (Assumption 1), in its simplest form.

    There are d = len(magnitudes) components, component m supported on the coordinate e_m
    (so samples of different components are orthogonal and all samples are ≥ 0). A sample
    of component m is a e_m; its two views are x = a₁ e_m, x' = a₂ e_m with
    a_k = μ_m (1 + σ ε_k), ε_k ~ N(0, 1) clipped at ±3 (so a_k > 0 for σ < 1/3): augmentation
    perturbs the magnitude only. Components are drawn uniformly. Returns (x1, x2, labels).
    """
    d = len(magnitudes)
    if not 0 <= aug_std < 1 / 3:
        raise ValueError(f"aug_std must be in [0, 1/3) so magnitudes stay positive, got {aug_std}")
    labels = torch.randint(0, d, (n,), generator=generator)
    mu = torch.as_tensor(magnitudes, dtype=dtype)[labels]
    noise = torch.randn(2, n, dtype=dtype, generator=generator).clamp(-3, 3)
    onehot = torch.nn.functional.one_hot(labels, d).to(dtype)
    x1 = onehot * (mu * (1 + aug_std * noise[0]))[:, None]
    x2 = onehot * (mu * (1 + aug_std * noise[1]))[:, None]
    return x1, x2, labels


def relu2_forward(w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """z = W_2 σ(W_1 x) for the rows of x (bias-free, σ = ReLU)."""
    return torch.relu(x @ w1.T) @ w2.T


def relu2_objective(w1: Tensor, w2: Tensor, x_alpha: Tensor) -> Tensor:
    r"""E_α = ½ tr(W_2 U X_α Uᵀ W_2ᵀ), U = [W_1]_+ — exact when every input is a e_m with a > 0
    (then σ(W_1 a e_m) = a U e_m, so C_α[h] = U C_α[x] Uᵀ with X_α = C_α[x])."""
    u = torch.relu(w1)
    return 0.5 * torch.trace(w2 @ u @ x_alpha @ u.T @ w2.T)


def relu2_gradients(w1: Tensor, w2: Tensor, x_alpha: Tensor) -> tuple[Tensor, Tensor]:
    r"""Max-player gradients of E_α for one-hot-supported (Assumption 1) data, fixed α:

        ∂E/∂W_1 = (B U X_α) ⊙ 1[W_1 > 0],   B = W_2ᵀ W_2,  U = [W_1]_+,
        ∂E/∂W_2 = W_2 U X_α Uᵀ.

    Row k of ∂E/∂W_1 is Σ_{k'} B_{kk'} C_α[x̃_k, x̃_{k'}] w_{k'} with the gated inputs
    x̃_k = x 1[w_kᵀ x > 0], the paper's ReLU dynamics, specialised to this data. The mask uses
    relu'(0) = 0, as autograd does.
    """
    u = torch.relu(w1)
    g1 = (w2.T @ w2 @ u @ x_alpha) * (w1 > 0).to(w1.dtype)
    g2 = w2 @ u @ x_alpha @ u.T
    return g1, g2


@dataclass
class ReluRun:
    """Trajectory of `relu2_flow`: final weights, E_α and W_1 at the recorded steps."""

    w1: Tensor
    w2: Tensor
    steps: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    w1_history: list[Tensor] = field(default_factory=list)


def _renormalize(w: Tensor, mode: str, target: Tensor) -> Tensor:
    if mode == "layer":
        return w * (target / torch.linalg.matrix_norm(w))
    if mode == "row":
        return w * (target / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
    return w


def relu2_flow(
    w1: Tensor,
    w2: Tensor,
    x_alpha: Tensor | None,
    steps: int,
    lr: float,
    train_w2: bool = True,
    w1_norm: str = "layer",
    w2_norm: str = "layer",
    record_every: int = 1,
    alpha_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    views: tuple[Tensor, Tensor] | None = None,
) -> ReluRun:
    r"""Projected gradient ascent of E_α in (W_1, W_2) for one-hot-supported data.

    Each step is W ← normalise(W + lr ∂E/∂W) (`relu2_gradients`), where normalise keeps
    the initial norms: "layer" = per-layer Frobenius norm (as Eqn. 11 for deep linear nets),
    "row" = the norm of every row (for W_1: each hidden node ||w_k|| fixed), "none" = plain
    ascent. W_2 is held fixed when `train_w2` is False (then B = W_2ᵀW_2 is a constant).

    Fixed α (the paper's max player): pass X_α = C_α[x]. Coordinate-wise α-CL (the min player
    refreshed every step): pass `alpha_fn(z1, z2) -> α` and `views = (x1, x2)`; then
    X_α(t) = C_{α(t)}[x] with α(t) computed from the current outputs z = W_2 σ(W_1 x).
    """
    for name, mode in (("w1_norm", w1_norm), ("w2_norm", w2_norm)):
        if mode not in ("layer", "row", "none"):
            raise ValueError(f"{name} must be 'layer', 'row' or 'none', got {mode!r}")
    if (alpha_fn is None) == (x_alpha is None):
        raise ValueError("pass exactly one of x_alpha (fixed α) or alpha_fn (α refreshed each step)")
    if alpha_fn is not None and views is None:
        raise ValueError("alpha_fn needs views=(x1, x2) to compute α and C_α[x]")
    w1, w2 = w1.clone(), w2.clone()
    t1 = torch.linalg.matrix_norm(w1) if w1_norm == "layer" else torch.linalg.vector_norm(w1, dim=1)
    t2 = torch.linalg.matrix_norm(w2) if w2_norm == "layer" else torch.linalg.vector_norm(w2, dim=1)
    run = ReluRun(w1=w1, w2=w2)

    def current_x_alpha():
        if alpha_fn is None:
            return x_alpha
        x1, x2 = views
        alpha = alpha_fn(relu2_forward(w1, w2, x1), relu2_forward(w1, w2, x2))
        return contrastive_covariance(x1, x2, alpha)

    for t in range(steps + 1):
        xa = current_x_alpha()
        if t % record_every == 0 or t == steps:
            run.steps.append(t)
            run.objective.append(float(relu2_objective(w1, w2, xa)))
            run.w1_history.append(w1.clone())
        if t == steps:
            break
        g1, g2 = relu2_gradients(w1, w2, xa)
        w1 = _renormalize(w1 + lr * g1, w1_norm, t1)
        if train_w2:
            w2 = _renormalize(w2 + lr * g2, w2_norm, t2)
    run.w1, run.w2 = w1, w2
    return run


def row_concentration(w1: Tensor) -> Tensor:
    r"""For each hidden node k: max_m u_km / ||u_k||₂ with u_k = [w_k]_+ (what the ReLU sees on
    one-hot data); 1 iff the live part of w_k is c e_m, c > 0; 0 for a dead node (u_k = 0)."""
    u = torch.relu(w1)
    n = torch.linalg.vector_norm(u, dim=1)
    return torch.where(n > 0, u.amax(1) / n.clamp_min(torch.finfo(u.dtype).tiny), torch.zeros_like(n))


def max_nonneg_quadratic(x_alpha: Tensor) -> float:
    r"""max of wᵀ X w over unit w ≥ 0 when X has non-positive off-diagonal entries: = max_m X_mm.

    (wᵀXw = Σ_m X_mm w_m² + Σ_{m≠m'} X_mm' w_m w_m' ≤ Σ_m X_mm w_m² ≤ max_m X_mm.) Raises if
    an off-diagonal entry is positive, where the statement does not apply.
    """
    off = x_alpha - torch.diag(torch.diagonal(x_alpha))
    if float(off.max()) > 1e-12 * float(x_alpha.abs().max()):
        raise ValueError("X_alpha has a positive off-diagonal entry; the single-e_m bound does not apply")
    return float(torch.diagonal(x_alpha).max())


def rank_one_component(w1: Tensor, tol: float = 1e-6) -> tuple[int, int | None]:
    r"""(rank, m) of the first layer as the network sees it, U = [W_1]_+ (Lemma 3).

    rank = the number of singular values of U above tol·σ_max; m = the component when U is
    v e_mᵀ with v ≥ 0 (rank 1 and all of U's mass, to tol, in column m), else None.
    """
    u = torch.relu(w1)
    s = torch.linalg.svdvals(u)
    if float(s[0]) == 0.0:
        return 0, None
    rank = int((s > tol * s[0]).sum())
    col = torch.linalg.vector_norm(u, dim=0)
    m = int(col.argmax())
    off = float(torch.linalg.vector_norm(torch.cat([col[:m], col[m + 1:]])))
    return rank, (m if rank == 1 and off <= tol * float(col[m]) else None)


def relu2_stationarity(w1: Tensor, w2: Tensor, x_alpha: Tensor) -> float:
    r"""Size of the gradient of E_α tangent to Θ (both layers' Frobenius spheres), relative to
    λ_max(X_α): 0 at a critical point of E_α restricted to Θ."""
    g1, g2 = relu2_gradients(w1, w2, x_alpha)
    t1 = g1 - (g1 * w1).sum() / (w1 * w1).sum() * w1
    t2 = g2 - (g2 * w2).sum() / (w2 * w2).sum() * w2
    lam = float(torch.linalg.eigvalsh(x_alpha).abs().max())
    return float(torch.sqrt((t1 * t1).sum() + (t2 * t2).sum())) / lam


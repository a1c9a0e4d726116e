r"""Deep linear networks z = W_L ⋯ W_1 x with a fixed pair importance α (Sec. 4).

For z = W x, C_α[z] = W C_α[x] Wᵀ, so E_α = ½ tr(W X_α Wᵀ) with X_α = C_α[x] (Corollary 2:
PCA of the "contrastive covariance" X_α). Checked in tests/test_theory_deep_linear.py:

* Lemma 1: Ẇ_l = W_{>l}ᵀ W_{>l} W_l C_α[f_{l−1}] (`deep_linear_gradients`), and balancedness
  d/dt (W_l W_lᵀ − W_{l+1}ᵀ W_{l+1}) = 0 without normalisation (`balancedness`).
* Lemma 2 (normalisation layers conserve ||W_l||_F below them): tests/test_theory_normalisation.py.
* Theorem 3 (Eqn. 11, Θ = {||W_l||_F = 1}): every local maximum whose W_{>1}ᵀW_{>1} has a
  distinct top eigenvalue is W_l = v_l v_{l−1}ᵀ with v_0 the top eigenvector of X_α and
  2E* = λ_max(X_α) (`deep_linear_flow`, `rank_one_optimum`).
* Corollary 3: with per-filter normalisation ||w_lk|| = 1/√n_l (every row of W_l, for
  l = 1..L−1), Theorem 3 holds and [v_l]_k = ±1/√n_l (`filter_normalize`,
  `deep_linear_flow(..., per_filter=True)`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

Tensor = torch.Tensor

__all__ = ["chain", "deep_linear_objective", "deep_linear_gradients", "frobenius_normalize", "filter_normalize",
           "project_tangent", "project_tangent_rows", "balancedness", "balancedness_rate", "DeepLinearRun",
           "deep_linear_flow", "rank_one_optimum"]


def chain(ws: Sequence[Tensor], lo: int, hi: int) -> Tensor:
    """W_{hi−1} ⋯ W_{lo} (0-based, layers lo..hi−1); the identity of the right size if empty."""
    if hi <= lo:
        n = ws[lo].shape[1] if lo < len(ws) else ws[-1].shape[0]
        return torch.eye(n, dtype=ws[0].dtype, device=ws[0].device)
    out = ws[lo]
    for w in ws[lo + 1 : hi]:
        out = w @ out
    return out


def deep_linear_objective(ws: Sequence[Tensor], x_alpha: Tensor) -> Tensor:
    """E_α = ½ tr(W X_α Wᵀ) with W = W_L ⋯ W_1: for z = W x, C_α[z] = W C_α[x] Wᵀ."""
    w = chain(ws, 0, len(ws))
    return 0.5 * torch.trace(w @ x_alpha @ w.T)


def deep_linear_gradients(ws: Sequence[Tensor], x_alpha: Tensor) -> list[Tensor]:
    r"""Lemma 1 (max-player dynamics of a deep linear net with fixed α), for every layer l:

        Ẇ_l = ∂E_α/∂W_l = W_{>l}ᵀ W_{>l} W_l W_{<l} X_α W_{<l}ᵀ = W_{>l}ᵀ (W X_α) W_{<l}ᵀ,

    with W_{>l} = W_L ⋯ W_{l+1}, W_{<l} = W_{l−1} ⋯ W_1 and X_α = C_α[x] (symmetric).
    """
    n = len(ws)
    wx = chain(ws, 0, n) @ x_alpha
    return [chain(ws, l + 1, n).T @ wx @ chain(ws, 0, l).T for l in range(n)]


def frobenius_normalize(ws: Sequence[Tensor], radius: float | Sequence[float] = 1.0) -> list[Tensor]:
    """W_l ← r_l W_l / ||W_l||_F (Eqn. 11's per-layer constraint ||W_l||_F = r_l)."""
    radii = [radius] * len(ws) if isinstance(radius, (int, float)) else list(radius)
    return [w * (r / torch.linalg.matrix_norm(w)) for w, r in zip(ws, radii)]


def filter_normalize(ws: Sequence[Tensor]) -> list[Tensor]:
    """Corollary 3's constraint: every row (filter) w_lk of W_l, l = 1..L−1, has norm 1/√n_l
    (so ||W_l||_F = 1), and the top layer W_L has ||W_L||_F = 1."""
    out = [w * ((1 / math.sqrt(w.shape[0])) / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1) for w in ws[:-1]]
    return out + [ws[-1] / torch.linalg.matrix_norm(ws[-1])]


def project_tangent_rows(w: Tensor, g: Tensor) -> Tensor:
    """g_k − ⟨g_k, w_k⟩ w_k / ||w_k||² per row: the gradient on the product of row spheres."""
    return g - ((g * w).sum(1) / (w * w).sum(1)).unsqueeze(1) * w


def project_tangent(ws: Sequence[Tensor], grads: Sequence[Tensor]) -> list[Tensor]:
    """G_l − ⟨G_l, W_l⟩ W_l / ||W_l||²: the gradient on the product of spheres ||W_l||_F = const."""
    return [g - (g * w).sum() / (w * w).sum() * w for w, g in zip(ws, grads)]


def balancedness(ws: Sequence[Tensor]) -> list[Tensor]:
    """Δ_l = W_l W_lᵀ − W_{l+1}ᵀ W_{l+1} for l = 1..L−1 (each n_l × n_l)."""
    return [ws[l] @ ws[l].T - ws[l + 1].T @ ws[l + 1] for l in range(len(ws) - 1)]


def balancedness_rate(ws: Sequence[Tensor], velocities: Sequence[Tensor]) -> list[Tensor]:
    """dΔ_l/dt = Ẇ_l W_lᵀ + W_l Ẇ_lᵀ − Ẇ_{l+1}ᵀ W_{l+1} − W_{l+1}ᵀ Ẇ_{l+1} for given Ẇ."""
    out = []
    for l in range(len(ws) - 1):
        a, da, b, db = ws[l], velocities[l], ws[l + 1], velocities[l + 1]
        out.append(da @ a.T + a @ da.T - db.T @ b - b.T @ db)
    return out


@dataclass
class DeepLinearRun:
    """Trajectory of `deep_linear_flow`: weights at the end, E_α and per-layer singular values
    at the recorded steps (`steps[k]`, `objective[k]`, `singular_values[k][l]`)."""

    ws: list[Tensor]
    steps: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)
    singular_values: list[list[Tensor]] = field(default_factory=list)


def deep_linear_flow(
    ws: Sequence[Tensor],
    x_alpha: Tensor,
    steps: int,
    lr: float,
    normalize: bool = True,
    method: str = "euler",
    record_every: int = 1,
    per_filter: bool = False,
) -> DeepLinearRun:
    r"""Integrate the max player's gradient flow Ẇ_l = ∂E_α/∂W_l (Lemma 1) for fixed X_α.

    normalize=True (Eqn. 11): the flow constrained to ||W_l||_F = r_l (the initial norms),
        Ẇ_l = P_l ∂E/∂W_l, P_l the projection orthogonal to W_l; one step is the ascent step
        followed by the per-layer Frobenius renormalisation (a retraction, first-order exact).
    normalize=False: the plain flow; `method="rk4"` integrates it to O(h⁴) so that invariants
        of the continuous flow (balancedness) can be checked on the discrete trajectory.
    per_filter=True (with normalize): Corollary 3's constraint instead (`filter_normalize`:
        rows of W_1..W_{L−1} at norm 1/√n_l, W_L at Frobenius norm 1), the gradient projected
        per row; the weights are put on that constraint set first.
    """
    if per_filter and not normalize:
        raise ValueError("per_filter=True is a normalisation: it needs normalize=True")
    ws = filter_normalize(ws) if per_filter else [w.clone() for w in ws]
    radii = [float(torch.linalg.matrix_norm(w)) for w in ws]
    run = DeepLinearRun(ws=ws)

    def velocity(cur):
        g = deep_linear_gradients(cur, x_alpha)
        if per_filter:
            return [project_tangent_rows(w, gl) for w, gl in zip(cur[:-1], g[:-1])] + project_tangent(cur[-1:], g[-1:])
        return project_tangent(cur, g) if normalize else g

    def record(t):
        run.steps.append(t)
        run.objective.append(float(deep_linear_objective(ws, x_alpha)))
        run.singular_values.append([torch.linalg.svdvals(w) for w in ws])

    for t in range(steps):
        if t % record_every == 0:
            record(t)
        if method == "euler":
            ws = [w + lr * g for w, g in zip(ws, deep_linear_gradients(ws, x_alpha))]
        elif method == "rk4":
            k1 = velocity(ws)
            k2 = velocity([w + 0.5 * lr * k for w, k in zip(ws, k1)])
            k3 = velocity([w + 0.5 * lr * k for w, k in zip(ws, k2)])
            k4 = velocity([w + lr * k for w, k in zip(ws, k3)])
            ws = [w + lr / 6 * (a + 2 * b + 2 * c + d) for w, a, b, c, d in zip(ws, k1, k2, k3, k4)]
        else:
            raise ValueError(f"method must be 'euler' or 'rk4', got {method!r}")
        if per_filter:
            ws = filter_normalize(ws)
        elif normalize:
            ws = frobenius_normalize(ws, radii)
    run.ws = ws
    record(steps)
    return run


def rank_one_optimum(x_alpha: Tensor, dims: Sequence[int], generator: torch.Generator | None = None) -> list[Tensor]:
    r"""A maximiser of Theorem 3: W_l = u_l u_{l−1}ᵀ with u_0 the top eigenvector of X_α and
    u_1..u_L arbitrary unit vectors (`dims` = [n_0, n_1, …, n_L]). Then ||W_l||_F = 1 and
    E_α = ½ λ_max(X_α).

    The bound it attains (λ_max(X_α) > 0): tr(W X_α Wᵀ) ≤ λ_max ||W||_F² and
    ||W||_F ≤ Π_l ||W_l||_F = 1, with equality iff W's rows lie along u_0 and every W_l is
    rank 1 with matching singular vectors.
    """
    _, evecs = torch.linalg.eigh(x_alpha)
    us = [evecs[:, -1]]
    for n in dims[1:]:
        u = torch.randn(n, dtype=x_alpha.dtype, generator=generator)
        us.append(u / u.norm())
    return [torch.outer(us[l + 1], us[l]) for l in range(len(dims) - 1)]

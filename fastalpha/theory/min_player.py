r"""The min player of Corollary 1: α = argmin_{α∈A} E_α(θ) − R(α), solved exactly (eager, float64).

Per anchor i, with Σ_{j∈J_i} α_ij = S_i fixed, E_α's row is Σ_j α_ij d2_ij − S_i d2_i, so the
row problem is

    min_{α_i ≥ 0, Σ_j α_ij = S_i}   Σ_j α_ij d2_ij − Σ_j r(α_ij).

* Entropy, R_H = −τ Σ α log α (Theorem 2): α_ij = S_i e^{−d2_ij/τ} / Σ_k e^{−d2_ik/τ}; with
  S_i = τ^{-1} ξ_i φ'(ξ_i) this is Eqn. 4 for every φ whenever ψ(x) = c·e^{x/τ} (InfoNCE,
  MINE, (N+1)-tuplet, soft triplet).
* Inverse, r_γ(α) = τ/(1−γ)·α^{1−γ}, γ > 1 (Sec. 6, α-CL-r_γ), S_i = 1: stationarity gives
  d2_ij − τ α_ij^{−γ} = λ_i, i.e.

        α_ij = (τ / (d2_ij − λ_i))^{1/γ},   λ_i < min_j d2_ij,   with λ_i set by Σ_j α_ij = 1.

  `r_gamma_argmin` solves λ_i by bracketing and bisection to |Σ_j α_ij − 1| ≤ 1e-12.

The authors' code (facebookresearch/luckmatters, `inverse_assignment`) and fastalpha's rule
`inverse` use α_ij ∝ (d2_ij + τ)^{−1/γ} instead: λ_i fixed at −τ, then renormalised
(`r_gamma_code_form`). The two differ a lot at the paper's batch size: with |J_i| = 254
negatives the exact λ_i is about −τ·|J_i|^γ ≈ −3.2·10⁴ for τ 0.5, γ 2, so the exact α is
uniform to ~1e−5 (α-CL-r_γ would be L_quadratic), while the code's form spreads by ~1.2× across
a row. Table 1's α-CL-r_γ numbers (83.72 at 100 epochs on CIFAR-10, far above
L_quadratic's 63.59) are therefore the code's form, not this argmin.
"""
from __future__ import annotations

import torch

from .geometry import negative_mask, pair_sq_distances, partner_index

Tensor = torch.Tensor

__all__ = ["negative_distances", "r_gamma_argmin", "r_gamma_code_form", "entropy_argmin", "min_player_objective"]


def negative_distances(z: Tensor) -> tuple[Tensor, Tensor]:
    """(d2_neg, d2_pos) of stacked rows Z (M × D): d2_neg is (M, M − 2), row i = d2_ij over J_i in
    column order, and d2_pos (M,) = d2_i."""
    m = z.shape[0]
    d2 = pair_sq_distances(z)
    mask = negative_mask(m, device=z.device)
    return d2[mask].view(m, m - 2), d2.gather(1, partner_index(m, z.device)[:, None])[:, 0]


def r_gamma_argmin(d2: Tensor, tau: float = 0.5, gamma: float = 2.0, tol: float = 1e-12,
                   max_iter: int = 400) -> tuple[Tensor, Tensor]:
    r"""The exact α-CL-r_γ min player per row of `d2` (R × n: d2_ij over J_i): returns (α, λ).

    α_ij = (τ / (d2_ij − λ_i))^{1/γ}. With t_i = min_j d2_ij − λ_i > 0 the row sum is strictly
    decreasing in t_i; it is ≥ 1 at t_i = τ (the nearest negative alone has α = 1) and ≤ 1 at
    t_i = τ·n^γ + (max_j d2_ij − min_j d2_ij) (every α ≤ 1/n), so bisection in t_i (in float64)
    brackets the root; it stops once every |Σ_j α_ij − 1| ≤ tol.
    """
    if gamma <= 1:
        raise ValueError(f"r_γ needs γ > 1 (Sec. 6), got {gamma}")
    if tau <= 0:
        raise ValueError(f"τ must be > 0, got {tau}")
    d2 = d2.to(torch.float64)
    n = d2.shape[1]
    lo_d2 = d2.min(1, keepdim=True).values
    spread = d2.max(1, keepdim=True).values - lo_d2
    t_lo = torch.full_like(lo_d2, tau)
    t_hi = tau * float(n) ** gamma + spread + tau

    def weights(t):
        return (tau / (d2 - lo_d2 + t)) ** (1.0 / gamma)

    for _ in range(max_iter):
        t_mid = 0.5 * (t_lo + t_hi)
        total = weights(t_mid).sum(1, keepdim=True)
        t_lo = torch.where(total > 1, t_mid, t_lo)
        t_hi = torch.where(total > 1, t_hi, t_mid)
        alpha = weights(t_mid)
        if float((alpha.sum(1) - 1).abs().max()) <= tol:
            break
    else:
        raise RuntimeError(f"bisection did not reach |Σα − 1| <= {tol} in {max_iter} steps")
    return alpha, (lo_d2 - t_mid)[:, 0]


def r_gamma_code_form(d2: Tensor, tau: float = 0.5, gamma: float = 2.0) -> Tensor:
    """α ∝ (d2_ij + τ)^{−1/γ}, normalised per row: the authors' code and fastalpha's `inverse`."""
    w = (d2.to(torch.float64) + tau) ** (-1.0 / gamma)
    return w / w.sum(1, keepdim=True)


def entropy_argmin(d2: Tensor, tau: float, total: Tensor | float = 1.0) -> Tensor:
    """argmin of Σ_j α_ij d2_ij + τ Σ_j α_ij log α_ij with Σ_j α_ij = total_i (R_H of Theorem 2)."""
    total = torch.as_tensor(total, dtype=torch.float64)
    return torch.softmax(-d2.to(torch.float64) / tau, dim=1) * (total[:, None] if total.dim() else total)


def min_player_objective(alpha: Tensor, d2: Tensor, d2_pos: Tensor, regularizer: str, tau: float,
                         gamma: float = 2.0) -> Tensor:
    r"""Per row: E_α's row Σ_j α_ij d2_ij − A_i d2_i minus R(α)'s row, for R = "entropy"
    (R_H = −τ Σ α log α) or "r_gamma" (Σ τ/(1−γ) α^{1−γ})."""
    a = alpha.to(torch.float64)
    energy = (a * d2).sum(1) - a.sum(1) * d2_pos
    if regularizer == "entropy":
        reg = -tau * torch.special.xlogy(a, a).sum(1)
    elif regularizer == "r_gamma":
        reg = (tau / (1 - gamma) * a ** (1 - gamma)).sum(1)
    else:
        raise ValueError(f"regularizer must be 'entropy' or 'r_gamma', got {regularizer!r}")
    return energy - reg

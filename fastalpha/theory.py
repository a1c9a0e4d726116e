r"""The theory of "Understanding Deep Contrastive Learning via Coordinate-wise Optimization"
(Tian, NeurIPS 2022), made executable: the φ-ψ loss family and Theorem 1, the max player on
deep linear networks (Section 4) and on two-layer ReLU networks (Section 5).

Conventions (DESIGN.md §1). Two views z1, z2 (N × D) are stacked into Z = [z1; z2] with
M = 2N rows; the partner of row i is p(i) = (i + N) mod M and its negatives are
J_i = {j : j ≠ i, j ≠ p(i)}. Distances carry the paper's factor ½:

    d2_ij = ||z_i − z_j||² / 2,      d2_i = d2_{i, p(i)},      v_ij = d2_i − d2_ij.

Energy and contrastive covariance of a pair-weight matrix α (M × M, used on J_i only),
with A_i = Σ_{j∈J_i} α_ij:

    E_α(Z)   = Σ_i Σ_{j∈J_i} α_ij d2_ij − Σ_i A_i d2_i,
    C_α[a,b] = Σ_i Σ_{j∈J_i} α_ij (a_i − a_j)(b_i − b_j)ᵀ − Σ_i A_i (a_i − a_{p(i)})(b_i − b_{p(i)})ᵀ,
    E_α      = ½ tr C_α[z, z].

Everything here is dense, O(M²) memory and meant for small, exact (float64) experiments; the
fast losses live in fastalpha.functional. `energy`, `contrastive_covariance`, `partner_index`
and `negative_mask` are fastalpha.reference's, re-exported here.

Contents
--------
* General family (paper Eqn. 1):  L_{φ,ψ} = Σ_i φ(ξ_i),  ξ_i = Σ_{j∈J_i} ψ(v_ij), with its
  pair importance (Eqn. 4, Theorem 1)  α_ij = φ'(ξ_i) ψ'(v_ij):  `phi_psi_loss`,
  `alpha_phi_psi`, and presets for the members the paper lists (`PHI_PSI_PRESETS`).
* Energy helpers: `energy`, `contrastive_covariance`.
* Deep linear networks z = W_L ⋯ W_1 x (Section 4): `deep_linear_gradients` (Lemma 1),
  `deep_linear_flow` (Eqn. 11, per-layer Frobenius normalisation), `balancedness`.
* Two-layer ReLU networks z = W_2 σ(W_1 x) on the orthogonal mixture (Section 5):
  `orthogonal_mixture`, `relu2_gradients`, `relu2_flow`, `row_concentration`.

Where the paper's exact wording could not be consulted, the statements checked are derived
here from first principles and written out in full in each docstring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# The energy, C_α and the pair geometry are the library's own (one definition, tested there).
from .reference import contrastive_covariance, energy, negative_mask, partner_index

Tensor = torch.Tensor
ScalarFn = Callable[[Tensor], Tensor]

# ----------------------------------------------------------------------------------------
# Pair geometry
# ----------------------------------------------------------------------------------------


def stack_views(z1: Tensor, z2: Tensor, normalize: bool = False) -> Tensor:
    """Z = [z1; z2], rows L2-normalised when `normalize` (autograd flows through it)."""
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D) with the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"need N >= 2 rows per view (so that J_i is not empty), got N = {z1.shape[0]}")
    z = torch.cat([z1, z2], 0)
    return torch.nn.functional.normalize(z, dim=1) if normalize else z


def pair_sq_distances(z: Tensor) -> Tensor:
    """d2_ij = ||z_i − z_j||² / 2 for all pairs of rows, from explicit differences.

    The difference form (not the Gram form) is used because the tests compare gradients to
    1e-10 and nothing here takes a power or log of d2, so no clamp is needed.
    """
    diff = z[:, None, :] - z[None, :, :]
    return 0.5 * (diff * diff).sum(-1)


def pair_margins(z: Tensor) -> tuple[Tensor, Tensor]:
    """(v, mask) for stacked rows Z: v_ij = d2_i − d2_ij for all pairs (meaningful on J_i only)
    and the boolean J_i mask. v_ij > 0 means negative j is closer to i than i's partner."""
    m = z.shape[0]
    d2 = pair_sq_distances(z)
    d2_pos = d2.gather(1, partner_index(m, z.device)[:, None])
    return d2_pos - d2, negative_mask(m, device=z.device)


# ----------------------------------------------------------------------------------------
# The general family L_{φ,ψ} (Eqn. 1) and its pair importance (Eqn. 4)
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhiPsi:
    """A member of the family L = Σ_i φ(Σ_{j∈J_i} ψ(d2_i − d2_ij)).

    `phi` and `psi` are elementwise torch callables, monotone non-decreasing and
    differentiable where they are evaluated (Theorem 1's hypothesis; α ≥ 0 follows).
    `formula` is a one-line statement of the member, `kinks` the points where φ or ψ is not
    differentiable (empty for smooth members): Theorem 1 holds wherever no ξ_i / v_ij sits
    on a kink, with the one-sided derivative autograd picks (torch's relu'(0) = 0).
    """

    name: str
    phi: ScalarFn
    psi: ScalarFn
    formula: str
    kinks: str = ""


def elementwise_derivative(f: ScalarFn, x: Tensor) -> Tensor:
    """f'(x) of an elementwise callable, by autograd on a detached copy of x."""
    with torch.enable_grad():
        xx = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xx).sum(), xx)
    return g


def phi_psi_xi(z1: Tensor, z2: Tensor, psi: ScalarFn, normalize: bool = False) -> Tensor:
    """ξ_i = Σ_{j∈J_i} ψ(d2_i − d2_ij), shape (M,)."""
    v, mask = pair_margins(stack_views(z1, z2, normalize))
    return torch.where(mask, psi(v), torch.zeros_like(v)).sum(1)


def phi_psi_loss(
    z1: Tensor,
    z2: Tensor,
    phi: ScalarFn | PhiPsi,
    psi: ScalarFn | None = None,
    normalize: bool = False,
    reduction: str = "sum",
) -> Tensor:
    r"""The paper's general contrastive loss (Eqn. 1), eager and differentiable:

        L_{φ,ψ} = Σ_{i=1}^{M} φ( Σ_{j∈J_i} ψ(d2_i − d2_ij) ).

    Pass either two callables (φ, ψ) or a `PhiPsi` preset as `phi`. Every one of the M
    rows of Z is an anchor (DESIGN.md §1); `reduction` is "sum" (the paper's L, whose
    gradient Theorem 1 describes), "mean" (L / M) or "none" (the M terms φ(ξ_i)).
    Nothing is stabilised beyond what φ and ψ do: exponentials of large margins overflow.
    """
    phi, psi = _unpack(phi, psi)
    terms = phi(phi_psi_xi(z1, z2, psi, normalize))
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.mean()
    if reduction == "none":
        return terms
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def alpha_phi_psi(
    z1: Tensor, z2: Tensor, phi: ScalarFn | PhiPsi, psi: ScalarFn | None = None, normalize: bool = False
) -> Tensor:
    r"""Pair importance of L_{φ,ψ} (Eqn. 4): α_ij = φ'(ξ_i) ψ'(d2_i − d2_ij) on J_i, 0 elsewhere.

    Returned detached: it is sg(α(θ)). Theorem 1: ∂L_{φ,ψ}/∂θ = −∂E_α/∂θ at α = sg(α(θ)),
    because ∂L/∂θ = Σ_i φ'(ξ_i) Σ_j ψ'(v_ij) (∂d2_i − ∂d2_ij)/∂θ
                 = −∂/∂θ [Σ_ij α_ij d2_ij − Σ_i A_i d2_i]  with α held fixed.
    """
    phi, psi = _unpack(phi, psi)
    with torch.no_grad():
        v, mask = pair_margins(stack_views(z1, z2, normalize))
        xi = torch.where(mask, psi(v), torch.zeros_like(v)).sum(1)
    dphi = elementwise_derivative(phi, xi)
    dpsi = elementwise_derivative(psi, v)
    return torch.where(mask, dphi[:, None] * dpsi, torch.zeros_like(v))


def _unpack(phi, psi) -> tuple[ScalarFn, ScalarFn]:
    if isinstance(phi, PhiPsi):
        if psi is not None:
            raise TypeError("pass either a PhiPsi preset or two callables (phi, psi), not both")
        return phi.phi, phi.psi
    if not callable(phi) or not callable(psi):
        raise TypeError("phi and psi must be callables (or phi a PhiPsi preset)")
    return phi, psi


def infonce(tau: float = 0.5, eps: float = 1.0) -> PhiPsi:
    r"""InfoNCE: φ(x) = τ log(ε + x), ψ(x) = e^{x/τ}.

    L = Σ_i τ log(ε + Σ_{j∈J_i} e^{(d2_i − d2_ij)/τ})
      = −τ Σ_i log[ e^{−d2_i/τ} / (ε e^{−d2_i/τ} + Σ_{j∈J_i} e^{−d2_ij/τ}) ].
    On unit rows (−d2 = cos − 1) with ε = 1 this is τ·M times SimCLR's NT-Xent at temperature
    τ; ε = 0 is the decoupled form. α_ij = e^{v_ij/τ} / (ε + ξ_i) (DESIGN.md rule `infonce`).
    """
    return PhiPsi(
        f"infonce(tau={tau}, eps={eps})",
        lambda x: tau * torch.log(eps + x),
        lambda x: torch.exp(x / tau),
        "φ(x) = τ log(ε + x), ψ(x) = exp(x/τ)",
    )


def mine() -> PhiPsi:
    r"""MINE (Belghazi et al. 2018), the Donsker–Varadhan bound with critic T = −d2:
    φ(x) = log x, ψ(x) = e^x, i.e. L = Σ_i [d2_i + log Σ_{j∈J_i} e^{−d2_ij}]
    (InfoNCE with τ = 1, ε = 0; the 1/|J_i| inside the log is a constant and is dropped).
    """
    return PhiPsi("mine", torch.log, torch.exp, "φ(x) = log x, ψ(x) = exp(x)")


def triplet(margin: float = 0.5) -> PhiPsi:
    r"""Triplet loss (Schroff et al. 2015) over all negatives, on the paper's squared distances:
    φ(x) = x, ψ(x) = [x + ε]_+ with ε = `margin`, i.e. L = Σ_i Σ_{j∈J_i} [d2_i − d2_ij + ε]_+.

    ψ has a kink at x = −ε; there α_ij = 1[v_ij > −ε] uses relu'(0) = 0. Theorem 1 is exact
    wherever no margin v_ij equals −ε (tests check that no v_ij is within 1e-6 of it).
    """
    return PhiPsi(
        f"triplet(margin={margin})",
        lambda x: x,
        lambda x: torch.relu(x + margin),
        "φ(x) = x, ψ(x) = [x + ε]_+",
        kinks="ψ at x = −ε",
    )


def soft_triplet(tau: float = 0.5, eps: float = 0.5) -> PhiPsi:
    r"""Soft triplet: φ(x) = τ log(1 + x), ψ(x) = e^{x/τ + ε}, i.e.
    L = Σ_i τ log(1 + Σ_{j∈J_i} e^{(d2_i − d2_ij)/τ + ε}); with one negative this is
    τ·softplus(v/τ + ε) → [v + ετ]_+ as τ → 0, the smooth relaxation of the triplet hinge.
    """
    return PhiPsi(
        f"soft_triplet(tau={tau}, eps={eps})",
        lambda x: tau * torch.log1p(x),
        lambda x: torch.exp(x / tau + eps),
        "φ(x) = τ log(1 + x), ψ(x) = exp(x/τ + ε)",
    )


def n_plus_one_tuplet() -> PhiPsi:
    r"""(N+1)-tuplet loss (Sohn 2016) with similarity −d2: φ(x) = log(1 + x), ψ(x) = e^x, i.e.
    L = Σ_i log(1 + Σ_{j∈J_i} e^{d2_i − d2_ij}).
    """
    return PhiPsi("n_plus_one_tuplet", torch.log1p, torch.exp, "φ(x) = log(1 + x), ψ(x) = exp(x)")


def lifted_structured(eps: float = 0.5) -> PhiPsi:
    r"""Lifted structured loss (Oh Song et al. 2016) per anchor, on the paper's squared distances:
    φ(x) = [log x]_+², ψ(x) = e^{x + ε}, i.e. L = Σ_i [d2_i + log Σ_{j∈J_i} e^{ε − d2_ij}]_+².

    φ is C¹ (its derivative 2[log x]_+/x is continuous at x = 1) but not C² there; α_ij = 0 for
    anchors already satisfied (ξ_i ≤ 1). Theorem 1 holds everywhere since only φ' is used.
    """
    return PhiPsi(
        f"lifted_structured(eps={eps})",
        lambda x: torch.clamp_min(torch.log(x), 0.0) ** 2,
        lambda x: torch.exp(x + eps),
        "φ(x) = [log x]_+^2, ψ(x) = exp(x + ε)",
        kinks="φ'' at x = 1 (φ itself is C¹)",
    )


def modified_triplet(c: float = 2.0) -> PhiPsi:
    r"""Modified triplet (Coria et al. 2020, their Eqn. 10): φ(x) = x, ψ(x) = sigmoid(c x), i.e.
    L = Σ_i Σ_{j∈J_i} sigmoid(c (d2_i − d2_ij)), a bounded smooth count of violated triplets.
    """
    return PhiPsi(
        f"modified_triplet(c={c})",
        lambda x: x,
        lambda x: torch.sigmoid(c * x),
        "φ(x) = x, ψ(x) = sigmoid(c x)",
    )


def quadratic(scale: float = 1.0) -> PhiPsi:
    r"""Quadratic / linear member: φ(x) = x, ψ(x) = s·x, i.e. L = s Σ_i Σ_{j∈J_i} (d2_i − d2_ij),
    with constant α_ij = s. With s = 1/(M − 2) it is DESIGN.md's rule `quadratic` summed over
    anchors (E_α is then quadratic in z, hence the name), and L = −E_α exactly, not only in
    gradient.
    """
    return PhiPsi(f"quadratic(scale={scale})", lambda x: x, lambda x: scale * x, "φ(x) = x, ψ(x) = s x")


#: The members of Eqn. 1 the paper lists, as zero-argument factories with default parameters.
PHI_PSI_PRESETS: dict[str, Callable[[], PhiPsi]] = {
    "infonce": infonce,
    "mine": mine,
    "triplet": triplet,
    "soft_triplet": soft_triplet,
    "n_plus_one_tuplet": n_plus_one_tuplet,
    "lifted_structured": lifted_structured,
    "modified_triplet": modified_triplet,
    "quadratic": quadratic,
}


# ----------------------------------------------------------------------------------------
# Deep linear networks (Section 4)
# ----------------------------------------------------------------------------------------


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
) -> DeepLinearRun:
    r"""Integrate the max player's gradient flow Ẇ_l = ∂E_α/∂W_l (Lemma 1) for fixed X_α.

    normalize=True (Eqn. 11): the flow constrained to ||W_l||_F = r_l (the initial norms),
        Ẇ_l = P_l ∂E/∂W_l, P_l the projection orthogonal to W_l; one step is the ascent step
        followed by the per-layer Frobenius renormalisation (a retraction, first-order exact).
    normalize=False: the plain flow; `method="rk4"` integrates it to O(h⁴) so that invariants
        of the continuous flow (balancedness) can be checked on the discrete trajectory.
    """
    ws = [w.clone() for w in ws]
    radii = [float(torch.linalg.matrix_norm(w)) for w in ws]
    run = DeepLinearRun(ws=ws)

    def velocity(cur):
        g = deep_linear_gradients(cur, x_alpha)
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
        if normalize:
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


# ----------------------------------------------------------------------------------------
# Two-layer ReLU networks on the orthogonal mixture (Section 5)
# ----------------------------------------------------------------------------------------
#
# Setting: z = W_2 σ(W_1 x) (K hidden nodes, rows w_k of W_1), inputs x = a e_m with a > 0
# (the orthogonal mixture below), α ≥ 0 fixed, X_α = C_α[x], U = [W_1]_+, B = W_2ᵀ W_2.
# Then E_α = ½ tr(B U X_α Uᵀ) exactly, and the statements checked in tests/test_theory_relu.py
# (reconstructed from first principles; each is proved in a line or two here) are:
#
#   Lemma (orthogonal mixture). X_α[m, m'] ≤ 0 for m ≠ m': a pair (i, j) contributes
#     −α_ij a_i a_j when i, j are in components m, m', and the positive-pair term vanishes
#     off the diagonal because both views of a sample share its component.
#   Theorem 4 (sticky weights). ∂E_α/∂W_1[k, m] = 0 whenever W_1[k, m] ≤ 0 (node k's gate
#     is closed on all of component m). Under the normalised flow such an entry is only
#     rescaled by the positive normaliser: once ≤ 0, always ≤ 0 (and it decays to 0).
#   Theorem 5 (one node, K = 1). Then E_α = ½ ||W_2||² uᵀ X_α u, and with X_α's off-diagonal
#     ≤ 0 the maximum over unit u ≥ 0 is ½ ||W_2||² max_m X_mm at u = e_m; the projected flow
#     from any start with a positive entry converges to W_1 ∝ e_{m*} (plus sticky entries
#     decaying to 0) for an m* that was positive at the start — a local maximum, so m* may
#     depend on the initialisation; E_α → ½ ||W_2||² X_{m*m*}.
#   Theorem 6 (K > 1 nodes, B fixed). (a) B entrywise ≥ 0 (nodes cooperate): the global
#     maximum over ||W_1||_F = 1 is W_1 = v e_{m*}ᵀ (v the Perron vector of B, m* = argmax
#     X_mm), because every cross-component term X_mm' c_mᵀ B c_m' (c_m = U e_m ≥ 0) is ≤ 0;
#     every v e_mᵀ with Bv ∝ v is a fixed point, and the seeded runs end at such a rank-1
#     W_1. (b) B diagonal (W_2 with orthogonal columns: nodes decoupled) and per-node
#     normalisation: row k evolves exactly as Theorem 5 alone, so node k converges to its own
#     e_{m_k}, and rank(W_1) = #{distinct m_k}, > 1 in general.
#     With W_2 trained jointly (both layers Frobenius-normalised) the runs collapse to
#     W_1 = v e_mᵀ with W_2ᵀW_2 ∝ v vᵀ: reported as a measured outcome, not a theorem.


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


__all__ = [
    "PhiPsi",
    "PHI_PSI_PRESETS",
    "phi_psi_loss",
    "phi_psi_xi",
    "alpha_phi_psi",
    "elementwise_derivative",
    "infonce",
    "mine",
    "triplet",
    "soft_triplet",
    "n_plus_one_tuplet",
    "lifted_structured",
    "modified_triplet",
    "quadratic",
    "partner_index",
    "negative_mask",
    "stack_views",
    "pair_sq_distances",
    "pair_margins",
    "energy",
    "contrastive_covariance",
    "chain",
    "deep_linear_objective",
    "deep_linear_gradients",
    "frobenius_normalize",
    "project_tangent",
    "balancedness",
    "balancedness_rate",
    "DeepLinearRun",
    "deep_linear_flow",
    "rank_one_optimum",
    "orthogonal_mixture",
    "relu2_forward",
    "relu2_objective",
    "relu2_gradients",
    "ReluRun",
    "relu2_flow",
    "row_concentration",
    "max_nonneg_quadratic",
]


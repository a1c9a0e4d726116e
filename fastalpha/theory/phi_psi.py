r"""The φ-ψ family of contrastive losses (Eqn. 1) and its pair importance (Eqn. 4, Theorem 1).

    L_{φ,ψ} = Σ_i φ(ξ_i),   ξ_i = Σ_{j∈J_i} ψ(v_ij),   v_ij = d2_i − d2_ij,
    α_ij    = φ'(ξ_i) ψ'(v_ij)                                   (Eqn. 4)

Theorem 1: ∂L_{φ,ψ}/∂θ = −∂E_α/∂θ at α = sg(α(θ)). The members the paper lists with Eqn. 1
(InfoNCE, MINE, triplet, soft triplet, (N+1)-tuplet, lifted structured, modified triplet,
quadratic) are presets here (`PHI_PSI_PRESETS`). The paper's φ/ψ table (Sec. 3.1) is an image,
so each preset's docstring writes its member out in full; margins and the soft triplet's ε
have no value in the paper's text and are this project's defaults.

Scale of InfoNCE: the paper's L_nce (Eqn. 2) is τ·Σ_i log(ε + Σ_j e^{v_ij/τ}), a sum over
anchors; `fastalpha.alpha_cl_loss(rule="infonce")` returns the mean over the M anchors of
log(ε + Σ_j e^{v_ij/τ}), i.e. L_nce / (τ·M). ε: Eqn. 2's text says ε = 0 is "the SimCLR
setting"; today's SimCLR code (NT-Xent) keeps the positive in the denominator, which is ε = 1
(fastalpha's default for `nce`). Both are the same family; only the constant differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .geometry import pair_margins, stack_views

Tensor = torch.Tensor
ScalarFn = Callable[[Tensor], Tensor]

__all__ = ["PhiPsi", "PHI_PSI_PRESETS", "phi_psi_loss", "phi_psi_xi", "alpha_phi_psi", "elementwise_derivative",
           "infonce", "mine", "triplet", "soft_triplet", "n_plus_one_tuplet", "lifted_structured",
           "modified_triplet", "quadratic"]


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
    rows of Z is an anchor (fastalpha.theory.geometry); `reduction` is "sum" (the paper's L, whose
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
    τ; ε = 0 is the decoupled form. α_ij = e^{v_ij/τ} / (ε + ξ_i) (fastalpha's rule `infonce`).
    The paper (text after Theorem 2) calls ε = 0 "the SimCLR setting"; today's SimCLR code
    (NT-Xent) keeps the positive in the denominator, which is ε = 1.
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
    with constant α_ij = s. With s = 1/(M − 2) it is fastalpha's rule `quadratic` summed over
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

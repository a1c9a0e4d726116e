r"""The registry of pair-importance rules α (the paper's "min player") and their parameters.

For an anchor row i with negatives J_i (by default every row but i and its partner p(i)) and squared
distances d2_ij = ||z_i − z_j||² / 2, each rule picks weights α_ij ≥ 0 over J_i:

=========== ====================================================== ===================
rule        α_ij                                                    Table 1 row
=========== ====================================================== ===================
quadratic   1 / |J_i|                                               L_quadratic
entropy     softmax_j(−d2_ij / τ)                                   α-CL-r_H
direct      w_ij / (Σ_k w_ik + ε |J_i|),  w = exp(−d2^{p/2} / τ)    α-CL-direct
inverse     (d2_ij + τ)^{−1/γ} / Σ_k (d2_ik + τ)^{−1/γ}             α-CL-r_γ (*)
square      [(μ_i − d2_ij) / τ]_+ with Σ_j α_ij = 1 (sparsemax)      α-CL-r_s
infonce     e^{(d2_i − d2_ij)/τ} / (ε + ξ_i)                        L_nce
=========== ====================================================== ===================

(*) `inverse` is r_γ in the form of the authors' code (facebookresearch/luckmatters), with the
normaliser's multiplier fixed; the exact argmin of the paper's Sec. 6 is
`fastalpha.theory.r_gamma_argmin`.

`entropy`, `direct` and `inverse` are "log-weight" rules: α_ij = w(d2_ij) / (Σ_k w(d2_ik) + c)
with t = log w a function of d2 alone. For them the gradient through α only needs t and
t' = dt/d(d2) (docs/design.md, the β term), which is why `log_weight` and `log_weight_slope`
live here, next to the parameters: every backend reads the same definitions.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

import torch

RULES = ("quadratic", "entropy", "direct", "inverse", "square", "infonce")
REDUCTIONS = ("mean", "sum", "none")

#: Defaults per rule (docs/design.md, the table of rules). A parameter a rule does not use is ignored.
RULE_DEFAULTS = {
    "quadratic": dict(temperature=0.5, p=4.0, gamma=2.0, eps=0.0),
    "entropy": dict(temperature=0.5, p=2.0, gamma=2.0, eps=0.0),
    "direct": dict(temperature=0.5, p=4.0, gamma=2.0, eps=0.0),
    "inverse": dict(temperature=0.5, p=4.0, gamma=2.0, eps=0.0),
    "square": dict(temperature=5.0, p=4.0, gamma=2.0, eps=0.0),
    "infonce": dict(temperature=0.5, p=4.0, gamma=2.0, eps=1.0),
}

#: Rules with an ε in the normaliser; the others ignore `eps`.
EPS_RULES = ("entropy", "direct", "infonce")

#: Rules whose α is w(d2)/Σw and so admit the β formula for `detach_alpha=False`.
LOG_WEIGHT_RULES = ("entropy", "direct", "inverse")

#: The seven losses of the paper's Table 1, as keyword presets for `alpha_cl_loss`.
PAPER_LOSSES = {
    "quadratic": dict(rule="quadratic"),
    "nce": dict(rule="infonce", temperature=0.5, eps=1.0),
    "backprop": dict(rule="entropy", temperature=0.5, detach_alpha=False),
    "entropy": dict(rule="entropy", temperature=0.5),
    "inverse": dict(rule="inverse", temperature=0.5, gamma=2.0),
    "square": dict(rule="square", temperature=5.0),
    "direct": dict(rule="direct", temperature=0.5, p=4.0, eps=0.0),
}


#: Ways to choose each anchor's negatives J_i (the spec's `negatives` field).
NEGATIVES = ("all", "cross", "none")


@dataclass(frozen=True)
class LossSpec:
    """Everything a backend needs to know about the loss, built and validated once.

    The public API builds it with `make_spec` (which validates and resolves defaults); every
    backend, the custom op and the distributed layer consume it and never re-parse the
    user's arguments. Constructing one directly only checks the rule name, so that a raw call
    of the custom op with a typo fails loudly instead of computing some other rule.

    Fields:
        rule, temperature, p, gamma, eps: the rule and its resolved parameters (entropy has
            p = 2; eps is 0 for the rules without an ε).
        detach_alpha: α is a stop-gradient (the paper's α-CL) or is differentiated too.
        unit_rows: the rows of Z are unit vectors (`normalize=True`), so d2_ij = 1 − z_i·z_j;
            otherwise d2_ij = (n_i + n_j)/2 − z_i·z_j with n_i = ||z_i||².
        negatives: which rows of Z are negatives of anchor i: "all" (every row but i and p(i),
            SimCLR), "cross" (the other view's rows but p(i), CLIP's two towers) or "none" (only
            a queue's rows, MoCo). Queue rows, when a queue is given, are negatives in every mode.
    """

    rule: str
    temperature: float
    p: float
    gamma: float
    eps: float
    detach_alpha: bool = True
    unit_rows: bool = False
    negatives: str = "all"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule={self.rule!r}; expected one of {RULES}")
        if self.negatives not in NEGATIVES:
            raise ValueError(f"unknown negatives={self.negatives!r}; expected one of {NEGATIVES}")

    @property
    def is_log_weight(self) -> bool:
        """α = w(d2)/Σ w with t = log w a function of d2 alone (entropy, direct, inverse)."""
        return self.rule in LOG_WEIGHT_RULES

    @property
    def uses_beta(self) -> bool:
        """The pair term of the gradient uses β ≠ α: α is differentiated and depends on d2.

        For `quadratic` α is constant, and for `infonce` Theorem 1 makes the α-form exact
        whatever `detach_alpha` says, so neither needs β.
        """
        return not self.detach_alpha and (self.is_log_weight or self.rule == "square")

    @property
    def grad_scale(self) -> float:
        """Factor on the α-form gradient: 1/τ for `infonce` (Theorem 1), 1 otherwise."""
        return 1.0 / self.temperature if self.rule == "infonce" else 1.0

    @property
    def exponent(self) -> float:
        """Power of d2 inside the `direct`/`entropy` weight: w = exp(−d2^{p/2}/τ)."""
        return self.p / 2.0

    def log_weight(self, d2: torch.Tensor) -> torch.Tensor:
        """t(d2) = log w(d2) for the log-weight rules (d2 already clamped at 0)."""
        if self.rule == "inverse":
            return -torch.log(d2 + self.temperature) / self.gamma
        if self.rule in ("entropy", "direct"):
            return -d2.pow(self.exponent) / self.temperature
        raise ValueError(f"rule={self.rule!r} has no log-weight form")

    def log_weight_slope(self, d2: torch.Tensor) -> torch.Tensor:
        """t'(d2) = d log w / d d2, used by the β term of `detach_alpha=False`."""
        if self.rule == "inverse":
            return -1.0 / (self.gamma * (d2 + self.temperature))
        if self.rule in ("entropy", "direct"):
            k = self.exponent
            if k == 1.0:
                return -torch.ones_like(d2) / self.temperature
            return -k * d2.pow(k - 1.0) / self.temperature
        raise ValueError(f"rule={self.rule!r} has no log-weight form")

    def with_(self, **changes) -> "LossSpec":
        """A copy with some fields changed (e.g. detach_alpha for a test)."""
        return replace(self, **changes)


def negative_count(n: int, queue_rows: int, negatives: str) -> int:
    """|J_i| for N pairs and K queue rows: the same for every anchor (docs/design.md)."""
    return {"all": 2 * n - 2, "cross": n - 1, "none": 0}[negatives] + queue_rows


def _real_scalar(name: str, value) -> float:
    """Any real scalar as a float: int/float, numpy scalar, 0-dim tensor without grad."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise TypeError(f"{name} must be a real scalar or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be real, got a {value.dtype} tensor")
        value = value.item()
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _positive_finite(name: str, value) -> float:
    value = _real_scalar(name, value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def make_spec(rule: str = "direct", temperature=None, p=None, gamma=None, eps=None, normalize: bool = True,
              detach_alpha: bool = True, negatives: str = "all") -> LossSpec:
    """Validate the user's loss arguments once; None takes the rule's default (RULE_DEFAULTS).

    A tensor temperature (possibly learnable) is validated and stored by value; the caller
    keeps the tensor for the gradient.
    """
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a string, one of {RULES}, got {type(rule).__name__}")
    if rule not in RULES:
        raise ValueError(f"unknown rule={rule!r}; expected one of {RULES}")
    if not isinstance(negatives, str) or negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives={negatives!r}; expected one of {NEGATIVES}")
    defaults = RULE_DEFAULTS[rule]
    temperature = _positive_finite("temperature", defaults["temperature"] if temperature is None else temperature)
    p = _positive_finite("p", defaults["p"] if p is None else p)
    gamma = _positive_finite("gamma", defaults["gamma"] if gamma is None else gamma)
    eps = _real_scalar("eps", defaults["eps"] if eps is None else eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    # Canonical form, so every backend can apply p and eps unconditionally: `entropy` is
    # `direct` with p = 2, and only entropy/direct/infonce have an ε in their normaliser.
    if rule == "entropy":
        p = 2.0
    if rule not in EPS_RULES:
        eps = 0.0
    return LossSpec(rule=rule, temperature=temperature, p=p, gamma=gamma, eps=eps,
                    detach_alpha=_check_flag("detach_alpha", detach_alpha), unit_rows=_check_flag("normalize", normalize),
                    negatives=negatives)


def check_reduction(reduction: str) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}; expected one of {REDUCTIONS}")
    return reduction

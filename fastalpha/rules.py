r"""The registry of pair-importance rules α (the paper's "min player") and their parameters.

For an anchor row i with negatives J_i (every row but i and its partner p(i)) and squared
distances d2_ij = ||z_i − z_j||² / 2, each rule picks weights α_ij ≥ 0 over J_i:

=========== ====================================================== ===================
rule        α_ij                                                    Table 1 row
=========== ====================================================== ===================
quadratic   1 / (M − 2)                                             L_quadratic
entropy     softmax_j(−d2_ij / τ)                                   α-CL-r_H
direct      w_ij / (Σ_k w_ik + ε (M − 2)),  w = exp(−d2^{p/2} / τ)  α-CL-direct
inverse     (d2_ij + τ)^{−1/γ} / Σ_k (d2_ik + τ)^{−1/γ}             α-CL-r_γ
square      [(μ_i − d2_ij) / τ]_+ with Σ_j α_ij = 1 (sparsemax)      α-CL-r_s
infonce     e^{(d2_i − d2_ij)/τ} / (ε + ξ_i)                        L_nce
=========== ====================================================== ===================

`entropy`, `direct` and `inverse` are "log-weight" rules: α_ij = w(d2_ij) / (Σ_k w(d2_ik) + c)
with t = log w a function of d2 alone. For them the gradient through α only needs t and
t' = dt/d(d2) (DESIGN.md §1, the β term), which is why `log_weight` and `log_weight_slope`
live here, next to the parameters: every backend reads the same definitions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RULES = ("quadratic", "entropy", "direct", "inverse", "square", "infonce")
REDUCTIONS = ("mean", "sum", "none")

#: Defaults per rule (DESIGN.md §1 table). A parameter a rule does not use is ignored.
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


@dataclass(frozen=True)
class RuleParams:
    """A validated rule with every parameter resolved (no None left)."""

    rule: str
    temperature: float
    p: float
    gamma: float
    eps: float

    @property
    def is_log_weight(self) -> bool:
        return self.rule in LOG_WEIGHT_RULES

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
                return torch.full_like(d2, -1.0 / self.temperature)
            return -k * d2.pow(k - 1.0) / self.temperature
        raise ValueError(f"rule={self.rule!r} has no log-weight form")


def _check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def resolve_rule(rule: str, temperature=None, p=None, gamma=None, eps=None) -> RuleParams:
    """Validate a rule name and its parameters; None takes the rule's default (RULE_DEFAULTS)."""
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a string, one of {RULES}, got {type(rule).__name__}")
    if rule not in RULES:
        raise ValueError(f"unknown rule={rule!r}; expected one of {RULES}")
    defaults = RULE_DEFAULTS[rule]
    temperature = _check_positive_finite("temperature", defaults["temperature"] if temperature is None else temperature)
    p = _check_positive_finite("p", defaults["p"] if p is None else p)
    gamma = _check_positive_finite("gamma", defaults["gamma"] if gamma is None else gamma)
    eps = defaults["eps"] if eps is None else eps
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number, got {type(eps).__name__}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    # Canonical form, so every backend can apply p and eps unconditionally: `entropy` is
    # `direct` with p = 2, and only entropy/direct/infonce have an ε in their normaliser.
    if rule == "entropy":
        p = 2.0
    if rule not in EPS_RULES:
        eps = 0.0
    return RuleParams(rule=rule, temperature=temperature, p=p, gamma=gamma, eps=eps)


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction={reduction!r}; expected one of {REDUCTIONS}")
    return reduction

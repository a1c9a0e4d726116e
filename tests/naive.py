"""A second, deliberately naive implementation of DESIGN.md §1 for tiny inputs.

Plain Python loops over pairs, distances as ||z_i − z_j||²/2 (not the Gram form), the
sparsemax threshold by bisection (not by sorting), no row-max tricks. It shares no code with
fastalpha.reference, so agreement between the two checks both against the written maths.
"""
import math

import numpy as np


def stacked(z1, z2, normalize):
    z = np.concatenate([np.asarray(z1, dtype=np.float64), np.asarray(z2, dtype=np.float64)], 0)
    if normalize:
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
    return z


def distances(z):
    m = len(z)
    return np.array([[0.5 * float(np.sum((z[i] - z[j]) ** 2)) for j in range(m)] for i in range(m)])


def negatives(i, m):
    return [j for j in range(m) if j != i and j != (i + m // 2) % m]


def sparsemax_mu(values, tau):
    """μ with Σ max(0, (μ − v)/τ) = 1, by bisection on [min v, min v + τ]."""
    lo, hi = min(values), min(values) + tau
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(max(0.0, (mid - v) / tau) for v in values) > 1:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def alpha_row(d2_row, d2_pos, neg, m, rule, tau, p, gamma, eps):
    """α_ij for j in neg, as a dict, straight from the table of DESIGN.md §1."""
    d = {j: d2_row[j] for j in neg}
    if rule == "quadratic":
        return {j: 1.0 / (m - 2) for j in neg}
    if rule == "entropy":
        w = {j: math.exp(-d[j] / tau) for j in neg}
        return {j: w[j] / sum(w.values()) for j in neg}
    if rule == "direct":
        w = {j: math.exp(-(d[j] ** (p / 2)) / tau) for j in neg}
        return {j: w[j] / (sum(w.values()) + eps * (m - 2)) for j in neg}
    if rule == "inverse":
        w = {j: (d[j] + tau) ** (-1.0 / gamma) for j in neg}
        return {j: w[j] / sum(w.values()) for j in neg}
    if rule == "square":
        mu = sparsemax_mu(list(d.values()), tau)
        return {j: max(0.0, (mu - d[j]) / tau) for j in neg}
    if rule == "infonce":
        e = {j: math.exp((d2_pos - d[j]) / tau) for j in neg}
        xi = sum(e.values())
        return {j: e[j] / (eps + xi) for j in neg}
    raise ValueError(rule)


def loss_rows(z1, z2, rule, tau, p=4.0, gamma=2.0, eps=0.0, normalize=True):
    z = stacked(z1, z2, normalize)
    m = len(z)
    d2 = distances(z)
    out = []
    for i in range(m):
        neg = negatives(i, m)
        d2_pos = d2[i, (i + m // 2) % m]
        if rule == "infonce":
            out.append(math.log(eps + sum(math.exp((d2_pos - d2[i, j]) / tau) for j in neg)))
        else:
            a = alpha_row(d2[i], d2_pos, neg, m, rule, tau, p, gamma, eps)
            out.append(sum(a[j] * (d2_pos - d2[i, j]) for j in neg))
    return np.array(out)


def alpha_matrix(z1, z2, rule, tau, p=4.0, gamma=2.0, eps=0.0, normalize=True):
    z = stacked(z1, z2, normalize)
    m = len(z)
    d2 = distances(z)
    alpha = np.zeros((m, m))
    for i in range(m):
        neg = negatives(i, m)
        for j, a in alpha_row(d2[i], d2[i, (i + m // 2) % m], neg, m, rule, tau, p, gamma, eps).items():
            alpha[i, j] = a
    return alpha

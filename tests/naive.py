"""A second, deliberately naive implementation of the α-CL maths (docs/design.md) for tiny inputs.

Plain Python loops over pairs, distances as ||z_i − z_j||²/2 (not the Gram form) or, for
normalised rows, 1 − cos_ij from the raw rows (a zero row has cosine 0 with everything), the
sparsemax threshold by bisection or by an explicit sort (not by Michelot's iteration), no
row-max tricks. It shares no code with fastalpha, so agreement between the two checks both
against the written maths.
"""
import math

import numpy as np


def stacked(z1, z2):
    return np.concatenate([np.asarray(z1, dtype=np.float64), np.asarray(z2, dtype=np.float64)], 0)


def cosine(a, b):
    na, nb = math.sqrt(float(a @ a)), math.sqrt(float(b @ b))
    return 0.0 if na == 0 or nb == 0 else float(a @ b) / (na * nb)


def distances(z, normalize):
    """d2_ij: 1 − cos_ij for normalised rows, ||z_i − z_j||²/2 otherwise, clamped at 0."""
    m = len(z)
    if normalize:
        return np.array([[max(0.0, 1.0 - cosine(z[i], z[j])) for j in range(m)] for i in range(m)])
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


def sparsemax_support(values, tau, inclusive=False):
    """(μ, support) exactly, by sorting: the support is the largest prefix k of the sorted
    values with τ + Σ_{l≤k} s_l > k s_k, and μ = (τ + Σ_{l≤k} s_l)/k. Values equal to μ are
    outside the support (their weight (μ − v)/τ is 0). `inclusive=True` puts them inside
    instead: the wrong convention, for tests that must tell the two apart."""
    s = sorted(values)
    k = max(k for k in range(1, len(s) + 1) if tau + sum(s[:k]) > k * s[k - 1])
    mu = (tau + sum(s[:k])) / k
    return mu, [(v <= mu) if inclusive else (v < mu) for v in values]


def alpha_row(d2_row, d2_pos, neg, m, rule, tau, p, gamma, eps):
    """α_ij for j in neg, as a dict, straight from the table of the maths."""
    d = {j: d2_row[j] for j in neg}
    if rule == "quadratic":
        return {j: 1.0 / (m - 2) for j in neg}
    if rule in ("entropy", "direct"):
        power = 1.0 if rule == "entropy" else p / 2  # entropy is direct with p = 2, ε included
        w = {j: math.exp(-(d[j] ** power) / tau) for j in neg}
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
    z = stacked(z1, z2)
    m = len(z)
    d2 = distances(z, normalize)
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
    z = stacked(z1, z2)
    m = len(z)
    d2 = distances(z, normalize)
    alpha = np.zeros((m, m))
    for i in range(m):
        neg = negatives(i, m)
        for j, a in alpha_row(d2[i], d2[i, (i + m // 2) % m], neg, m, rule, tau, p, gamma, eps).items():
            alpha[i, j] = a
    return alpha


def square_gradient(z1, z2, tau, detach_alpha, normalize, weights=None, inclusive=False):
    """∂(Σ_i w_i loss_i)/∂(z1, z2) for rule="square", by the chain rule through d2, in loops.

    loss_i = Σ_j α_ij (d2_i − d2_ij) with α the sparsemax of −d2_i·/τ. With α a stop-gradient
    ∂loss_i/∂d2_i = Σ_j α_ij = 1 and ∂loss_i/∂d2_ij = −α_ij. Differentiating α too (the
    sparsemax Jacobian on the support S_i, k_i = |S_i|: ∂α_ij/∂d2_il = (1/k_i − [j = l])/τ)
    gives ∂loss_i/∂d2_ij = −(2 α_ij − 1/k_i) on S_i and 0 off it. The support comes from
    `sparsemax_support` (exact, ties at μ excluded unless `inclusive`). Then d2_ij = ||z_i − z_j||²/2 or, for
    normalised rows u = z/||z||, 1 − u_i·u_j, whose derivative goes back through the
    normalisation: ∂u/∂z = (I − u uᵀ)/||z||.
    """
    z = stacked(z1, z2)
    m, dim = z.shape
    norms = np.linalg.norm(z, axis=1)
    u = z / norms[:, None] if normalize else z
    d2 = distances(z, normalize)
    weights = np.ones(m) if weights is None else np.asarray(weights, dtype=np.float64)
    coef = np.zeros((m, m))  # coef[i, j] = w_i ∂loss_i/∂d2_ij
    for i in range(m):
        neg = negatives(i, m)
        mu, inside = sparsemax_support([d2[i, j] for j in neg], tau, inclusive)
        k = sum(inside)
        alpha = {j: (mu - d2[i, j]) / tau if s else 0.0 for j, s in zip(neg, inside)}
        coef[i, (i + m // 2) % m] += weights[i] * sum(alpha.values())
        for j, s in zip(neg, inside):
            slope = alpha[j] if detach_alpha else (2 * alpha[j] - 1.0 / k if s else 0.0)
            coef[i, j] -= weights[i] * slope
    grad_u = np.zeros((m, dim))
    for i in range(m):
        for j in range(m):
            if coef[i, j] == 0.0:
                continue
            if normalize:  # d2 = 1 − u_i·u_j
                grad_u[i] -= coef[i, j] * u[j]
                grad_u[j] -= coef[i, j] * u[i]
            else:  # d2 = ||u_i − u_j||²/2
                grad_u[i] += coef[i, j] * (u[i] - u[j])
                grad_u[j] += coef[i, j] * (u[j] - u[i])
    if not normalize:
        return grad_u[: m // 2], grad_u[m // 2:]
    grad = np.zeros((m, dim))
    for i in range(m):
        grad[i] = (grad_u[i] - u[i] * float(u[i] @ grad_u[i])) / norms[i]
    return grad[: m // 2], grad[m // 2:]


def grouped_loss_rows(z, groups, rule, tau, p=4.0, gamma=2.0, eps=0.0, normalize=True, queue=None, queue_groups=None,
                      batch_columns=True, self_columns=None):
    """Per-row losses with positives and negatives from groups, over the columns [Z; Q].

    Straight from docs/design.md ("Positive sets"), in loops. The columns are the M rows of z
    (unless `batch_columns` is False: then they are anchors only) and the K rows of `queue`;
    `queue_groups[k]` is the group of queue row k, None for an ignored row (nobody's positive
    or negative); without `queue_groups` every queue row is nobody's positive. Anchor i's own
    column is i, or `self_columns[i]` (None: no own column). P_i = the columns of i's group but
    its own, J_i = the columns of the other groups; d̄2_i is the mean of d2_ip over P_i; every
    rule but infonce has loss_i = Σ_{j∈J_i} α_ij (d̄2_i − d2_ij) with α over J_i, infonce has
    loss_i = log(ε Σ_{p∈P_i} e^{(d̄2_i − d2_ip)/τ} + Σ_{j∈J_i} e^{(d̄2_i − d2_ij)/τ}); an anchor
    without a positive or without a negative has loss 0.
    """
    z = np.asarray(z, dtype=np.float64)
    m = len(z)
    queue = np.zeros((0, z.shape[1])) if queue is None else np.asarray(queue, dtype=np.float64)
    cols = np.concatenate([z, queue])
    d2 = distances(cols, normalize)
    ignored = object()
    unique = [("queue row", k) for k in range(len(queue))]
    col_groups = [groups[j] if batch_columns else ignored for j in range(m)]
    col_groups += [unique[k] if queue_groups is None else (ignored if queue_groups[k] is None else queue_groups[k])
                   for k in range(len(queue))]
    out = []
    for i in range(m):
        own = i if self_columns is None else self_columns[i]
        pos = [j for j in range(len(cols)) if j != own and col_groups[j] is not ignored and col_groups[j] == groups[i]]
        neg = [j for j in range(len(cols)) if col_groups[j] is not ignored and col_groups[j] != groups[i]]
        if not pos or not neg:
            out.append(0.0)
            continue
        d2_pos = sum(d2[i, j] for j in pos) / len(pos)
        if rule == "infonce":
            total = eps * sum(math.exp((d2_pos - d2[i, j]) / tau) for j in pos)
            total += sum(math.exp((d2_pos - d2[i, j]) / tau) for j in neg)
            out.append(math.log(total))
            continue
        if rule == "quadratic":
            a = {j: 1.0 / len(neg) for j in neg}
        elif rule in ("entropy", "direct"):
            power = 1.0 if rule == "entropy" else p / 2
            w = {j: math.exp(-(d2[i, j] ** power) / tau) for j in neg}
            a = {j: w[j] / (sum(w.values()) + eps * len(neg)) for j in neg}
        elif rule == "inverse":
            w = {j: (d2[i, j] + tau) ** (-1.0 / gamma) for j in neg}
            a = {j: w[j] / sum(w.values()) for j in neg}
        elif rule == "square":
            mu = sparsemax_mu([d2[i, j] for j in neg], tau)
            a = {j: max(0.0, (mu - d2[i, j]) / tau) for j in neg}
        else:
            raise ValueError(rule)
        out.append(sum(a[j] * (d2_pos - d2[i, j]) for j in neg))
    return np.array(out)


def numerical_gradient(f, z, step=1e-6):
    """Central differences of the scalar f(z) in every entry of the float64 array z."""
    z = np.array(z, dtype=np.float64)
    grad = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        plus, minus = z.copy(), z.copy()
        plus[idx] += step
        minus[idx] -= step
        grad[idx] = (f(plus) - f(minus)) / (2 * step)
    return grad

"""Naive full-matrix OPIS reference in float64 numpy (independent of pml_tcm's counting)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np


def kth_largest(values: np.ndarray, k: int) -> float:
    return float(np.sort(values)[::-1][k - 1])


def naive_opis(
    closeness: np.ndarray,
    query_labels: np.ndarray,
    reference_labels: np.ndarray,
    self_offset: int | None,
    calibration_range=None,
    far_range=(1e-3, 1e-2),
    num_thresholds=1000,
    beta=1.0,
    epsilon=0.1,
    query_units=None,
):
    """closeness: (N, M) float64 closeness scores (similarity, or minus the distance);
    query_units: (N,) the row of each query (its group), default its label."""
    n, m = closeness.shape
    valid = np.ones((n, m), dtype=bool)
    if self_offset is not None:
        for i in range(n):
            valid[i, i + self_offset] = False
    same = query_labels[:, None] == reference_labels[None, :]
    pos = same & valid
    neg = ~same & valid
    if calibration_range is None and not neg.any():
        # documented fallback: no negative pair -> [lowest, highest] positive score
        lo, hi = (closeness[pos].min(), closeness[pos].max()) if pos.any() else (0.0, 0.0)
    elif calibration_range is None:
        negatives = closeness[neg]
        n_neg = negatives.size
        far_lo, far_hi = far_range
        k_hi = max(1, math.ceil(Fraction(repr(far_hi)) * n_neg))
        k_lo = max(1, math.ceil(Fraction(repr(far_lo)) * n_neg))
        lo, hi = kth_largest(negatives, k_hi), kth_largest(negatives, k_lo)
    else:
        lo, hi = calibration_range
    grid = np.linspace(lo, hi, num_thresholds)
    units = query_labels if query_units is None else np.asarray(query_units)
    classes = np.unique(units)

    def utility(mask_pos, mask_neg):
        s_pos = closeness[mask_pos]
        s_neg = closeness[mask_neg]
        tp = np.array([(s_pos >= t).sum() for t in grid], dtype=np.float64)
        fp = np.array([(s_neg >= t).sum() for t in grid], dtype=np.float64)
        fn = s_pos.size - tp
        b2 = beta * beta
        den = (1 + b2) * tp + b2 * fn + fp
        return np.where(den > 0, (1 + b2) * tp / np.where(den > 0, den, 1), 0.0), s_pos.size

    def mean(curve):
        if hi == lo:
            return float(np.mean(curve))
        return float(np.trapezoid(curve, grid) / (hi - lo))

    u_all, _ = utility(pos, neg)
    curves, included = [], []
    for c in classes:
        rows = (units == c)[:, None]
        u, npos = utility(pos & rows, neg & rows)
        curves.append(u)
        included.append(npos > 0)
    inc = [c for c, keep in zip(curves, included) if keep]
    opis = float(np.mean([mean((u - u_all) ** 2) for u in inc])) if inc else 0.0
    eps = 0.0
    t = len(inc)
    if t:
        order = sorted(range(t), key=lambda i: mean(inc[i]))
        w = max(1, math.ceil(Fraction(repr(epsilon)) * t))
        if w < t:
            worst = np.mean([inc[i] for i in order[:w]], axis=0)
            rest = np.mean([inc[i] for i in order[w:]], axis=0)
            eps = mean((worst - rest) ** 2)
    return dict(
        lo=lo,
        hi=hi,
        grid=grid,
        opis=opis,
        eps_opis=eps,
        curves=np.array(curves),
        pooled=u_all,
        means=np.array([mean(u) for u in curves]),
    )

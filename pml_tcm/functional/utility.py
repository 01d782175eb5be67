"""The F-β utility curves over a threshold grid, from the grid's counts, and their means.

One definition for OPIS (:func:`~pml_tcm.functional.opis.opis_compute`) and its bootstrap
(:mod:`~pml_tcm.functional.bootstrap`): a histogram row counts a class's pairs by grid
bucket, its reversed cumulative sum the pairs at or above each threshold; the curve is
F-β of those; a curve's mean is its trapezoid integral over the range (the plain mean for
a zero-width range), taken as one product with :func:`mean_weights`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .opis import OPISState

CLASS_BLOCK_ELEMENTS = 1 << 22
"""Curve values (float64) computed at a time (curves of many classes go in blocks)."""


def f_beta(
    true_positives: Tensor, false_positives: Tensor, positives: Tensor, beta: float
) -> Tensor:
    """F-β from counts, 0 where the denominator is 0. Broadcasts; returns float64.

    ``(1 + β²) tp / ((1 + β²) tp + β² fn + fp)`` with ``fn = positives - tp``, computed
    as ``(1 + β²) tp / (tp + fp + β² positives)`` (the same sum). Counts are never
    negative, so a zero denominator means ``tp = 0``: a zero numerator, kept by dividing
    by the smallest positive float64 instead."""
    tp = true_positives.to(torch.float64)
    denominator = tp + false_positives.to(torch.float64) + beta * beta * positives.to(torch.float64)
    utility = (1.0 + beta * beta) * tp
    return utility / denominator.clamp_min_(torch.finfo(torch.float64).tiny)


def at_or_above(histogram: Tensor) -> Tensor:
    """Reversed cumulative sums along the last dimension: ``out[..., g] = Σ_{k >= g}
    histogram[..., k]`` (the pairs at or above threshold ``g``), int64 on the CPU."""
    counts = histogram.cpu().to(torch.int64)
    below = counts.cumsum(-1)
    return (below[..., -1:] - below).add_(counts)


def mean_weights(closeness_grid: Tensor) -> Tensor:
    """``(G,)`` float64 ``τ`` with ``grid_mean(x) = x @ τ``: trapezoid weights over the
    range divided by its width, or ``1/G`` each for a zero-width range."""
    grid = closeness_grid.to(torch.float64).cpu()
    width = float(grid[-1] - grid[0])
    if width <= 0:
        return torch.full_like(grid, 1.0 / grid.shape[0])
    step = torch.diff(grid) / 2
    weights = torch.zeros_like(grid)
    weights[:-1] += step
    weights[1:] += step
    return weights / width


def grid_mean(curves: Tensor, closeness_grid: Tensor) -> Tensor:
    """``⟨g⟩`` along the last dimension of ``curves`` (``(..., G)``): the trapezoid
    integral over ``closeness_grid`` (``(G,)``) divided by its width, or the plain mean
    for a zero-width range."""
    return curves.to(torch.float64) @ mean_weights(closeness_grid)


def class_curves(state: OPISState, rows: slice | Tensor, beta: float) -> Tensor:
    """``(C, G)`` float64 utility curves of the state's classes ``rows`` (a slice, or
    ``(C,)`` int64 indices), from their histograms and positive totals."""
    return f_beta(
        at_or_above(state.positive_histogram[rows]),
        at_or_above(state.negative_histogram[rows]),
        state.positives[rows].cpu().unsqueeze(1),
        beta,
    )

"""Percentile bootstrap intervals from the one-pass counts (no second pass over pairs).

Two resamplings, each reproducible from a seed and independent of how the queries were
ordered, chunked or sharded:

* :func:`opis_replicates` resamples the *units* of an
  :class:`~pml_tcm.functional.opis.OPISState` (its classes, or its groups) with
  replacement: a replicate weights each unit's counts by how often it was drawn, so its
  pooled curve, OPIS and ε-OPIS are sums of the units' curves (matrix products with the
  weights). Units without a positive pair are drawn like the others and, as in the point
  estimate, count in the pooled curve but not in the means.
* :func:`rate_replicates` resamples *query samples*, each with all its pairs against the
  fixed reference set, within strata (groups, or classes): per-stratum and pooled FAR/FRR
  at one threshold, from the per-query counts of
  :class:`~pml_tcm.functional.calibration.QueryErrors`.

:func:`percentile_interval` turns replicates into an interval.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from .far_search import ceil_fraction_of
from .utility import CLASS_BLOCK_ELEMENTS, at_or_above, class_curves, f_beta, mean_weights

if TYPE_CHECKING:
    from .opis import OPISState

REPLICATE_ELEMENTS = 1 << 22
"""Weights (replicates × units, or × queries) held at a time."""

DRAW_ELEMENTS = 1 << 20
"""Query draws (replicates × queries) of :func:`rate_replicates` made at a time (each
costs about 56 bytes of temporaries: its draw, its index and its four counts)."""


def check_bootstrap_settings(bootstrap: int, confidence: float, seed: int) -> None:
    """Raise a ``ValueError`` naming the argument."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ValueError(f"bootstrap must be a non-negative integer, got {bootstrap!r}")
    if bootstrap == 1:
        raise ValueError("bootstrap must be 0 (no intervals) or at least 2 replicates, got 1")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def percentile_interval(replicates: Tensor, confidence: float) -> Tensor:
    """``(..., 2)`` float64: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles (linear interpolation) of ``(B, ...)`` replicates, NaN replicates ignored
    (NaN where every replicate is)."""
    levels = torch.tensor([(1 - confidence) / 2, (1 + confidence) / 2], dtype=torch.float64)
    quantiles = torch.nanquantile(replicates.to(torch.float64), levels, dim=0)
    return quantiles.movedim(0, -1)


def _draw_counts(num: int, replicates: int, generator: torch.Generator) -> Tensor:
    """``(replicates, num)`` int64: how often each of ``num`` items is drawn in ``num``
    draws with replacement, per replicate."""
    draws = torch.randint(num, (replicates, num), generator=generator)
    offsets = torch.arange(replicates).unsqueeze(1) * num
    return torch.bincount((draws + offsets).reshape(-1), minlength=replicates * num).view(
        replicates, num
    )


def opis_replicates(
    state: OPISState,
    closeness_grid: Tensor,
    *,
    beta: float,
    epsilon: float,
    replicates: int,
    seed: int,
) -> tuple[Tensor, Tensor]:
    """OPIS and ε-OPIS of ``replicates`` resamples of the state's units.

    Args:
        state: an :class:`~pml_tcm.functional.opis.OPISState` (``U`` units, ``G``
            thresholds), summed over ranks.
        closeness_grid: ``(G,)`` the state's grid.
        beta: β of F-β.
        epsilon: ε of ε-OPIS.
        replicates: ``B``.
        seed: the resampling's seed.

    Returns:
        ``(opis, eps_opis)``, ``(B,)`` float64 each. A replicate with all weight
        on units without positives has OPIS 0, as the point estimate would.
    """
    num_units, grid_size = state.positive_histogram.shape
    tau = mean_weights(closeness_grid)
    positives = state.positives.cpu().to(torch.float64)
    included = positives > 0
    class_block = max(1, CLASS_BLOCK_ELEMENTS // max(1, grid_size))
    blocks = [(a, min(num_units, a + class_block)) for a in range(0, num_units, class_block)]

    mean_utility = torch.zeros(num_units, dtype=torch.float64)
    mean_square = torch.zeros(num_units, dtype=torch.float64)
    for first, last in blocks:
        block = class_curves(state, slice(first, last), beta)
        mean_utility[first:last] = block @ tau
        mean_square[first:last] = block.square() @ tau
    inside = included.nonzero().squeeze(1)
    order = inside[torch.sort(mean_utility[inside], stable=True).indices]  # worst first

    generator = torch.Generator().manual_seed(seed)
    opis_values = torch.zeros(replicates, dtype=torch.float64)
    eps_values = torch.zeros(replicates, dtype=torch.float64)
    step = max(1, REPLICATE_ELEMENTS // max(1, num_units))
    for start in range(0, replicates, step):
        count = min(step, replicates - start)
        weights = _draw_counts(num_units, count, generator).to(torch.float64)
        pooled_tp = torch.zeros(count, grid_size, dtype=torch.float64)
        pooled_fp = torch.zeros(count, grid_size, dtype=torch.float64)
        for first, last in blocks:
            w = weights[:, first:last]
            pooled_tp += w @ at_or_above(state.positive_histogram[first:last]).to(torch.float64)
            pooled_fp += w @ at_or_above(state.negative_histogram[first:last]).to(torch.float64)
        pooled = f_beta(pooled_tp, pooled_fp, (weights @ positives).unsqueeze(1), beta)
        inside_weights = weights * included
        drawn = inside_weights.sum(1)  # included units drawn (with multiplicity)
        # ε-OPIS: the worst ⌈ε n⌉ draws along the point estimate's order
        worst = torch.tensor(
            [max(1, ceil_fraction_of(epsilon, int(n))) for n in drawn.tolist()],
            dtype=torch.float64,
        )
        ordered = inside_weights[:, order]
        before = ordered.cumsum(1) - ordered
        in_worst = torch.zeros_like(weights)
        in_worst[:, order] = (torch.minimum(ordered, worst[:, None] - before)).clamp_(min=0)
        weighted = torch.zeros(count, grid_size, dtype=torch.float64)
        worst_sum = torch.zeros(count, grid_size, dtype=torch.float64)
        for first, last in blocks:
            block = class_curves(state, slice(first, last), beta)
            weighted += inside_weights[:, first:last] @ block
            worst_sum += in_worst[:, first:last] @ block
        # Σ w ⟨(U_c - P)²⟩ = Σ w ⟨U_c²⟩ - 2 ⟨P · Σ w U_c⟩ + n ⟨P²⟩
        spread = (
            inside_weights @ mean_square
            - 2 * (pooled * weighted) @ tau
            + drawn * (pooled.square() @ tau)
        )
        has = drawn > 0
        opis_values[start : start + count] = torch.where(
            has, spread / drawn.clamp(min=1), torch.zeros_like(spread)
        ).clamp_(min=0)
        split = worst < drawn
        rest = (drawn - worst).clamp(min=1)
        gap = worst_sum / worst[:, None] - (weighted - worst_sum) / rest[:, None]
        eps_values[start : start + count] = torch.where(
            split, gap.square() @ tau, torch.zeros_like(drawn)
        )
    return opis_values, eps_values


def _canonical_order(strata: Tensor, keys: list[Tensor]) -> Tensor:
    """An order of the rows by stratum, then by the given keys (lexicographic): rows
    equal in every key are interchangeable, so the resampling does not depend on the
    order the rows came in."""
    order = torch.arange(strata.shape[0])
    for key in [*reversed(keys), strata]:
        order = order.index_select(0, torch.argsort(key.index_select(0, order), stable=True))
    return order


class RateReplicates(NamedTuple):
    """FAR and FRR replicates of :func:`rate_replicates` (float64; NaN where a replicate's
    stratum, or index, has no negative / positive pair)."""

    far: Tensor  # (B, S) per stratum
    frr: Tensor
    pooled_far: Tensor  # (B,)
    pooled_frr: Tensor
    other_far: Tensor | None  # (B, K) per value of ``other``, or None
    other_frr: Tensor | None


def _rates(sums: Tensor) -> tuple[Tensor, Tensor]:
    """FAR and FRR of ``(..., 4)`` summed counts, NaN without negatives / positives."""
    false_accepts, false_rejects, negatives, positives = sums.unbind(-1)
    nan = torch.full_like(negatives, float("nan"))
    far = torch.where(negatives > 0, false_accepts / negatives.clamp(min=1), nan)
    frr = torch.where(positives > 0, false_rejects / positives.clamp(min=1), nan)
    return far, frr


def rate_replicates(
    counts: tuple[Tensor, Tensor, Tensor, Tensor],
    strata: Tensor,
    num_strata: int,
    *,
    replicates: int,
    seed: int,
    other: Tensor | None = None,
    num_other: int = 0,
) -> RateReplicates:
    """FAR and FRR of ``replicates`` stratified resamples of the query samples.

    Args:
        counts: ``(false_accepts, false_rejects, negatives, positives)``, ``(N,)`` int64
            each, one row per query (all ranks).
        strata: ``(N,)`` int64 stratum of each query in ``[0, num_strata)``; a replicate
            draws, within each stratum, as many queries as it has, with replacement.
        num_strata: ``S``.
        replicates: ``B``.
        seed: the resampling's seed.
        other: ``(N,)`` int64 a second index of each query in ``[0, num_other)`` (e.g.
            its class when the strata are groups): the same replicates' rates per value
            (a drawn query counts for its own value).
        num_other: ``K``.

    Returns:
        A :class:`RateReplicates`.
    """
    stacked = torch.stack([c.cpu().to(torch.int64) for c in counts])
    strata = strata.cpu().to(torch.int64)
    other = None if other is None else other.cpu().to(torch.int64)
    keys = ([] if other is None else [other]) + list(stacked)
    order = _canonical_order(strata, keys)
    rows = stacked[:, order].T.to(torch.float64).contiguous()  # (N, 4)
    strata = strata[order]
    other = None if other is None else other[order]
    num_rows = strata.shape[0]
    sizes = torch.bincount(strata, minlength=num_strata)
    starts = (torch.cumsum(sizes, 0) - sizes).index_select(0, strata).to(torch.float64)
    row_sizes = sizes.index_select(0, strata).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    sums = torch.empty(replicates, num_strata, 4, dtype=torch.float64)
    other_sums = None
    if other is not None:
        other_sums = torch.empty(replicates, num_other, 4, dtype=torch.float64)
    step = max(1, DRAW_ELEMENTS // max(1, num_rows))
    for start in range(0, replicates, step):
        count = min(step, replicates - start)
        # a uniform draw within the row's stratum: start + ⌊u · size⌋ (u < 1)
        picked = torch.rand(count, num_rows, generator=generator, dtype=torch.float64)
        picked = picked.mul_(row_sizes).floor_().add_(starts).view(-1).long()
        drawn = rows.index_select(0, picked)
        sums[start : start + count].zero_().index_add_(1, strata, drawn.view(count, num_rows, 4))
        if other_sums is not None:
            keys = other.index_select(0, picked).view(count, num_rows)
            keys += torch.arange(count).unsqueeze(1) * num_other
            block = other_sums[start : start + count].zero_().view(-1, 4)
            block.index_add_(0, keys.view(-1), drawn)
    far, frr = _rates(sums)
    pooled_far, pooled_frr = _rates(sums.sum(1))
    other_far = other_frr = None
    if other_sums is not None:
        other_far, other_frr = _rates(other_sums)
    return RateReplicates(far, frr, pooled_far, pooled_frr, other_far, other_frr)

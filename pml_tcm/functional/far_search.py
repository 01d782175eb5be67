"""Exact FAR thresholds: the k-th largest negative closeness, without holding all pairs.

Owns :func:`far_closeness_thresholds` (and the FAR rank ``k = max(1, ⌈f · n_neg⌉)``,
:func:`far_rank`), used by the OPIS calibration range and by the threshold calibration
for a target FAR. ``⌈f · n⌉`` is evaluated exactly on the decimal value of ``f`` as
Python prints it (0.01 is 1/100).

1. *Guide* (only when there are more negatives than ``collect_limit``): a sample of
   about 2^21 pairs (a random 1/16 of the queries, each group of 64 of them scored
   against references drawn at random for it, with replacement), negatives kept, is
   histogrammed; the bins around the target rank, widened by a 6σ sampling margin and one
   bin for rounding, give a bracket ``[lo, hi)``.
2. *Exact pass*: one pass over all chunks, filtered at the lowest ``lo``, counts the
   negatives ``>= hi`` (all minus positives minus self pairs) and collects the negatives
   in ``[lo, hi)`` (labels are looked up for the pairs in the bracket only). If the
   target rank lies in the bracket, sorting the collected values gives the exact k-th
   value; the scores come from the same chunked computation as the counting, so the
   threshold is bit-equal to the k-th largest negative of that score matrix. The same
   pass counts the bracket's negatives between up to 255 pivots (on the CPU engine), so
   that a bracket holding more than ``collect_limit`` values (large N) is narrowed to the
   piece holding the rank and collected in one more pass.
3. *Fallback*: if the bracket missed or the piece still held more than
   ``collect_limit`` values, further passes split the bracket at up to 255 pivots, count
   per piece and keep the piece holding the rank, until it is small enough to collect
   (or cannot be split: then all its values are equal).

When the pairs gathered by the exact pass (everything ``>= lo``: a score per pair, and
the positive and self pairs apart with their score and 8-byte row) hold at most
``retain_limit`` scores' worth of memory, they are returned and the OPIS counting reuses
them: the guide plus one pass over the data in total.

On a sync-free stream (:attr:`~pml_tcm.functional.streaming.PairStream.sync_free`, off
the CPU) the exact pass reads every pair of each tile with its label masks: the counts
are dense sums, the pivot pieces one ``index_add_``, and the negatives in the bracket are
written into a fixed-capacity device buffer at positions from a running count and a
cumulative sum of the mask (one ``index_put_``; the other scores, and those past the
capacity, go to dump slots). The host reads the counts once per pass, so the number of
syncs does not depend on the number of queries or of chunks; nothing is retained (the
counting is a dense pass).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from .collectives import all_gather_values, all_reduce
from .streaming import DUMP_SLOTS, ChunkPairs, DenseTile, PairStream, ceil_to_dtype, dump_slots

GUIDE_FRACTION = 16
GUIDE_BINS = 1 << 16
PIVOTS = 255
GUIDE_BUDGET = 1 << 21
MAX_PASSES = 200
COLLECT_LIMIT = 1 << 22
"""Default most negatives collected for an exact threshold (float64 copies of them are
held: 2^22 keep the search's working set near 100 MB; 2^24 took about 1 GB)."""


def ceil_fraction_of(fraction: float, count: int) -> int:
    """``⌈fraction · count⌉`` on the decimal value of ``fraction`` (0.1 · 30 is 3)."""
    return math.ceil(Fraction(repr(float(fraction))) * count)


def far_rank(far: float, num_negatives: int) -> int:
    """The rank ``k = max(1, ⌈far · num_negatives⌉)`` of the FAR threshold among the
    negatives, counted from the top (1-based)."""
    return max(1, ceil_fraction_of(far, num_negatives))


def num_negative_pairs(stream: PairStream, *, distributed: bool) -> int:
    """All negative pairs of the stream, over all ranks."""
    _, negatives = stream.pair_totals()
    return int(all_reduce(negatives.sum().reshape(1), distributed=distributed))


class FarSearchError(RuntimeError):
    """The exact FAR search ran out of passes (it never returns a partial result)."""


class FarThresholds(NamedTuple):
    """The result of :func:`far_closeness_thresholds`.

    Attributes:
        values: the exact closeness threshold of each rank, in the order given.
        retained: every chunk's pairs ``>= retained_floor``, or ``None`` when they did not
            fit ``retain_limit``.
        retained_floor: the floor ``retained`` was gathered at (``inf`` without it).
    """

    values: list[float]
    retained: list[ChunkPairs] | None
    retained_floor: float


@dataclass
class _Target:
    rank: int  # 1-based rank from the top among all negatives
    lo: float = -math.inf  # bracket [lo, hi): closeness values
    hi: float = math.inf
    above: int = 0  # negatives >= hi (known before the pass when pivoting)
    inside: int | None = None  # negatives in [lo, hi) when known
    pivots: Tensor | None = None
    value: float | None = None
    sampled: tuple[float, float] | None = None  # the guide's lowest and highest negative


def _guide_brackets(
    stream: PairStream, targets: list[_Target], num_negatives: int, distributed: bool, seed: int
) -> None:
    """Set each target's bracket from a histogram of a random 1/16 of the queries."""
    num_queries = stream.queries.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picked = max(1, -(-num_queries // GUIDE_FRACTION))
    rows = torch.randperm(num_queries, generator=generator)[:picked].sort().values
    sample = stream.negative_sample(rows.to(stream.queries.device), GUIDE_BUDGET, generator)
    valid = torch.isfinite(sample)  # (NaN marks a pair that is not negative)
    bounds = (
        torch.stack(
            [
                torch.where(valid, sample, math.inf).min().to(torch.float64),
                -torch.where(valid, sample, -math.inf).max().to(torch.float64),
            ]
        )
        if sample.numel()
        else torch.full((2,), math.inf, dtype=torch.float64)
    )
    bounds = bounds.to(stream.queries.device)
    all_reduce(bounds, distributed=distributed, op="min")
    low, high = float(bounds[0]), -float(bounds[1])
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return  # keep the whole-range brackets
    # bins of width (high - low) / GUIDE_BINS; bin GUIDE_BINS collects the non-negatives
    bins = ((sample - low) * (GUIDE_BINS / (high - low))).floor_().clamp_(0, GUIDE_BINS - 1)
    bins = torch.where(valid, bins, GUIDE_BINS).to(torch.int64)
    histogram = torch.bincount(bins, minlength=GUIDE_BINS + 1)[:GUIDE_BINS].clone()
    all_reduce(histogram, distributed=distributed)
    sampled = int(histogram.sum())
    if sampled == 0:
        return
    # the bracket search is host-side arithmetic on 2^16 counts: one copy, then no
    # device tensor meets a Python scalar
    from_top = histogram.flip(0).cumsum(0).cpu()
    width = (high - low) / GUIDE_BINS
    for target in targets:
        target.sampled = (low, high)
        expected = target.rank / num_negatives * sampled
        # 6σ of a binomial count plus 2% for the correlation of pairs sharing a query
        margin = 6.0 * math.sqrt(expected) + 0.02 * expected + 2.0
        top_rank, bottom_rank = expected - margin, expected + margin
        # bins counted from the top; a bin holding rank r is the first with from_top >= r
        rank_range = torch.tensor([max(top_rank, 0.0), bottom_rank], dtype=torch.float64)
        top_bin, bottom_bin = torch.searchsorted(from_top, rank_range).tolist()
        # one more bin on each side for the rounding of the binning at bin edges
        hi_edge = GUIDE_BINS - top_bin + 1
        lo_edge = GUIDE_BINS - bottom_bin - 2
        target.hi = math.inf if top_rank <= 0 or hi_edge >= GUIDE_BINS else low + hi_edge * width
        target.lo = -math.inf if lo_edge <= 0 else low + lo_edge * width


def _next_pivots(low: float, high: float, bracket_hi: float, dtype: torch.dtype) -> Tensor | None:
    """Distinct ``dtype`` values in ``(low, high]`` and below ``bracket_hi`` that split the
    bracket (``low``/``high`` bound its values), or ``None`` when there is none."""
    candidates = torch.linspace(low, high, PIVOTS + 1, dtype=torch.float64)[1:]
    candidates = torch.unique(candidates.to(dtype).to(torch.float64))
    candidates = candidates[(candidates > low) & (candidates < bracket_hi)]
    return candidates if candidates.numel() else None


def _negatives_at_or_above(pairs: ChunkPairs, threshold: float) -> Tensor:
    """Negative pairs of ``pairs`` with score ``>= threshold``: all minus the positive and
    self pairs (a 0-d int64 tensor)."""
    limit = ceil_to_dtype(threshold, pairs.values.dtype)
    return (
        (pairs.values >= limit).sum()
        - (pairs.positive_values >= limit).sum()
        - (pairs.self_values >= limit).sum()
    )


def _in_bracket(values: Tensor, low: float, high: float) -> Tensor:
    """Which ``values`` lie in ``[low, high)`` (compared in their dtype, exact; bool)."""
    inside = values < ceil_to_dtype(high, values.dtype)
    if low > -math.inf:
        inside &= values >= ceil_to_dtype(low, values.dtype)
    return inside


def _within(values: Tensor, low: float, high: float) -> Tensor:
    """The ``values`` in ``[low, high)``."""
    return values[_in_bracket(values, low, high)]


def _without(values: Tensor, removed: Tensor) -> Tensor:
    """``values`` less ``removed`` as multisets (``removed`` is a sub-multiset: copies of
    some of the same scores), sorted."""
    values = values.sort().values
    if not removed.numel():
        return values
    removed = removed.sort().values
    # the i-th copy of a value among the removed takes out the i-th copy among the values
    copy = torch.arange(removed.numel(), device=removed.device) - torch.searchsorted(
        removed, removed
    )
    keep = torch.ones_like(values, dtype=torch.bool)
    keep[torch.searchsorted(values, removed) + copy] = False
    return values[keep]


def _negatives_between(stream: PairStream, pairs: ChunkPairs, low: float, high: float) -> Tensor:
    """The negative scores of ``pairs`` in ``[low, high)``, as float64: labels are looked
    up for these pairs only, or, for retained pairs (positions dropped), the positive and
    self pairs' scores are taken out of them (the same floats, as multisets)."""
    values = pairs.values
    if pairs.negative_only:
        return _within(values, low, high).to(torch.float64)
    if pairs.positions is None:
        others = torch.cat(
            [_within(pairs.positive_values, low, high), _within(pairs.self_values, low, high)]
        )
        return _without(_within(values, low, high), others).to(torch.float64)
    selected = _in_bracket(values, low, high).nonzero().squeeze(1)
    negative = stream.negatives_of(pairs, selected).nonzero().squeeze(1)
    return values.index_select(0, selected.index_select(0, negative)).to(torch.float64)


class _PassTally:
    """What one exact pass learns about each open target (row ``j`` for ``targets[j]``).

    ``counts[j, 0]``: negatives ``>= hi``; ``counts[j, 1]``: negatives in ``[lo, hi)``;
    ``counts[j, 2 + p]``: negatives in pivot piece ``p``. ``extremes[j]``: ``(min, -max)``
    of the negatives in the bracket. ``collected[j]``: those negatives themselves while
    there are at most ``collect_limit`` (and no pivots); ``overflow[j]``: more, on a rank.
    """

    def __init__(
        self,
        targets: list[_Target],
        *,
        device: torch.device,
        dtype: torch.dtype,
        collect_limit: int,
        dense_capacity: int | None = None,
    ) -> None:
        self.targets = targets
        self.dtype = dtype
        self.collect_limit = collect_limit
        count_slots = 2 + PIVOTS + 1
        self.counts = torch.zeros(len(targets), count_slots, dtype=torch.int64, device=device)
        self.extremes = torch.full((len(targets), 2), math.inf, dtype=torch.float64, device=device)
        self.collected: list[list[Tensor]] = [[] for _ in targets]
        self.collected_size = [0] * len(targets)
        # a bracket known to hold more than collect_limit negatives is not collected (nor,
        # sync-free, one split at pivots)
        self.collecting = [
            (t.inside is None or t.inside <= collect_limit)
            and (dense_capacity is None or t.pivots is None)
            for t in targets
        ]
        self.overflow: Tensor | None = None
        self._pivots = [None if t.pivots is None else t.pivots.to(device) for t in targets]
        # sync-free collection: per bracket, a buffer of dense_capacity values, then the
        # dump slots of the scores not collected
        self.dense_capacity = dense_capacity
        self._buffers: dict[tuple[float, float], tuple[Tensor, Tensor]] = {}
        if dense_capacity is not None:
            for target in targets:
                bracket = (target.lo, target.hi)
                if target.pivots is None and bracket not in self._buffers:
                    buffer = torch.empty(dense_capacity + DUMP_SLOTS, dtype=dtype, device=device)
                    filled = torch.zeros((), dtype=torch.int64, device=device)
                    self._buffers[bracket] = (buffer, filled)

    def add(self, stream: PairStream, pairs: ChunkPairs) -> None:
        """Tally one chunk's pairs (gathered at or below every open bracket's ``lo``)."""
        counts, extremes = self.counts, self.extremes
        in_bracket: dict[tuple[float, float], Tensor] = {}  # targets may share one
        for j, target in enumerate(self.targets):
            counts[j, 0] += _negatives_at_or_above(pairs, target.hi)
            bracket = (target.lo, target.hi)
            if bracket not in in_bracket:
                in_bracket[bracket] = _negatives_between(stream, pairs, *bracket)
            inside = in_bracket[bracket]
            # (float64 copies of the scores: exact, and the pivots compare in float64)
            counts[j, 1] += inside.shape[0]
            if inside.numel():
                extremes[j, 0] = torch.minimum(extremes[j, 0], inside.min())
                extremes[j, 1] = torch.minimum(extremes[j, 1], -inside.max())
            if target.pivots is not None:
                piece = torch.searchsorted(self._pivots[j], inside, right=True)
                counts[j, 2 : 2 + target.pivots.numel() + 1] += torch.bincount(
                    piece, minlength=target.pivots.numel() + 1
                )
            # (with pivots too: a first pass collects and counts per piece, so that a
            # bracket too full to collect needs one more pass, not two)
            if self.collecting[j] and self.collected_size[j] <= self.collect_limit:
                self.collected[j].append(inside.to(self.dtype))
                self.collected_size[j] += inside.shape[0]

    def add_tile(self, tile: DenseTile) -> None:
        """Tally every pair of one tile (sync-free: dense compares and sums)."""
        counts, extremes, scores = self.counts, self.extremes, tile.scores
        if not scores.numel():
            return
        negative = tile.negative()
        wide: Tensor | None = None  # float64 scores, for the pivots
        done: set[tuple[float, float]] = set()
        in_bracket: dict[tuple[float, float], Tensor] = {}
        for j, target in enumerate(self.targets):
            high = ceil_to_dtype(target.hi, scores.dtype)
            above = scores >= high
            counts[j, 0] += (above if negative is None else above & negative).sum()
            bracket = (target.lo, target.hi)
            if bracket not in in_bracket:
                inside = scores < high
                if target.lo > -math.inf:
                    inside &= scores >= ceil_to_dtype(target.lo, scores.dtype)
                in_bracket[bracket] = inside if negative is None else inside & negative
            inside = in_bracket[bracket]
            counts[j, 1] += inside.sum()
            low_value = torch.where(inside, scores, math.inf).min().to(torch.float64)
            high_value = torch.where(inside, scores, -math.inf).max().to(torch.float64)
            extremes[j, 0] = torch.minimum(extremes[j, 0], low_value)
            extremes[j, 1] = torch.minimum(extremes[j, 1], -high_value)
            if target.pivots is not None:
                wide = scores.to(torch.float64) if wide is None else wide
                piece = torch.searchsorted(self._pivots[j], wide, right=True)
                row = counts[j, 2 : 2 + target.pivots.numel() + 1]
                row.index_add_(0, piece.view(-1), inside.view(-1).to(torch.int64))
            elif bracket not in done:
                done.add(bracket)
                self._collect(bracket, inside, scores)

    def _collect(self, bracket: tuple[float, float], inside: Tensor, scores: Tensor) -> None:
        """Append the scores where ``inside`` to the bracket's buffer (no host sync)."""
        buffer, filled = self._buffers[bracket]
        capacity = buffer.numel() - DUMP_SLOTS
        flat = inside.reshape(-1)
        position = torch.cumsum(flat, 0) + (filled - 1)
        dump = dump_slots(flat.numel(), capacity, flat.device)
        # each collected score has a slot of its own: the write is exact, whatever order
        slot = torch.where(flat & (position < capacity), position, dump)
        buffer.index_put_((slot,), scores.reshape(-1).to(buffer.dtype))
        filled += flat.sum()

    def reduce(self, distributed: bool) -> None:
        """Combine the ranks' tallies; the counts end up on the host (the bracket updates
        are host-side: one copy each per pass)."""
        device = self.counts.device
        if self.dense_capacity is not None:  # this rank's negatives in each bracket
            local = self.counts[:, 1].cpu().tolist()
            for j, target in enumerate(self.targets):
                if target.pivots is None:
                    buffer, _ = self._buffers[(target.lo, target.hi)]
                    self.collected[j] = [buffer[: min(local[j], self.dense_capacity)]]
                    self.collected_size[j] = local[j]
        all_reduce(self.counts, distributed=distributed)
        all_reduce(self.extremes, distributed=distributed, op="min")
        overflow = torch.tensor(
            [
                float(size > self.collect_limit or not collecting)
                for size, collecting in zip(self.collected_size, self.collecting)
            ],
            dtype=torch.float64,
            device=device,
        )
        all_reduce(overflow, distributed=distributed, op="max")
        self.counts, self.extremes, self.overflow = (
            self.counts.cpu(),
            self.extremes.cpu(),
            overflow.cpu(),
        )


def _exact_pass(
    stream: PairStream, tally: _PassTally, floor: float, retain_limit: int
) -> list[ChunkPairs] | None:
    """One pass over all chunks, filtered at ``floor``, into ``tally``; returns the
    chunks' pairs when they number at most ``retain_limit`` scores, else ``None``."""
    if stream.sync_free:  # (the positive slabs hold no negative pair)
        for piece in stream.pieces():
            for tile in stream.dense_tiles(piece):
                tally.add_tile(tile)
        return None
    kept_pairs: list[ChunkPairs] | None = []
    kept = 0
    for piece in stream.pieces():
        pairs = stream.scan(floor, piece, keep_positions=True)
        tally.add(stream, pairs)
        pairs.positions = None
        if kept_pairs is not None:
            kept += pairs.size
            if kept <= retain_limit:
                kept_pairs.append(pairs)
            else:
                kept_pairs = None
    return kept_pairs


def _narrow_to_piece(target: _Target, piece_counts: Tensor, above: int, rank_inside: int) -> int:
    """Move the bracket to the pivot piece holding the rank; returns its negatives.

    ``piece_counts``: negatives per piece, ascending; ``above``: negatives ``>= hi``."""
    pieces = piece_counts.flip(0).cumsum(0)
    piece_from_top = int(torch.searchsorted(pieces, torch.tensor(rank_inside)))
    piece = target.pivots.numel() - piece_from_top
    edges = torch.cat(
        [
            torch.tensor([target.lo], dtype=torch.float64),
            target.pivots.cpu(),
            torch.tensor([target.hi], dtype=torch.float64),
        ]
    )
    already_above = int(pieces[piece_from_top - 1]) if piece_from_top > 0 else 0
    target.above = above + already_above
    target.lo, target.hi = float(edges[piece]), float(edges[piece + 1])
    return int(pieces[piece_from_top]) - already_above


def _narrow(
    target: _Target, j: int, tally: _PassTally, *, distributed: bool, collect_limit: int
) -> None:
    """Update ``target`` (row ``j`` of ``tally``) after a pass: move the bracket above or
    below, take the exact value from the collected negatives, or split at pivots."""
    above, inside = int(tally.counts[j, 0]), int(tally.counts[j, 1])
    low, high = float(tally.extremes[j, 0]), -float(tally.extremes[j, 1])
    if target.rank <= above:  # the value is >= hi: look above
        target.lo, target.hi, target.above, target.pivots = target.hi, math.inf, 0, None
        return
    if target.rank > above + inside:  # the value is < lo: look below
        target.above = above + inside
        target.hi, target.lo, target.pivots = target.lo, -math.inf, None
        return
    target.above = above
    rank_inside = target.rank - above
    if not bool(tally.overflow[j]):
        values = all_gather_values(torch.cat(tally.collected[j]), distributed=distributed)
        # the rank_inside-th largest
        kth = values.numel() - rank_inside + 1
        target.value = float(torch.kthvalue(values, kth).values)
        return
    if target.pivots is not None:
        piece_counts = tally.counts[j, 2 : 2 + target.pivots.numel() + 1]
        inside = _narrow_to_piece(target, piece_counts, above, rank_inside)
        # the piece's own extremes are unknown; its edges bound it
        low, high = max(target.lo, low), min(target.hi, high)
    target.inside = inside
    if inside <= collect_limit:
        target.pivots = None
        return
    target.pivots = _next_pivots(low, high, target.hi, tally.dtype)
    if target.pivots is None:  # no value above low in the bracket: all equal low
        target.value = low


def far_closeness_thresholds(
    *,
    stream: PairStream,
    ranks: Sequence[int],
    num_negatives: int,
    distributed: bool,
    collect_limit: int,
    retain_limit: int,
    seed: int,
) -> FarThresholds:
    """Exact k-th largest negative closeness for each rank; retained pairs for counting.

    Args:
        stream: the pairs of this rank's queries.
        ranks: 1-based ranks from the top among all negatives (see :func:`far_rank`).
        num_negatives: all negative pairs, over all ranks (:func:`num_negative_pairs`).
        distributed: combine the passes over ``torch.distributed`` ranks.
        collect_limit: most candidate values collected for an exact threshold (more
            negatives than this use the guide).
        retain_limit: most memory, in scores' worth, of the gathered pairs kept for the
            counting (0: none; see :attr:`ChunkPairs.size`).
        seed: seed of the guide's random query sample.

    Returns:
        The :class:`FarThresholds`.

    Raises:
        FarSearchError: a threshold not isolated within ``MAX_PASSES`` passes.
    """
    targets = [_Target(rank=r) for r in ranks]
    if num_negatives > collect_limit:
        _guide_brackets(stream, targets, num_negatives, distributed, seed)
        if not stream.sync_free:  # split the guide's brackets at pivots from the start
            for target in targets:
                if target.sampled is not None:  # (open ends: up to the sample's extremes)
                    low, high = target.sampled
                    target.pivots = _next_pivots(
                        max(target.lo, low), min(target.hi, high), target.hi, stream.queries.dtype
                    )

    retained: list[ChunkPairs] | None = None
    retained_floor = math.inf
    for _ in range(MAX_PASSES):
        open_targets = [t for t in targets if t.value is None]
        if not open_targets:
            break
        floor = min(t.lo for t in open_targets)
        tally = _PassTally(
            open_targets,
            device=stream.queries.device,
            dtype=stream.queries.dtype,
            collect_limit=collect_limit,
            dense_capacity=min(collect_limit, num_negatives) if stream.sync_free else None,
        )
        if retained is not None and floor >= retained_floor:
            # every pair >= floor is held from an earlier pass: tally them, no new products
            for pairs in retained:
                tally.add(stream, pairs)
            kept_pairs = None
        else:
            kept_pairs = _exact_pass(stream, tally, floor, retain_limit)
        tally.reduce(distributed)
        if kept_pairs is not None and floor <= retained_floor:
            retained, retained_floor = kept_pairs, floor
        for j, target in enumerate(open_targets):
            _narrow(target, j, tally, distributed=distributed, collect_limit=collect_limit)
    unresolved = [t.rank for t in targets if t.value is None]
    if unresolved:
        raise FarSearchError(
            f"the exact FAR threshold search stopped after {MAX_PASSES} passes without "
            f"isolating the negatives of rank {unresolved} (from the top of {num_negatives}); "
            "raise collect_limit so that the bracket's values can be collected"
        )
    return FarThresholds(
        values=[t.value for t in targets], retained=retained, retained_floor=retained_floor
    )

"""Grid counting: per-(unit, threshold) histograms of streamed pairs (a unit is the
query's class, or its group: :attr:`~pml_tcm.functional.streaming.PairStream.query_unit`).

Owns :func:`grid_histograms`, which turns the :class:`~pml_tcm.functional.streaming.ChunkPairs`
of a :class:`~pml_tcm.functional.streaming.PairStream` into the positive and negative
histograms of an :class:`~pml_tcm.functional.opis.OPISState`.

Counting buckets each pair into the grid (the number of grid points ``<= score``, from an
arithmetic estimate corrected against the grid rounded up to the scores' dtype, so that
``score >= g_i`` is exact) and counts the keys ``class · (G + 1) + bucket``; reversed
cumulative sums give ``TP_c(g_i)`` and ``FP_c(g_i)``. Pairs below ``t_lo`` only matter
through the per-class totals, which come from label counts without any score
(:meth:`~pml_tcm.functional.streaming.PairStream.pair_totals`).

A sync-free stream (:attr:`~pml_tcm.functional.streaming.PairStream.sync_free`, off the
CPU) is counted densely instead: every pair of every tile gets its bucket (a
``searchsorted`` on the rounded-up grid: the same exact comparisons, NaN in bucket 0),
its key ``unit · (G + 1) + bucket`` is offset by ``U · (G + 1)`` for a negative pair (a
pair below the grid goes to a dump slot instead), and one ``index_add_`` per tile (the
self pairs weighted 0) counts positives and negatives together: no ``nonzero``, no
``bincount``, no host sync, the same counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from . import host
from .streaming import (
    DUMP_SLOTS,
    ChunkPairs,
    DenseTile,
    PairStream,
    PositiveSlab,
    ceil_to_dtype,
    dump_slots,
)


def ceil_grid(grid: Tensor, dtype: torch.dtype) -> Tensor:
    """``grid`` (float64) rounded up to ``dtype`` elementwise (see
    :func:`~pml_tcm.functional.streaming.ceil_to_dtype`), in ``dtype``: ``x >= grid[i]``
    is ``x >= result[i]`` for every ``x`` of that dtype."""
    if dtype == torch.float64:
        return grid
    rounded = grid.to(dtype)
    low = rounded.to(torch.float64) < grid
    bumped = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return torch.where(low, bumped, rounded)


HISTOGRAM_TILE = 1 << 18
"""Values bucketed at a time by :meth:`_GridCounter.bucket_histogram` off the CPU (and
on it for degenerate grids): about L2-sized; 2^16 made each op a parallel region of its
own (12x slower with 2 threads on a busy CPU)."""


MAX_DENSE_KEYS = 1 << 24
"""Largest key space counted by dense ``bincount`` flushes (above it: scatter only)."""


class _KeyCounts:
    """Counts of int64 keys in ``[0, size)``, each added with a weight of +1 or -1.

    Large batches of +1 keys are held until there are several times ``size`` of them and
    then ``bincount``-ed together (one dense pass of ``size`` per flush, not per chunk);
    small batches are scattered directly with ``index_add_``."""

    def __init__(self, size: int, device: torch.device, dtype: torch.dtype) -> None:
        self.counts = torch.zeros(size, dtype=dtype, device=device)
        self._pending: list[Tensor] = []
        self._pending_keys = 0

    def add(self, keys: Tensor, weight: int = 1) -> None:
        size = self.counts.numel()
        # (a dense bincount of a huge key space, many classes, would allocate size int64s)
        if weight != 1 or 8 * keys.numel() < size or size > MAX_DENSE_KEYS:
            step = torch.full((1,), weight, dtype=self.counts.dtype, device=keys.device)
            self.counts.index_add_(0, keys, step.expand(keys.numel()))
            return
        self._pending.append(keys)
        self._pending_keys += keys.numel()
        if self._pending_keys >= 4 * size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            keys = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            if keys.device.type == "cpu":  # NumPy's bincount is several times torch's there
                counted = np.bincount(keys.numpy(), minlength=self.counts.numel())
                self.counts += torch.from_numpy(counted)
            else:
                self.counts += torch.bincount(keys, minlength=self.counts.numel())
            self._pending, self._pending_keys = [], 0

    def total(self) -> Tensor:
        self._flush()
        return self.counts


class _Estimate(NamedTuple):
    """The arithmetic bucket estimate of :meth:`_GridCounter._estimate_of`."""

    next_edges: Tensor  # (G + 1,): edge k + 1 of the grid (rounded up), NaN last
    scale: float
    shift: Tensor  # 0-d, the values' dtype
    on_host: bool  # exact in the NumPy kernels too (twice the rounding error)


class _GridCounter:
    """Per-(class, bucket) histograms of streamed :class:`ChunkPairs` on a fixed grid.

    A pair's bucket is the number of grid points at or below its score (0: below
    ``g_0``), exact: the comparisons are made against the grid rounded up to the scores'
    dtype (``x >= g_i`` iff ``x >= ⌈g_i⌉``). The positive pairs are counted directly; the
    negatives as all pairs minus the positive and the self pairs.
    """

    def __init__(
        self, stream: PairStream, closeness_grid: Tensor, threshold: float | None = None
    ) -> None:
        self.stream = stream
        self.accepted = None if threshold is None else AcceptedCounts(stream, threshold)
        self.grid_size = closeness_grid.shape[0]
        self.num_classes = stream.num_units
        self.grid = closeness_grid.to(torch.float64)
        self._edges: dict[torch.dtype, tuple[Tensor, float, float]] = {}
        size = self.num_classes * (self.grid_size + 1)
        device = stream.queries.device
        # int32 counts (half the memory with many classes) when no count can reach 2^31:
        # a (class, bucket) count is at most (queries) x (references), over all ranks
        world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )
        most = stream.queries.shape[0] * stream.num_references * world
        dtype = torch.int32 if most < 2**31 else torch.int64
        self.positive = _KeyCounts(size, device, dtype)
        self.negative = _KeyCounts(size, device, dtype)
        # sync-free counting: positive keys in [0, size), negative ones in [size, 2 size),
        # then the dump slots of the pairs below the grid
        self.dense = (
            torch.zeros(2 * size + DUMP_SLOTS, dtype=dtype, device=device)
            if stream.sync_free
            else None
        )

    def add(self, pairs: ChunkPairs) -> None:
        """Count the pairs of one chunk (gathered at or below ``g_0``)."""
        row_key = self.stream.query_unit[pairs.start : pairs.end] * (self.grid_size + 1)
        all_keys = torch.repeat_interleave(
            row_key, pairs.row_counts, output_size=pairs.values.numel()
        )
        self.negative.add(all_keys + self.buckets(pairs.values))
        positive_keys = row_key.index_select(0, pairs.positive_rows)
        positive_keys += self.buckets(pairs.positive_values)
        self.positive.add(positive_keys)
        self.negative.add(positive_keys, -1)
        self_keys = row_key.index_select(0, pairs.self_rows) + self.buckets(pairs.self_values)
        self.negative.add(self_keys, -1)
        if self.accepted is not None:
            self.accepted.add(pairs)

    def add_tile(self, tile: DenseTile) -> None:
        """Count every pair of one tile (sync-free: dense buckets, one ``index_add_``)."""
        assert self.dense is not None
        stride = self.grid_size + 1
        size = self.num_classes * stride
        buckets = self.dense_buckets(tile.scores)
        keys = buckets + self.stream.query_unit[tile.start : tile.end, None] * stride
        negative = tile.negative()
        if negative is None:
            keys += size
        else:
            keys += negative.to(torch.int64) * size
        below = dump_slots(keys.numel(), 2 * size, keys.device).view(keys.shape)
        keys = torch.where(buckets == 0, below, keys)  # (bucket 0 is never read)
        if tile.self_pair is None:
            weights = torch.ones((), dtype=self.dense.dtype, device=keys.device)
            weights = weights.expand(keys.numel())
        else:
            weights = (~tile.self_pair).to(self.dense.dtype).view(-1)
        self.dense.index_add_(0, keys.view(-1), weights)
        if self.accepted is not None:
            self.accepted.add_tile(tile)

    def dense_buckets(self, values: Tensor) -> Tensor:
        """:meth:`buckets` of every value, NaN in bucket 0, without a host sync (a
        ``searchsorted`` on the rounded-up grid: exact). Any shape; int64, same shape."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        values = values.to(dtype)
        edges, _, _ = self._edges_of(dtype, values.device)
        count = torch.searchsorted(edges[1:-1], values.contiguous(), right=True)
        return count.masked_fill_(torch.isnan(values), 0)

    # a slab with more unit runs than rows / this is counted by keys, not run by run
    RUN_ROWS = 16

    def add_slab(self, slab: PositiveSlab) -> None:
        """Count a large class's positive slab where it lies (no pair gathered): a
        histogram of each unit run's rows, minus the self pairs."""
        block, self_scores, rows_block = self.stream.slab_scores(slab)
        stride = self.grid_size + 1
        row_key = self.stream.query_unit[slab.start : slab.end] * stride
        runs = slab.unit_runs
        if len(runs) == 1 or len(runs) * self.RUN_ROWS <= block.shape[0]:
            for first, last, unit in runs:
                target = self.positive.counts[unit * stride : (unit + 1) * stride]
                target += self.bucket_histogram(block[first:last])
        else:  # many small runs (e.g. one group per query): keyed counts, a tile at a time
            tile_rows = max(1, HISTOGRAM_TILE // block.shape[1])
            for first in range(0, block.shape[0], tile_rows):
                rows = block[first : first + tile_rows]
                keys = self.buckets(rows.reshape(-1)).view(rows.shape)
                keys += row_key[first : first + rows.shape[0], None]
                self.positive.add(keys.reshape(-1))
        if self_scores.numel():
            self.positive.add(row_key + self.buckets(self_scores), -1)
        if self.accepted is not None:
            self.accepted.add_slab(slab, block, self_scores)
        if rows_block is not None:  # (last: the hook may overwrite the block)
            self.stream.hand_over_rows(slab, rows_block)

    def _estimate_of(self, dtype: torch.dtype, device: torch.device) -> _Estimate | None:
        """How :meth:`bucket_histogram` and :meth:`buckets` estimate a ``dtype`` value's
        bucket arithmetically, or ``None`` where the grid is too fine for it to be exact.

        The estimate ``⌊(v - lo) · scale + 3/4⌋`` (clamped, truncated) is exact up to one
        step while its rounding error, about ``eps · scale · |v|`` near the range, stays
        below 1/8 of a bucket: it lies 1/4 below the exact position, so it is the bucket
        or the one below, and one compare with the next edge settles it."""
        edges, lo, hi = self._edges_of(dtype, device)
        size = self.grid_size
        scale = (size - 1) / (hi - lo) if hi > lo else math.inf
        bound = max(abs(lo), abs(hi)) if math.isfinite(lo) and math.isfinite(hi) else math.inf
        margin = torch.finfo(dtype).eps * scale * bound
        # (a scale beyond the dtype's range, as for a 1e-40-wide range, is inf there)
        if not (8 * margin < 1 and scale < torch.finfo(dtype).max / 4):
            return None
        shift = torch.tensor(0.75 - lo * scale, dtype=dtype, device=device)
        # (NumPy rounds the product and the sum apart: twice the rounding error, so the
        # host kernels need the margin for twice the bound)
        return _Estimate(edges[1:], scale, shift, on_host=16 * margin < 1)

    def bucket_histogram(self, values: Tensor) -> Tensor:
        """``(G + 1,)`` int64: how many ``values`` (1-D, or a 2-D block whose rows may be
        strided) fall in each bucket (exact).

        In cache-sized tiles: the arithmetic estimate of each value's bucket is counted,
        then the few values that lie on the other side of an edge than estimated (rounding
        near a grid point) are moved to their bucket (see :meth:`_estimate_of`)."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        size = self.grid_size
        total = torch.zeros(size + 1, dtype=torch.int64, device=values.device)
        estimate = self._estimate_of(dtype, values.device)
        if estimate is None:
            values = values.reshape(-1)
            for start in range(0, values.numel(), HISTOGRAM_TILE):
                tile = values[start : start + HISTOGRAM_TILE].to(dtype)
                total += torch.bincount(self.buckets(tile), minlength=size + 1)
            return total
        next_edges, scale, shift = estimate.next_edges, estimate.scale, estimate.shift
        if values.device.type == "cpu" and estimate.on_host:
            return total + host.bucket_histogram(values.to(dtype), next_edges, scale, shift)
        values = values.reshape(-1)
        for start in range(0, values.numel(), HISTOGRAM_TILE):
            tile = values[start : start + HISTOGRAM_TILE].to(dtype)
            count = torch.add(shift, tile, alpha=scale).clamp_(0, size).to(torch.int64)
            count += tile >= next_edges.index_select(0, count)
            total += torch.bincount(count, minlength=size + 1)
        return total

    def histograms(self) -> tuple[Tensor, Tensor]:
        """``(positive, negative)`` histograms, each ``(U, G)`` int32 or int64 (views of
        the counts: no copy)."""
        shape = (self.num_classes, self.grid_size + 1)
        if self.dense is not None:
            counted = self.dense[: 2 * shape[0] * shape[1]]
            positive, negative = counted.view(2, *shape).unbind(0)
            return positive[:, 1:], negative[:, 1:]
        positive = self.positive.total().view(shape)[:, 1:]
        negative = self.negative.total().view(shape)[:, 1:]
        return positive, negative

    def buckets(self, values: Tensor) -> Tensor:
        """How many grid points are ``<= value``, for each value (int64, exact).

        The grid is evenly spaced, so an arithmetic estimate is off by at most one except
        for degenerate grids; it is corrected against the rounded-up grid and checked,
        and ``searchsorted`` answers whatever the check rejects."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        values = values.to(dtype)
        if values.device.type == "cpu" and values.dim() == 1:
            estimate = self._estimate_of(dtype, values.device)
            if estimate is not None and estimate.on_host:  # (gathered values: never NaN)
                return host.buckets(values, estimate.next_edges, estimate.scale, estimate.shift)
        edges, lo, hi = self._edges_of(dtype, values.device)
        size = self.grid_size
        scale = (size - 1) / (hi - lo) if hi > lo else math.inf
        # (a scale beyond the dtype's range, as for a 1e-40-wide range, would turn
        # 0 * inf into NaN: such grids are searched)
        if not (math.isfinite(lo) and math.isfinite(hi) and scale < torch.finfo(dtype).max / 4):
            return torch.searchsorted(edges[1:-1], values, right=True)
        count = ((values - lo) * scale).floor_().add_(1).clamp_(0, size)
        count = count.to(torch.int64)
        count += (values >= edges.index_select(0, count + 1)).to(torch.int64)
        count -= (values < edges.index_select(0, count)).to(torch.int64)
        low, high = edges.index_select(0, count), edges.index_select(0, count + 1)
        wrong = ((values < low) | (values >= high)).nonzero().squeeze(1)
        if wrong.numel():
            count[wrong] = torch.searchsorted(edges[1:-1], values[wrong], right=True)
        return count

    def _edges_of(self, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, float, float]:
        """``(edges, ⌈g_0⌉, ⌈g_{G-1}⌉)``; ``edges`` is ``(G + 2,)``: ``[-inf, ⌈g_0⌉, ...,
        ⌈g_{G-1}⌉, NaN]`` in ``dtype``, so a value ``v`` has ``k`` grid points at or below
        it iff ``edges[k] <= v`` and not ``v >= edges[k + 1]``."""
        if dtype not in self._edges:
            bounds = ceil_grid(self.grid, dtype).to(device)
            below = torch.full((1,), -math.inf, dtype=dtype, device=device)
            above = torch.full((1,), math.nan, dtype=dtype, device=device)
            edges = torch.cat([below, bounds, above])
            self._edges[dtype] = (edges, float(bounds[0]), float(bounds[-1]))
        return self._edges[dtype]


class AcceptedCounts:
    """Per query row (the stream's sorted order): the pairs at or above a threshold,
    ``(3, N)`` int64 — all pairs, positive pairs, self pairs (the calibration counts and
    the rows the bootstrap resamples)."""

    def __init__(self, stream: PairStream, threshold: float) -> None:
        self.threshold = threshold
        self.rows = torch.zeros(
            3, stream.queries.shape[0], dtype=torch.int64, device=stream.queries.device
        )

    def add(self, pairs: ChunkPairs) -> None:
        """The pairs of one chunk, gathered at or below the threshold."""
        limit = ceil_to_dtype(self.threshold, pairs.values.dtype)
        rows = self.rows[:, pairs.start : pairs.end]
        passed = torch.cumsum((pairs.values >= limit).to(torch.int64), 0)
        ends = torch.cumsum(pairs.row_counts, 0)
        at_ends = torch.cat([passed.new_zeros(1), passed]).index_select(0, ends)
        rows[0] += torch.diff(at_ends, prepend=at_ends.new_zeros(1))
        size = pairs.end - pairs.start
        for slot, values, of_row in (
            (1, pairs.positive_values, pairs.positive_rows),
            (2, pairs.self_values, pairs.self_rows),
        ):
            rows[slot] += torch.bincount(of_row[values >= limit], minlength=size)

    def add_tile(self, tile: DenseTile) -> None:
        """Every pair of one tile (sync-free: dense compares and row sums)."""
        accepted = tile.scores >= ceil_to_dtype(self.threshold, tile.scores.dtype)
        rows = self.rows[:, tile.start : tile.end]
        rows[0] += accepted.sum(dim=1)
        if tile.positive is not None:
            rows[1] += (accepted & tile.positive).sum(dim=1)
        if tile.self_pair is not None:
            rows[2] += (accepted & tile.self_pair).sum(dim=1)

    def add_slab(self, slab: PositiveSlab, block: Tensor, self_scores: Tensor) -> None:
        """A positive slab's ``(rows, columns)`` block and its rows' self-pair scores."""
        limit = ceil_to_dtype(self.threshold, block.dtype)
        if block.device.type == "cpu" and block.dtype in (torch.float32, torch.float64):
            every = host.row_counts_at_or_above(block, limit)
        else:
            every = (block >= limit).sum(dim=1)
        rows = self.rows[:, slab.start : slab.end]
        selves = (self_scores >= limit).to(torch.int64) if self_scores.numel() else 0
        rows[0] += every
        rows[1] += every - selves
        rows[2] += selves

    def error_counts(self) -> tuple[Tensor, Tensor]:
        """``(false_accepts, true_accepts)`` of each query row, ``(N,)`` int64 each."""
        every, positives, selves = self.rows
        return every - positives - selves, positives


def grid_histograms(
    *,
    stream: PairStream,
    closeness_grid: Tensor,
    retained: Iterable[ChunkPairs] | None = None,
    threshold: float | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Positive and negative histograms of the stream's pairs on the grid.

    Args:
        stream: the pairs of this rank's queries.
        closeness_grid: ``(G,)`` ascending closeness thresholds.
        retained: the pairs of every piece, gathered at or below ``g_0`` (kept by the FAR
            search), or ``None`` for a pass over all pieces. The large classes' positive
            slabs are counted in place after them. A sync-free stream makes its own dense
            pass over every piece and slab (its FAR search retains nothing).

        threshold: also count, per query row, the pairs ``>= threshold`` (a calibrated
            threshold, in the same pass; ``retained`` must reach down to it).

    Returns:
        ``(positive, negative, accepted)``: ``positive`` and ``negative`` are ``(U, G)``
        int32 (int64 where a count could pass 2^31), ``[c, i]`` counting the pairs of
        class ``c`` with score in ``[g_i, g_{i+1})`` (the last bucket is ``[g_{G-1}, ∞)``);
        ``accepted`` is ``(2, N)`` int64, the negative and the positive pairs
        ``>= threshold`` of each query row in the stream's order (``None`` without
        ``threshold``; :meth:`PairStream.per_unit` sums them per unit).
    """
    counter = _GridCounter(stream, closeness_grid, threshold)
    if stream.sync_free:
        for piece in stream.dense_pieces():
            for tile in stream.dense_tiles(piece):
                counter.add_tile(tile)
        retained = ()
    elif retained is None:
        floor = (
            float(closeness_grid[0])
            if threshold is None
            else min(float(closeness_grid[0]), threshold)
        )
        retained = (stream.scan(floor, piece) for piece in stream.pieces())
    for pairs in retained:
        counter.add(pairs)
    for slab in () if stream.sync_free else stream.positive_slabs():
        counter.add_slab(slab)
    positive, negative = counter.histograms()
    if counter.accepted is None:
        return positive, negative, None
    return positive, negative, torch.stack(counter.accepted.error_counts())

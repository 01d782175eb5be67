"""Pair streaming: the pairs of query chunks against the whole reference set.

Owns the score function type and its default (cosine similarity), the chunk size, and
:class:`PairStream`, which yields each chunk's pairs at or above a *floor* as
:class:`ChunkPairs`. The OPIS counting, the exact FAR search and the calibration all
read the pairs through it.

Pairs are (query, reference); when the reference set includes the queries, the self
pair of query ``i`` is reference ``i + self_offset`` and is neither positive nor
negative (:mod:`pml_tcm.functional.pairs`). Everything runs on a *closeness score*: the
similarity itself, or minus the distance (negation is exact, so no value changes).

Queries are processed in chunks of ``chunk_size`` rows against the whole reference set;
an ``(chunk, M)`` score block is the largest temporary, the ``N × M`` matrix is never
built. With the default cosine score the block (and a mask of the same shape) live in
buffers reused by every chunk. Each block is filtered once, at the lowest threshold of
interest (the *floor*): one compare into the mask, then ``nonzero`` over the mask read
as 64-bit words and over the few words holding a hit give the flat positions
``row · M + column`` of the pairs ``>= floor``. Their scores are gathered with
``index_select`` and stored with a count per query row (a pair's class is its row's
class), no label per pair. The positive pairs (same label, self pair excluded) and the
self pairs are gathered directly from the block at positions known from the labels (or,
when a chunk has more same-label pairs than pairs above the floor, as with few classes,
the positives are found among the latter by their labels), so the negatives are never
separated: every count of negatives is all pairs minus positives minus self pairs.

That gathering makes the host wait for the device several times per chunk (each
``nonzero`` sizes its output). Off the CPU the stream is *sync-free* instead
(:data:`SYNC_FREE`): :meth:`PairStream.dense_tiles` hands out each block in row tiles
with its positive and self-pair masks computed from the labels by dense compares, and
the counting, the accepted counts and the FAR search's exact pass consume every pair of a
tile with fixed-shape ops (compares, sums, ``index_add_``, ``index_put_``), so the
number of host syncs of one evaluation does not depend on the number of queries or of
chunks. On the CPU gathering the pairs above the floor is faster, and stays the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from . import host
from .normalize import unit_rows, unit_rows_into

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(queries (n, D), references (M, D)) -> scores (n, M)``, floating point."""


@dataclass(frozen=True)
class HookedRows:
    """Whole score rows handed to a :data:`RowHook`: the stream's query rows ``[start,
    end)`` against every reference (CPU).

    Attributes:
        start: first query row (the stream's sorted order).
        end: one past the last query row.
        block: ``(end - start, M)`` closeness (the hook may overwrite it).
        clamped: whether ``block`` is clamped to ``[-1, 1]`` already (if not, the hook
            clamps what it reads of it).
        positions: ``(K,)`` int64 ascending row-major positions of the block's scores at or
            above the scan's floor, or ``None`` (then the block alone is given).
        values: ``(K,)`` those scores, clamped, or ``None``.
    """

    start: int
    end: int
    block: Tensor
    clamped: bool = True
    positions: Tensor | None = None
    values: Tensor | None = None


RowHook = Callable[[HookedRows], None]
"""Called with the :class:`HookedRows` of every query row once, by :meth:`PairStream.scan`
(with the pairs above its floor) or :meth:`PairStream.hand_over_rows`."""

DEFAULT_BLOCK_ELEMENTS = 1 << 26
"""Scores per block on an accelerator (kernel launches per chunk dominate small blocks)."""
CPU_BLOCK_ELEMENTS = 1 << 23
"""Scores per block on the CPU: the block (32 MiB in float32) stands beside the data
(no slower than larger blocks there, and a quarter of a 125 MB set's size)."""
MAX_CHUNK_ROWS = 4096


MIN_GEMM_ROWS = 8
"""Both operands of a score product get at least this many rows: with fewer, BLAS takes
a matrix-vector path whose rounding differs, and a score would depend on how the queries
were chunked (identical rows came out as 0.99999994, 1.0 or 1.0000001)."""


def unit_products(
    queries: Tensor, references: Tensor, out: Tensor | None = None, clamp: bool = True
) -> Tensor:
    """``queries @ references.T`` of unit rows, clamped to ``[-1, 1]`` (unless ``clamp``
    is ``False``: the caller clamps), with the same rounding whatever the number of rows
    (see :data:`MIN_GEMM_ROWS`). ``(n, D), (M, D) -> (n, M)``, written into ``out`` when
    given."""
    rows, columns = queries.shape[0], references.shape[0]
    if rows < MIN_GEMM_ROWS:
        queries = torch.cat([queries, queries.new_zeros(MIN_GEMM_ROWS - rows, queries.shape[1])])
    if columns < MIN_GEMM_ROWS:
        references = torch.cat(
            [references, references.new_zeros(MIN_GEMM_ROWS - columns, references.shape[1])]
        )
    if out is not None and rows >= MIN_GEMM_ROWS and columns >= MIN_GEMM_ROWS:
        torch.mm(queries, references.T, out=out)
    else:
        product = (queries @ references.T)[:rows, :columns]
        out = product.contiguous() if out is None else out.copy_(product)
    return out.clamp_(-1.0, 1.0) if clamp else out


def cosine_similarity_scores(queries: Tensor, references: Tensor) -> Tensor:
    """Cosine similarity of every query with every reference, clamped to ``[-1, 1]``
    (rounding can put the cosine of identical rows just above 1).

    Args:
        queries: ``(n, D)`` floating point.
        references: ``(M, D)`` floating point, same dtype.

    Returns:
        ``(n, M)`` similarities (a zero row has similarity 0 with everything).
    """
    return unit_products(unit_rows(queries), unit_rows(references))


def default_chunk_size(num_references: int, device: torch.device | str | None = None) -> int:
    """Query rows per chunk: an ``(rows, M)`` block of about :data:`CPU_BLOCK_ELEMENTS`
    scores on the CPU (``device`` ``None`` or CPU), :data:`DEFAULT_BLOCK_ELEMENTS`
    elsewhere; 1..4096 rows."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    elements = CPU_BLOCK_ELEMENTS if on_cpu else DEFAULT_BLOCK_ELEMENTS
    return max(1, min(MAX_CHUNK_ROWS, elements // max(1, num_references)))


def ceil_to_dtype(value: float, dtype: torch.dtype) -> float:
    """The smallest ``dtype`` value ``>= value`` (as a Python float).

    For ``x`` of that dtype, ``x >= value`` (exact, in the reals) is ``x >= result``, and
    ``result`` converts to the dtype without rounding, so a compare in the tensor's own
    dtype is exact."""
    if math.isinf(value) or math.isnan(value):
        return value
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(rounded) < value:
        rounded = torch.nextafter(rounded, torch.tensor(math.inf, dtype=dtype))
    return float(rounded)


SYNC_FREE: bool | None = None
"""Whether a :class:`PairStream` counts its pairs densely, without host syncs (see the
module docstring): ``None`` (default) on every device but the CPU; ``True``/``False``
force it (read when a stream is made)."""

DENSE_TILE_ELEMENTS = 1 << 22
"""Scores per tile of :meth:`PairStream.dense_tiles` (bounds the int64 keys and masks
made from a tile)."""

DUMP_SLOTS = 1 << 12
"""Slots over which the sync-free counting spreads the updates it discards (pairs below
the grid, pairs outside a FAR bracket): most pairs are discarded, and device atomics on a
single address would be serialized."""


def dump_slots(count: int, base: int, device: torch.device) -> Tensor:
    """``(count,)`` int64 indices ``base + (i mod DUMP_SLOTS)``: where discarded updates
    go (see :data:`DUMP_SLOTS`)."""
    return torch.arange(count, device=device).bitwise_and_(DUMP_SLOTS - 1).add_(base)


def stream_order(labels: Tensor, groups: Tensor | None = None) -> Tensor:
    """The order :class:`PairStream` holds rows in: by label, then by group within a
    label (both stable). ``(N,)`` int64."""
    if groups is None:
        return torch.argsort(labels, stable=True)
    by_group = torch.argsort(groups, stable=True)
    return by_group.index_select(0, torch.argsort(labels.index_select(0, by_group), stable=True))


GUIDE_GROUP_ROWS = 64
"""Query rows of :meth:`PairStream.negative_sample` that share one random draw of
references (pairs sharing a reference are correlated; a draw per few rows spreads them)."""

LARGE_CLASS_REFERENCES = 256
"""A query class with at least this many references is *large*: its rows are streamed in
chunks of their own, the columns of the other classes (all negative pairs) in the main
pass and its own columns (all positive pairs) only once the grid is known, where they are
histogrammed in place instead of gathered (see :meth:`PairStream.positive_slabs`)."""


@dataclass(frozen=True)
class Piece:
    """Query rows ``[start, end)`` against reference columns ``[column_start,
    column_end)`` (the stream's sorted order); ``negative_only``: every pair is negative
    (the other classes' columns of a large class's chunk)."""

    start: int
    end: int
    column_start: int
    column_end: int
    negative_only: bool

    @property
    def width(self) -> int:
        return self.column_end - self.column_start


@dataclass(frozen=True)
class PositiveSlab:
    """The rows ``[start, end)`` of large class ``class_index`` against its own reference
    columns ``[column_start, column_end)``: positive pairs, plus each row's self pair when
    the references include the queries. ``unit_runs`` splits the rows by accounting unit
    (:attr:`PairStream.query_unit`): ``(first_row, last_row, unit)`` with rows relative
    to ``start``, one run covering every row when the units are the classes."""

    start: int
    end: int
    class_index: int
    column_start: int
    column_end: int
    unit_runs: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class DenseTile:
    """Query rows ``[start, end)`` of a piece or slab against its columns, every pair.

    Attributes:
        start: first query row (the stream's sorted order).
        end: one past the last query row.
        scores: ``(end - start, width)`` closeness (a view of the reused block buffer,
            valid until the next block).
        positive: ``(end - start, width)`` bool, the positive pairs (same label, not
            the self pair), or ``None`` when every pair is negative.
        self_pair: ``(end - start, width)`` bool, the self pairs, or ``None`` without any.
    """

    start: int
    end: int
    scores: Tensor
    positive: Tensor | None
    self_pair: Tensor | None

    def negative(self) -> Tensor | None:
        """``(end - start, width)`` bool, the negative pairs (``None``: all of them)."""
        if self.positive is None:
            return None
        negative = ~self.positive
        if self.self_pair is not None:
            negative &= ~self.self_pair
        return negative


@dataclass
class ChunkPairs:
    """The pairs of one :class:`Piece` whose score is ``>= floor``.

    ``values`` holds every such pair (positive, negative and self pair alike) in row-major
    order, ``row_counts`` how many of them each query row has: the class of a pair is the
    class of its row, so no per-pair label is stored. The positive pairs (same label, not
    the self pair) and the self pairs are gathered directly by position and kept apart, so
    the negatives are ``values`` minus both (counted, never separated). A
    ``negative_only`` piece has neither.

    Attributes:
        start: first query row.
        end: one past the last query row.
        values: ``(P,)`` scores of all pairs ``>= floor`` (never NaN).
        row_counts: ``(end - start,)`` int64, pairs of ``values`` per query row.
        positive_values: scores of the positive pairs ``>= floor``.
        positive_rows: ``(len(positive_values),)`` int64 rows (relative to ``start``).
        self_values: scores of the self pairs ``>= floor``.
        self_rows: int64 rows of the self pairs (relative to ``start``).
        negative_only: every pair of ``values`` is negative.
        width: columns of the piece (``positions`` are ``row · width + column``).
        column_start: the piece's first reference column.
        positions: ``(P,)`` int64 ``row · width + column`` of ``values`` (relative rows and
            columns), or ``None`` once dropped (only the FAR search needs it).
    """

    start: int
    end: int
    values: Tensor
    row_counts: Tensor
    positive_values: Tensor
    positive_rows: Tensor
    self_values: Tensor
    self_rows: Tensor
    negative_only: bool = False
    width: int = 0
    column_start: int = 0
    positions: Tensor | None = None

    @property
    def size(self) -> int:
        """Memory held, in scores' worth: every stored score, plus the int64 row of each
        positive and self pair (with few classes most gathered pairs are positives)."""
        with_rows = self.positive_values.numel() + self.self_values.numel()
        return self.values.numel() + with_rows * (1 + 8 // self.values.element_size())


class PairStream:
    """The query chunks of one rank against the full reference set.

    Queries and references are held sorted by class (stable), so that each class's
    references are one column range: the rows of a large class (at least
    :data:`LARGE_CLASS_REFERENCES` references) form chunks of their own whose pairs split
    into negative-only pieces (the other columns) and one positive slab (its own
    columns). Results do not depend on the order (every count is per class or pooled).

    Every count is kept per *accounting unit* of the query: its class, or its group when
    ``query_groups`` is given (a group's pairs are the pairs of its queries; within a
    class the rows are sorted by group, so a large class's slab splits into runs of one
    group each).

    With the default :func:`cosine_similarity_scores` both sets are normalized once and
    every block is written into one reused buffer (a fresh block per chunk costs page
    faults comparable to the matrix product itself); the values are bit-equal to calling
    the score function on the rows. Any other ``score_fn`` is called per block.

    ``row_hook`` (:data:`RowHook`, default ``None``), when set, receives every query row's
    whole block once: a small class's chunk (every reference column) the first time
    :meth:`scan` scores it, a large class's chunk when its positive slab is counted (then
    scored over every column, its own the slab: half a pass more with two classes). The
    report ranks the queries there (R@1, MAP@R); :meth:`unhooked_rows` are the rows it
    never saw.

    Args:
        queries: ``(N, D)`` floating point (this rank's shard).
        query_labels: ``(N,)`` int64, each one of ``classes``.
        references: ``(M, D)``, same dtype and device.
        reference_labels: ``(M,)`` int64.
        classes: ``(C,)`` sorted distinct labels (a pair's class is its query's).
        self_offset: position of query 0 in the reference set when the references include
            the queries (self pairs are skipped), else ``None``.
        score_fn: scores of a query block against the references.
        higher_is_closer: ``False`` for a distance (closeness = minus the score).
        chunk_size: query rows per block, or ``None`` for :func:`default_chunk_size`.
        query_groups: ``(N,)`` int64 group ids in ``[0, num_groups)``, or ``None`` to
            count per class.
        num_groups: the number of groups (over all ranks), with ``query_groups``.
        rows_are_unit: the cosine score's rows are unit rows already; when they are
            also in the stream's order (sorted by class, then group) they are used as
            they are, without the sorted copy.
    """

    def __init__(
        self,
        *,
        queries: Tensor,
        query_labels: Tensor,
        references: Tensor,
        reference_labels: Tensor,
        classes: Tensor,
        self_offset: int | None,
        score_fn: ScoreFn,
        higher_is_closer: bool,
        chunk_size: int | None,
        query_groups: Tensor | None = None,
        num_groups: int = 0,
        rows_are_unit: bool = False,
    ) -> None:
        self.rows_are_unit = rows_are_unit
        query_order = stream_order(query_labels, query_groups)
        self.query_order = query_order
        same_sets = references is queries and reference_labels is query_labels
        reference_order = query_order if same_sets else torch.argsort(reference_labels, stable=True)
        self.cosine = score_fn is cosine_similarity_scores
        self.queries = self._sorted_rows(queries, query_order)
        self.references = (
            self.queries if same_sets else self._sorted_rows(references, reference_order)
        )
        self.query_labels = query_labels.index_select(0, query_order)
        self.reference_labels = reference_labels.index_select(0, reference_order)
        self.classes = classes
        self.query_class = torch.searchsorted(classes, self.query_labels)
        self.query_group = (
            None if query_groups is None else query_groups.index_select(0, query_order)
        )
        self.query_unit = self.query_class if self.query_group is None else self.query_group
        self.num_units = classes.shape[0] if query_groups is None else int(num_groups)
        self.self_columns: Tensor | None = None
        if self_offset is not None:
            position = torch.empty_like(reference_order)
            position[reference_order] = torch.arange(
                reference_order.numel(), device=reference_order.device
            )
            self.self_columns = position.index_select(0, query_order + self_offset)
        self.score_fn = score_fn
        self.higher_is_closer = higher_is_closer
        self.chunk_size = chunk_size or default_chunk_size(
            self.references.shape[0], self.references.device
        )
        self.reference_first = torch.searchsorted(self.reference_labels, classes)
        self.reference_count = (
            torch.searchsorted(self.reference_labels, classes, right=True) - self.reference_first
        )
        self._score_buffer: Tensor | None = None
        self._mask_buffer: Tensor | None = None
        self._positive_pair_ends: list[int] | None = None
        self.sync_free = self.queries.device.type != "cpu" if SYNC_FREE is None else SYNC_FREE
        self._pieces, self._slabs = self._plan()
        self.row_hook: RowHook | None = None
        self._hooked_pieces: set[int] = set()
        self._hooked_slabs: set[int] = set()

    def unhooked_rows(self) -> Tensor:
        """``(K,)`` int64 stream rows never handed to :attr:`row_hook` (rows of a piece
        not scanned or of a slab not counted with the hook set)."""
        missed = torch.ones(self.queries.shape[0], dtype=torch.bool)
        for piece in self._pieces:
            if piece.start in self._hooked_pieces:
                missed[piece.start : piece.end] = False
        for slab in self._slabs:
            if slab.start in self._hooked_slabs:
                missed[slab.start : slab.end] = False
        return missed.nonzero().squeeze(1)

    def _sorted_rows(self, rows: Tensor, order: Tensor) -> Tensor:
        if self.rows_are_unit and torch.equal(
            order, torch.arange(order.numel(), device=order.device)
        ):
            return rows  # unit rows already in class order (the report's): no copy
        sorted_rows = rows.index_select(0, order)
        return unit_rows_into(sorted_rows) if self.cosine else sorted_rows  # (our copy)

    @property
    def num_references(self) -> int:
        return self.references.shape[0]

    def _plan(self) -> tuple[list[Piece], list[PositiveSlab]]:
        """The pieces of the main pass and the positive slabs (host-side, one copy of the
        per-class counts)."""
        num_queries, width = self.queries.shape[0], self.num_references
        queries_per_class = torch.bincount(self.query_class, minlength=self.classes.shape[0])
        runs = torch.stack([queries_per_class, self.reference_first, self.reference_count])
        pieces: list[Piece] = []
        slabs: list[PositiveSlab] = []
        small_start = row = 0

        def small_run(end: int) -> None:
            for start in range(small_start, end, self.chunk_size):
                pieces.append(Piece(start, min(end, start + self.chunk_size), 0, width, False))

        for index, (rows, first, count) in enumerate(runs.T.cpu().tolist()):
            if rows == 0:
                continue
            if count >= LARGE_CLASS_REFERENCES:
                small_run(row)
                for start in range(row, row + rows, self.chunk_size):
                    end = min(row + rows, start + self.chunk_size)
                    if first > 0:
                        pieces.append(Piece(start, end, 0, first, True))
                    if first + count < width:
                        pieces.append(Piece(start, end, first + count, width, True))
                    slabs.append(
                        PositiveSlab(
                            start, end, index, first, first + count, ((0, end - start, index),)
                        )
                    )
                small_start = row + rows
            row += rows
        small_run(num_queries)
        if self.query_group is not None and not self.sync_free:  # (dense: keyed per row)
            slabs = [self._split_by_unit(slab) for slab in slabs]
        return pieces, slabs

    def _split_by_unit(self, slab: PositiveSlab) -> PositiveSlab:
        """``slab`` with one unit run per group among its rows (sorted by group)."""
        units = self.query_unit[slab.start : slab.end]
        change = (units[1:] != units[:-1]).nonzero().squeeze(1) + 1
        bounds = [0, *change.cpu().tolist(), slab.end - slab.start]
        firsts = units.index_select(0, torch.tensor(bounds[:-1], device=units.device))
        runs = tuple(zip(bounds[:-1], bounds[1:], firsts.cpu().tolist()))
        return PositiveSlab(
            slab.start, slab.end, slab.class_index, slab.column_start, slab.column_end, runs
        )

    def pieces(self) -> list[Piece]:
        """The pieces of the main pass, in row order."""
        return self._pieces

    def positive_slabs(self) -> list[PositiveSlab]:
        """The positive slabs of the large classes (empty without any)."""
        return self._slabs

    def dense_pieces(self) -> list[Piece]:
        """Every piece of the main pass, then each positive slab as a piece: all the
        pairs, for the sync-free counting."""
        slabs = [Piece(s.start, s.end, s.column_start, s.column_end, False) for s in self._slabs]
        return self._pieces + slabs

    def dense_tiles(self, piece: Piece) -> Iterator[DenseTile]:
        """Every pair of ``piece`` in row tiles of about :data:`DENSE_TILE_ELEMENTS`
        scores, with masks from the labels (no host sync; each tile is valid until the
        next block)."""
        block = self.closeness(piece.start, piece.end, piece.column_start, piece.column_end)
        tile_rows = max(1, DENSE_TILE_ELEMENTS // max(1, piece.width))
        columns = torch.arange(piece.column_start, piece.column_end, device=block.device)
        column_labels = self.reference_labels[piece.column_start : piece.column_end]
        for first in range(0, piece.end - piece.start, tile_rows):
            scores = block[first : first + tile_rows]
            start = piece.start + first
            end = start + scores.shape[0]
            if piece.negative_only:
                yield DenseTile(start, end, scores, None, None)
                continue
            positive = self.query_labels[start:end, None] == column_labels[None, :]
            self_pair = None
            if self.self_columns is not None:
                self_pair = columns[None, :] == self.self_columns[start:end, None]
                positive &= ~self_pair
            yield DenseTile(start, end, scores, positive, self_pair)

    def query_pair_totals(self) -> tuple[Tensor, Tensor]:
        """``(positives, negatives)`` of each query row (sorted order), ``(N,)`` int64
        each, from label counts alone (no score)."""
        same = self.reference_count.index_select(0, self.query_class)
        positives = same - 1 if self.self_columns is not None else same
        return positives, self.num_references - same

    def pair_totals(self) -> tuple[Tensor, Tensor]:
        """``(positives, negatives)`` per accounting unit, ``(U,)`` int64 each: all pairs
        of this rank's queries, from label counts alone (no score)."""
        return tuple(self.per_unit(totals) for totals in self.query_pair_totals())

    def per_unit(self, per_row: Tensor) -> Tensor:
        """Sums of a per-row ``(..., N)`` int64 tensor per accounting unit: ``(..., U)``."""
        out = per_row.new_zeros(*per_row.shape[:-1], self.num_units)
        return out.index_add_(-1, self.query_unit, per_row)

    def release_buffers(self) -> None:
        """Free the score block and the mask kept between chunks (made again if needed):
        what stays is the stream's rows and per-row bookkeeping."""
        self._score_buffer = self._mask_buffer = None

    def _block_capacity(self) -> int:
        """Scores in the largest block: ``min(chunk_size, N) · M``."""
        return min(self.chunk_size, self.queries.shape[0]) * self.num_references

    def closeness(
        self, start: int, end: int, column_start: int, column_end: int, clamp: bool = True
    ) -> Tensor:
        """The ``(end - start, column_end - column_start)`` closeness block, contiguous;
        with the cosine score it lives in a buffer that the next call overwrites.
        ``clamp=False``: the cosine block is not clamped to ``[-1, 1]`` yet (the caller
        does it)."""
        queries = self.queries[start:end]
        references = self.references[column_start:column_end]
        if self.cosine:
            block = self._buffer_block(queries.shape[0], references.shape[0])
            unit_products(queries, references, out=block, clamp=clamp)
            if not self.higher_is_closer:
                block.neg_()
            return block
        block = self.score_fn(queries, references)
        return (block if self.higher_is_closer else block.neg()).contiguous()

    def _buffer_block(self, rows: int, columns: int) -> Tensor:
        """A ``(rows, columns)`` view of the reused block buffer (at most a chunk's rows
        against every reference)."""
        if self._score_buffer is None:
            self._score_buffer = self.references.new_empty(self._block_capacity())
        return self._score_buffer[: rows * columns].view(rows, columns)

    def _host_filters(self, block_dtype: torch.dtype, device: torch.device) -> bool:
        """Whether :meth:`_positions_at_or_above` runs on the host kernels (CPU)."""
        return device.type == "cpu" and block_dtype in (torch.float32, torch.float64)

    def _positions_at_or_above(self, block: Tensor, floor: float, clamp: bool = False) -> Tensor:
        """Row-major positions (``row · width + column``) of the entries ``>= floor``; NaN
        never passes. One compare into a reused mask, then ``nonzero`` over the mask read
        as 64-bit words (eight entries each) and over the few words that hold a hit.
        ``clamp``: the entries of the block clamped to ``[-1, 1]`` (the host kernels
        leave the block unclamped; elsewhere it is clamped in place)."""
        if self._host_filters(block.dtype, block.device):
            limit = ceil_to_dtype(floor, block.dtype)
            return host.positions_at_or_above(block, limit, clamp=clamp)
        if clamp:
            block.clamp_(-1.0, 1.0)
        count = block.numel()
        padded = -(-count // 8) * 8
        if self._mask_buffer is None or self._mask_buffer.numel() < padded:
            capacity = max(padded, -(-self._block_capacity() // 8) * 8)
            self._mask_buffer = torch.empty(capacity, dtype=torch.bool, device=block.device)
        mask = self._mask_buffer[:padded]
        torch.ge(block, ceil_to_dtype(floor, block.dtype), out=mask[:count].view(block.shape))
        mask[count:].zero_()
        words = mask.view(torch.int64)
        hit_words = words.nonzero().squeeze(1)
        hit_bytes = words.index_select(0, hit_words).view(torch.bool)
        within = hit_bytes.nonzero().squeeze(1)  # 8 · (index in hit_words) + byte
        return hit_words.index_select(0, within >> 3) * 8 + (within & 7)

    def _same_label_positions(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """``(rows, columns)`` of the positive pairs of queries ``[start, end)`` (same label,
        self pair excluded), rows relative to ``start``."""
        row_class = self.query_class[start:end]
        lengths = self.reference_count.index_select(0, row_class)
        device = row_class.device
        rows = torch.repeat_interleave(torch.arange(end - start, device=device), lengths)
        row_begin = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(rows.numel(), device=device) - row_begin.index_select(0, rows)
        columns = self.reference_first.index_select(0, row_class).index_select(0, rows) + within
        if self.self_columns is not None:
            own = self.self_columns[start:end].index_select(0, rows)
            keep = (columns != own).nonzero().squeeze(1)
            rows, columns = rows.index_select(0, keep), columns.index_select(0, keep)
        return rows, columns

    def _positive_pairs(self, start: int, end: int) -> int:
        """Same-label pairs of queries ``[start, end)`` (self pairs included): a host-side
        count (one copy to the host per stream), to pick the cheaper positive gather."""
        if self._positive_pair_ends is None:
            per_row = self.reference_count.index_select(0, self.query_class)
            self._positive_pair_ends = torch.cumsum(per_row, 0).cpu().tolist()
        ends = self._positive_pair_ends
        return ends[end - 1] - (ends[start - 1] if start else 0) if end > start else 0

    def _is_positive(self, rows: Tensor, columns: Tensor, start: int) -> Tensor:
        """Whether the pairs ``(start + rows, columns)`` are positive (bool)."""
        positive = self.query_labels.index_select(0, rows + start) == (
            self.reference_labels.index_select(0, columns)
        )
        if self.self_columns is not None:
            positive &= columns != self.self_columns.index_select(0, rows + start)
        return positive

    def _is_self(self, rows: Tensor, columns: Tensor, start: int) -> Tensor:
        if self.self_columns is None:
            return torch.zeros_like(columns, dtype=torch.bool)
        return columns == self.self_columns.index_select(0, rows + start)

    def _self_positions(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """``(rows, columns)`` of the self pairs of queries ``[start, end)`` (rows relative)."""
        device = self.query_class.device
        if self.self_columns is None:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty
        return torch.arange(end - start, device=device), self.self_columns[start:end]

    def scan(self, floor: float, piece: Piece, keep_positions: bool = False) -> ChunkPairs:
        """The pairs of ``piece`` with closeness ``>= floor`` (one block, filtered once);
        ``keep_positions`` keeps their flat positions (FAR search)."""
        start, end = piece.start, piece.end
        # the host filter compares the unclamped cosine block as if clamped: only the
        # scores taken from it are clamped (a pass over the whole block saved)
        fused = self.cosine and self._host_filters(self.queries.dtype, self.queries.device)
        block = self.closeness(start, end, piece.column_start, piece.column_end, clamp=not fused)
        flat_block = block.view(-1)
        width = piece.width
        positions = self._positions_at_or_above(block, floor, clamp=fused)
        values = flat_block.index_select(0, positions)
        if fused:
            values.clamp_(-1.0, 1.0)
        boundaries = torch.arange(end - start + 1, device=positions.device) * width
        row_counts = torch.diff(torch.searchsorted(positions, boundaries))
        empty_rows = torch.zeros(0, dtype=torch.int64, device=positions.device)
        empty = values[:0]
        pairs = ChunkPairs(
            start=start,
            end=end,
            values=values,
            row_counts=row_counts,
            positive_values=empty,
            positive_rows=empty_rows,
            self_values=empty,
            self_rows=empty_rows,
            negative_only=piece.negative_only,
            width=width,
            column_start=piece.column_start,
            positions=positions if keep_positions else None,
        )
        if piece.negative_only:
            return pairs
        floor_value = ceil_to_dtype(floor, block.dtype)

        def gather(rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
            scores = flat_block.index_select(0, rows * width + columns)
            if fused:
                scores.clamp_(-1.0, 1.0)
            kept = (scores >= floor_value).nonzero().squeeze(1)
            return scores.index_select(0, kept), rows.index_select(0, kept)

        if self._positive_pairs(start, end) <= positions.numel():
            pairs.positive_values, pairs.positive_rows = gather(
                *self._same_label_positions(start, end)
            )
        else:  # few classes: fewer pairs pass the floor than there are positives
            rows = torch.div(positions, width, rounding_mode="floor")
            kept = self._is_positive(rows, positions - rows * width, start).nonzero().squeeze(1)
            pairs.positive_values = values.index_select(0, kept)
            pairs.positive_rows = rows.index_select(0, kept)
        pairs.self_values, pairs.self_rows = gather(*self._self_positions(start, end))
        if (
            self.row_hook is not None
            and width == self.num_references
            and start not in self._hooked_pieces
            and block.device.type == "cpu"
        ):  # whole rows, once each (the hook may overwrite the block: it is done with)
            self._hooked_pieces.add(start)
            self.row_hook(HookedRows(start, end, block, not fused, positions, values))
        return pairs

    def negatives_of(self, pairs: ChunkPairs, selected: Tensor) -> Tensor:
        """Which of ``pairs.values[selected]`` are negative pairs (bool, same length)."""
        if pairs.negative_only:
            return torch.ones_like(selected, dtype=torch.bool)
        assert pairs.positions is not None
        positions = pairs.positions.index_select(0, selected)
        rows = torch.div(positions, pairs.width, rounding_mode="floor")
        columns = positions - rows * pairs.width + pairs.column_start
        same = self.query_labels.index_select(0, rows + pairs.start) == (
            self.reference_labels.index_select(0, columns)
        )
        return ~same & ~self._is_self(rows, columns, pairs.start)

    def pairs_at_or_above(self, floor: float, piece: Piece) -> tuple[Tensor, Tensor, Tensor]:
        """Pairs of ``piece`` with score ``>= floor`` (self pairs dropped).

        Returns ``(scores, class_index, is_positive)``, each 1-D. NaN scores never pass.
        """
        block = self.closeness(piece.start, piece.end, piece.column_start, piece.column_end)
        positions = self._positions_at_or_above(block, floor)
        values = block.view(-1).index_select(0, positions)
        rows = torch.div(positions, piece.width, rounding_mode="floor")
        if piece.negative_only:
            is_positive = torch.zeros_like(rows, dtype=torch.bool)
        else:
            columns = positions - rows * piece.width + piece.column_start
            keep = (~self._is_self(rows, columns, piece.start)).nonzero().squeeze(1)
            rows, values = rows.index_select(0, keep), values.index_select(0, keep)
            is_positive = self._is_positive(rows, columns.index_select(0, keep), piece.start)
        return values, self.query_class.index_select(0, rows + piece.start), is_positive

    def slab_scores(self, slab: PositiveSlab) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(block, self_scores, rows)``: the slab's ``(rows, columns)`` closeness block
        (every entry a positive pair except the self pairs), the closeness of each row's
        self pair (empty without self pairs), and, when a :attr:`row_hook` is set (CPU), the
        whole rows the block is a column range of (hand them over with
        :meth:`hand_over_rows` once done with the block; ``None`` otherwise). The block may
        live in the reused buffer."""
        whole = self.row_hook is not None and self.queries.device.type == "cpu"
        first_column = 0 if whole else slab.column_start
        end_column = self.num_references if whole else slab.column_end
        rows_block = self.closeness(slab.start, slab.end, first_column, end_column)
        block = rows_block[:, slab.column_start - first_column : slab.column_end - first_column]
        if self.self_columns is None:
            self_scores = block.new_zeros(0)
        else:
            columns = self.self_columns[slab.start : slab.end] - first_column
            rows = torch.arange(slab.end - slab.start, device=columns.device)
            flat = rows_block.view(-1)
            self_scores = flat.index_select(0, rows * rows_block.shape[1] + columns)
        return block, self_scores, rows_block if whole else None

    def hand_over_rows(self, slab: PositiveSlab, rows_block: Tensor) -> None:
        """Give the :attr:`row_hook` the whole rows of ``slab`` (from :meth:`slab_scores`)."""
        if self.row_hook is not None and slab.start not in self._hooked_slabs:
            self._hooked_slabs.add(slab.start)
            self.row_hook(HookedRows(slab.start, slab.end, rows_block))

    def positive_values(self) -> Iterator[Tensor]:
        """The positive closeness scores, one 1-D tensor per piece or slab (NaN marks a
        slab's self pairs; a slab's tensor is a view of the reused block buffer, valid
        until the next block)."""
        for piece in self._pieces:
            if not piece.negative_only:
                block = self.closeness(piece.start, piece.end, 0, self.num_references)
                rows, columns = self._same_label_positions(piece.start, piece.end)
                yield block.view(-1).index_select(0, rows * self.num_references + columns)
        for slab in self._slabs:
            block = self.closeness(slab.start, slab.end, slab.column_start, slab.column_end)
            if self.self_columns is not None:
                columns = self.self_columns[slab.start : slab.end] - slab.column_start
                rows = torch.arange(block.shape[0], device=block.device)
                block.view(-1)[rows * block.shape[1] + columns] = math.nan
            yield block.view(-1)

    def negative_sample(
        self, rows: Tensor, budget: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """About ``budget`` scores of the given query rows' pairs, NaN where the pair is
        not negative (guide only; no more than that is ever held). The rows go in groups
        of :data:`GUIDE_GROUP_ROWS`, each against its own random references (drawn with
        replacement from ``generator``), so that only the sampled pairs are scored."""
        num_rows, num_references = rows.shape[0], self.num_references
        if num_rows == 0 or num_references == 0:
            return self.queries.new_zeros(0)
        width = min(num_references, max(1, -(-budget // num_rows)))
        device = self.queries.device
        groups = -(-num_rows // GUIDE_GROUP_ROWS)
        if width < num_references:  # (drawn on the host at once: one copy, not one a group)
            drawn = torch.randint(num_references, (groups, width), generator=generator)
            drawn = drawn.to(device)
        else:
            drawn = torch.arange(num_references, device=device).expand(groups, width)
        out = []
        for group, start in enumerate(range(0, num_rows, GUIDE_GROUP_ROWS)):
            picked = rows[start : start + GUIDE_GROUP_ROWS]
            columns = drawn[group]
            queries = self.queries.index_select(0, picked)
            references = self.references.index_select(0, columns)
            if self.cosine:
                block = unit_products(queries, references)
            else:
                block = self.score_fn(queries, references)
            block = block if self.higher_is_closer else block.neg()
            query_labels = self.query_labels.index_select(0, picked)
            negative = query_labels[:, None] != self.reference_labels.index_select(0, columns)
            out.append(torch.where(negative, block, math.nan).reshape(-1))
        return torch.cat(out)

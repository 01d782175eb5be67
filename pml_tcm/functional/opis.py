"""OPIS and ε-OPIS (threshold consistency of a metric-learning embedding), as tensor math.

Definition
----------
Pairs are (query, reference). When the reference set includes the query set (pml's
``ref_includes_query``, or no reference given) a sample is never paired with itself:
the reference set *is* the query set, in the same order, and the self pair of query
``i`` is reference ``i + query_offset`` (the convention of
:func:`pml_tcm.functional.pairs.pair_masks`). A pair is a *match* at threshold ``t``
when its similarity is ``>= t`` (for a distance, where smaller is closer, when its
distance is ``<= t``). For a set of pairs, ``TP(t)``, ``FP(t)``, ``FN(t)`` count the
positive pairs accepted, the negative pairs accepted and the positive pairs rejected;
the utility is the F-β score::

    U(t) = (1 + β²) TP / ((1 + β²) TP + β² FN + FP),   0 when the denominator is 0.

* ``U_c(t)``: over the pairs whose query has label ``c``; ``U_all(t)``: all pairs pooled.
* Calibration range ``[t_lo, t_hi]``: given, or from FAR bounds ``(far_lo, far_hi)`` on
  the pooled negative pairs: ``t(f)`` is the k-th largest negative similarity with
  ``k = max(1, ⌈f · n_neg⌉)``; ``t_lo = t(far_hi)``, ``t_hi = t(far_lo)``. ``⌈f · n⌉``
  is evaluated exactly on the decimal value of ``f`` as Python prints it (0.01 is 1/100).
* Grid: ``num_thresholds`` points ``g_i = t_lo + i · (t_hi - t_lo) / (G - 1)`` evaluated
  in float64 (the last one set to ``t_hi``; the formula of ``numpy.linspace``).
  ``⟨g⟩`` is the trapezoid integral of ``g`` over the grid divided by ``t_hi - t_lo``
  (the plain mean when ``t_hi == t_lo``).
* ``OPIS = mean_c ⟨(U_c - U_all)²⟩``.
* ε-OPIS: rank the classes by ``⟨U_c⟩`` ascending (stable, ties in label order);
  ``W`` = the first ``max(1, ⌈ε · T⌉)`` classes, ``R`` the rest;
  ``ε-OPIS = ⟨(mean_{c∈W} U_c - mean_{c∈R} U_c)²⟩``, 0 when ``R`` is empty.
* The classes are the distinct query labels. A class with **no positive pair** (absent
  from the reference set, or a singleton when the reference set includes the queries)
  has ``U_c = 0`` by the formula; it is *excluded* from the class means of OPIS and
  ε-OPIS (``T`` counts the included classes) and flagged in
  :attr:`OPISResult.excluded`. Its pairs still count in ``U_all``. With fewer than two
  included classes OPIS and ε-OPIS are computed by the same formulas (one class alone
  gives 0 for both).

Distances
---------
Everything runs on a *closeness score*: the similarity itself, or minus the distance
(negation is exact, so no value changes). Thresholds are reported back in the user's
units: for a distance, ``t_lo``/``t_hi`` are the distances at ``far_lo``/``far_hi``
(the k-th smallest negative distance) and :attr:`OPISResult.thresholds` ascends in
distance, with the curves reordered to match.

Streaming
---------
Queries are processed in chunks of ``chunk_size`` rows against the whole reference set;
an ``(chunk, M)`` score block is the largest temporary, the ``N × M`` matrix is never
built. With the default cosine score the block (and a mask of the same shape) live in
buffers reused by every chunk. Each block is filtered once, at the lowest threshold of
interest (the *floor*): one compare into the mask, then ``nonzero`` over the mask read
as 64-bit words and over the few words holding a hit give the flat positions
``row · M + column`` of the pairs ``>= floor``. Their scores are gathered with
``index_select`` and stored with a count per query row (a pair's class is its row's
class), no label per pair. The positive pairs (same label, self pair excluded) and the
self pairs are gathered directly from the block at positions known from the labels,
so the negatives are never separated: every count of negatives is all pairs minus
positives minus self pairs.

Counting buckets each pair into the grid (the number of grid points ``<= score``, from an
arithmetic estimate corrected against the grid rounded up to the scores' dtype, so that
``score >= g_i`` is exact) and counts the keys ``class · (G + 1) + bucket``; reversed
cumulative sums give ``TP_c(g_i)`` and ``FP_c(g_i)``. Pairs below ``t_lo`` only matter
through the per-class totals, which come from label counts without any score.

Exact FAR thresholds
--------------------
The k-th largest negative score is found without holding all pairs:

1. *Guide* (only when there are more negatives than ``collect_limit``): an evenly
   strided sample of about 2^21 pairs of a random 1/16 of the queries, negatives kept, is
   histogrammed; the bins around the target rank, widened by a 6σ sampling margin and one
   bin for rounding, give a bracket ``[lo, hi)``.
2. *Exact pass*: one pass over all chunks, filtered at the lowest ``lo``, counts the
   negatives ``>= hi`` (all minus positives minus self pairs) and collects the negatives
   in ``[lo, hi)`` (labels are looked up for the pairs in the bracket only). If the
   target rank lies in the bracket, sorting the collected values gives the exact k-th
   value; the scores come from the same chunked computation as the counting, so the
   threshold is bit-equal to the k-th largest negative of that score matrix.
3. *Fallback*: if the bracket missed or held more than ``collect_limit`` values, further
   passes split the bracket at up to 255 pivots, count per piece and keep the piece
   holding the rank, until it is small enough to collect (or cannot be split: then all
   its values are equal).

When the pairs gathered by the exact pass (everything ``>= lo``; 4 bytes a pair plus the
positives and self pairs) number at most ``retain_limit`` (2^27 by default, about 0.5 GB),
they are kept and the counting reuses them: the guide plus one pass over the data in
total. Otherwise counting is a further pass.

Sharding
--------
With ``distributed=True`` each rank passes its own query shard (and its offset in the
reference set when the reference includes the queries) and the full reference set; all
counts, brackets, pivot histograms and candidate values are combined with
``torch.distributed`` collectives, so every rank returns the result of one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import Tensor

from . import validation
from .normalize import unit_rows
from .pairs import self_pair_columns

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(queries (n, D), references (M, D)) -> scores (n, M)``, floating point."""

DEFAULT_BLOCK_ELEMENTS = 1 << 26
MAX_CHUNK_ROWS = 4096
GUIDE_FRACTION = 16
GUIDE_BINS = 1 << 16
PIVOTS = 255
GUIDE_BUDGET = 1 << 21


def cosine_similarity_scores(queries: Tensor, references: Tensor) -> Tensor:
    """Cosine similarity of every query with every reference.

    Args:
        queries: ``(n, D)`` floating point.
        references: ``(M, D)`` floating point, same dtype.

    Returns:
        ``(n, M)`` similarities (a zero row has similarity 0 with everything).
    """
    return unit_rows(queries) @ unit_rows(references).T


def ceil_fraction_of(fraction: float, count: int) -> int:
    """``⌈fraction · count⌉`` on the decimal value of ``fraction`` (0.1 · 30 is 3)."""
    return math.ceil(Fraction(repr(float(fraction))) * count)


def default_chunk_size(num_references: int) -> int:
    """Query rows per chunk: an ``(rows, M)`` block of about 2^26 scores, 1..4096 rows."""
    return max(1, min(MAX_CHUNK_ROWS, DEFAULT_BLOCK_ELEMENTS // max(1, num_references)))


# --------------------------------------------------------------------------- data stream


@dataclass
class _ChunkPairs:
    """The pairs of query rows ``[start, end)`` whose score is ``>= floor``.

    ``values`` holds every such pair (positive, negative and self pair alike) in row-major
    order, ``row_counts`` how many of them each query row has: the class of a pair is the
    class of its row, so no per-pair label is stored. The positive pairs (same label, not
    the self pair) and the self pairs are gathered directly by position and kept apart, so
    the negatives are ``values`` minus both (counted, never separated).

    Attributes:
        start: first query row.
        end: one past the last query row.
        values: ``(P,)`` scores of all pairs ``>= floor`` (never NaN).
        row_counts: ``(end - start,)`` int64, pairs of ``values`` per query row.
        positive_values: scores of the positive pairs ``>= floor``.
        positive_rows: ``(len(positive_values),)`` int64 rows (relative to ``start``).
        self_values: scores of the self pairs ``>= floor``.
        self_rows: int64 rows of the self pairs (relative to ``start``).
        positions: ``(P,)`` int64 ``row · M + column`` of ``values`` (relative rows), or
            ``None`` once dropped (only the FAR search needs it).
    """

    start: int
    end: int
    values: Tensor
    row_counts: Tensor
    positive_values: Tensor
    positive_rows: Tensor
    self_values: Tensor
    self_rows: Tensor
    positions: Tensor | None = None

    @property
    def size(self) -> int:
        """Stored scores (all pairs, positives and self pairs)."""
        return self.values.numel() + self.positive_values.numel() + self.self_values.numel()


class _PairStream:
    """The query chunks of one rank against the full reference set.

    With the default :func:`cosine_similarity_scores` the references are normalized once
    and every block is written into one reused buffer (a fresh block per chunk costs page
    faults comparable to the matrix product itself); the values are bit-equal to calling
    the score function on the chunk. Any other ``score_fn`` is called per chunk.
    """

    def __init__(
        self,
        queries: Tensor,
        query_labels: Tensor,
        references: Tensor,
        reference_labels: Tensor,
        classes: Tensor,
        self_offset: int | None,
        score_fn: ScoreFn,
        higher_is_closer: bool,
        chunk_size: int | None,
    ) -> None:
        self.queries = queries
        self.query_labels = query_labels
        self.references = references
        self.reference_labels = reference_labels
        self.classes = classes
        self.query_class = torch.searchsorted(classes, query_labels)
        self.self_offset = self_offset
        self.score_fn = score_fn
        self.higher_is_closer = higher_is_closer
        self.chunk_size = chunk_size or default_chunk_size(references.shape[0])
        self._normalized_references: Tensor | None = None
        self._score_buffer: Tensor | None = None
        self._mask_buffer: Tensor | None = None
        self._same_label_layout: tuple[Tensor, Tensor, Tensor] | None = None

    @property
    def num_references(self) -> int:
        return self.references.shape[0]

    def _block_capacity(self) -> int:
        """Scores in the largest block: ``min(chunk_size, N) · M``."""
        return min(self.chunk_size, self.queries.shape[0]) * self.num_references

    def scores(self, start: int, end: int) -> Tensor:
        """A fresh ``(end - start, M)`` closeness block of queries ``[start, end)``."""
        return self._closeness(self.queries[start:end], reuse_buffer=False)

    def chunks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.queries.shape[0], self.chunk_size):
            yield start, min(start + self.chunk_size, self.queries.shape[0])

    def _closeness(self, queries: Tensor, reuse_buffer: bool = True) -> Tensor:
        """Closeness of ``queries`` (at most ``chunk_size`` rows) against the references,
        contiguous; with ``reuse_buffer`` it may live in a buffer that the next call
        overwrites."""
        rows = queries.shape[0]
        if self.score_fn is cosine_similarity_scores and reuse_buffer:
            if self._normalized_references is None:
                self._normalized_references = unit_rows(self.references)
            references = self._normalized_references
            if self._score_buffer is None:
                self._score_buffer = references.new_empty(self._block_capacity())
            block = self._score_buffer[: rows * self.num_references].view(rows, -1)
            # the same product as cosine_similarity_scores: unit_rows(q) @ unit_rows(r).T
            torch.mm(unit_rows(queries), references.T, out=block)
            if not self.higher_is_closer:
                block.neg_()
            return block
        block = self.score_fn(queries, self.references)
        return (block if self.higher_is_closer else block.neg()).contiguous()

    def _positions_at_or_above(self, block: Tensor, floor: float) -> Tensor:
        """Row-major positions (``row · M + column``) of the entries ``>= floor``; NaN never
        passes. One compare into a reused mask, then ``nonzero`` over the mask read as
        64-bit words (eight entries each) and over the few words that hold a hit."""
        count = block.numel()
        padded = -(-count // 8) * 8
        if self._mask_buffer is None or self._mask_buffer.numel() < padded:
            capacity = max(padded, -(-self._block_capacity() // 8) * 8)
            self._mask_buffer = torch.empty(capacity, dtype=torch.bool, device=block.device)
        mask = self._mask_buffer[:padded]
        torch.ge(block, _ceil_to_dtype(floor, block.dtype), out=mask[:count].view(block.shape))
        mask[count:].zero_()
        words = mask.view(torch.int64)
        hit_words = words.nonzero().squeeze(1)
        hit_bytes = words.index_select(0, hit_words).view(torch.bool)
        within = hit_bytes.nonzero().squeeze(1)  # 8 · (index in hit_words) + byte
        return hit_words.index_select(0, within >> 3) * 8 + (within & 7)

    def _same_label_positions(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """``(rows, columns)`` of the positive pairs of queries ``[start, end)`` (same label,
        self pair excluded), rows relative to ``start``."""
        if self._same_label_layout is None:
            order = torch.argsort(self.reference_labels, stable=True)
            sorted_labels = self.reference_labels.index_select(0, order)
            first = torch.searchsorted(sorted_labels, self.classes)
            count = torch.searchsorted(sorted_labels, self.classes, right=True) - first
            self._same_label_layout = (order, first, count)
        order, first, count = self._same_label_layout
        row_class = self.query_class[start:end]
        lengths = count.index_select(0, row_class)
        device = row_class.device
        rows = torch.repeat_interleave(torch.arange(end - start, device=device), lengths)
        row_begin = torch.cumsum(lengths, 0) - lengths
        within = torch.arange(rows.numel(), device=device) - row_begin.index_select(0, rows)
        row_first = first.index_select(0, row_class).index_select(0, rows)
        columns = order.index_select(0, row_first + within)
        if self.self_offset is not None:
            keep = (
                (columns != self_pair_columns(rows, start + self.self_offset)).nonzero().squeeze(1)
            )
            rows, columns = rows.index_select(0, keep), columns.index_select(0, keep)
        return rows, columns

    def _self_positions(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """``(rows, columns)`` of the self pairs of queries ``[start, end)`` (rows relative)."""
        device = self.query_class.device
        if self.self_offset is None:
            empty = torch.zeros(0, dtype=torch.int64, device=device)
            return empty, empty
        rows = torch.arange(end - start, device=device)
        columns = self_pair_columns(rows, start + self.self_offset)
        inside = columns < self.num_references
        return rows[inside], columns[inside]

    def scan(self, floor: float, start: int, end: int, keep_positions: bool = False) -> _ChunkPairs:
        """The pairs of queries ``[start, end)`` with closeness ``>= floor`` (one block,
        filtered once)."""
        block = self._closeness(self.queries[start:end])
        flat_block = block.view(-1)
        num_references = self.num_references
        positions = self._positions_at_or_above(block, floor)
        values = flat_block.index_select(0, positions)
        boundaries = torch.arange(end - start + 1, device=positions.device) * num_references
        row_counts = torch.diff(torch.searchsorted(positions, boundaries))
        floor_value = _ceil_to_dtype(floor, block.dtype)

        def gather(rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
            scores = flat_block.index_select(0, rows * num_references + columns)
            kept = (scores >= floor_value).nonzero().squeeze(1)
            return scores.index_select(0, kept), rows.index_select(0, kept)

        positive_values, positive_rows = gather(*self._same_label_positions(start, end))
        self_values, self_rows = gather(*self._self_positions(start, end))
        return _ChunkPairs(
            start,
            end,
            values,
            row_counts,
            positive_values,
            positive_rows,
            self_values,
            self_rows,
            positions if keep_positions else None,
        )

    def negatives_of(self, pairs: _ChunkPairs, selected: Tensor) -> Tensor:
        """Which of ``pairs.values[selected]`` are negative pairs (bool, same length)."""
        assert pairs.positions is not None
        positions = pairs.positions.index_select(0, selected)
        rows = torch.div(positions, self.num_references, rounding_mode="floor")
        columns = positions - rows * self.num_references
        negative = self.query_labels.index_select(0, rows + pairs.start) != (
            self.reference_labels.index_select(0, columns)
        )
        if self.self_offset is not None:
            negative &= columns != self_pair_columns(rows, pairs.start + self.self_offset)
        return negative

    def pairs_at_or_above(
        self, floor: float, start: int, end: int, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pairs of queries ``[start, end)`` with score ``>= floor`` (self pairs dropped).

        Returns ``(scores, class_index, is_positive)``, each 1-D. NaN scores never pass.
        """
        block = self._closeness(self.queries[start:end]) if scores is None else scores
        positions = self._positions_at_or_above(block.contiguous(), floor)
        values = block.reshape(-1).index_select(0, positions)
        rows = torch.div(positions, self.num_references, rounding_mode="floor")
        columns = positions - rows * self.num_references
        is_positive = self.query_labels.index_select(0, rows + start) == (
            self.reference_labels.index_select(0, columns)
        )
        if self.self_offset is not None:
            keep = (
                (columns != self_pair_columns(rows, start + self.self_offset)).nonzero().squeeze(1)
            )
            rows, values, is_positive = rows[keep], values[keep], is_positive[keep]
        return values, self.query_class.index_select(0, rows + start), is_positive

    def negative_sample(self, rows: Tensor, budget: int) -> Tensor:
        """Every ``stride``-th pair (row-major) of the blocks of the given query rows, about
        ``budget`` scores, NaN where the pair is not negative (guide only; no more than
        that is ever held)."""
        num_references = max(1, self.num_references)
        stride = max(1, -(-rows.shape[0] * num_references // budget))
        out = []
        for start in range(0, rows.shape[0], self.chunk_size):
            picked = rows[start : start + self.chunk_size]
            block = self._closeness(self.queries.index_select(0, picked))
            positions = torch.arange(0, block.numel(), stride, device=block.device)
            sample_rows = torch.div(positions, num_references, rounding_mode="floor")
            columns = positions - sample_rows * num_references
            negative = self.query_labels.index_select(0, picked).index_select(0, sample_rows) != (
                self.reference_labels.index_select(0, columns)
            )
            out.append(torch.where(negative, block.view(-1)[::stride], math.nan))
        return torch.cat(out) if out else self.queries.new_zeros(0)


def _ceil_to_dtype(value: float, dtype: torch.dtype) -> float:
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


def _ceil_grid(grid: Tensor, dtype: torch.dtype) -> Tensor:
    """``grid`` (float64) rounded up to ``dtype`` elementwise (see :func:`_ceil_to_dtype`),
    in ``dtype``: ``x >= grid[i]`` is ``x >= result[i]`` for every ``x`` of that dtype."""
    if dtype == torch.float64:
        return grid
    rounded = grid.to(dtype)
    low = rounded.to(torch.float64) < grid
    bumped = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return torch.where(low, bumped, rounded)


# --------------------------------------------------------------------------- collectives


def _all_reduce(tensor: Tensor, distributed: bool, op: str = "sum") -> Tensor:
    if distributed:
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=reduce_op[op])
    return tensor


def _all_gather_values(values: Tensor, distributed: bool) -> Tensor:
    """Concatenate a 1-D tensor of any length over all ranks."""
    if not distributed:
        return values
    import torch.distributed as dist

    world = dist.get_world_size()
    length = torch.tensor([values.shape[0]], dtype=torch.int64, device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = max(int(x) for x in lengths)
    padded = values.new_zeros(longest)
    padded[: values.shape[0]] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, lengths)])


def global_classes(query_labels: Tensor, distributed: bool = False) -> Tensor:
    """Sorted distinct query labels, over all ranks when ``distributed``."""
    return torch.unique(_all_gather_values(torch.unique(query_labels), distributed))


# --------------------------------------------------------------------------- state


@dataclass
class OPISState:
    """Additive per-class counts on a threshold grid (merge two states with ``+``).

    Attributes:
        positive_histogram: ``(C, G)`` int64; ``[c, i]`` = positive pairs of class ``c``
            with score in ``[g_i, g_{i+1})`` (the last bucket is ``[g_{G-1}, ∞)``).
        negative_histogram: ``(C, G)`` int64, the same for negative pairs.
        positives: ``(C,)`` int64, all positive pairs of class ``c`` (any score).
        negatives: ``(C,)`` int64, all negative pairs of class ``c``.
    """

    positive_histogram: Tensor
    negative_histogram: Tensor
    positives: Tensor
    negatives: Tensor

    def __add__(self, other: OPISState) -> OPISState:
        return OPISState(
            self.positive_histogram + other.positive_histogram,
            self.negative_histogram + other.negative_histogram,
            self.positives + other.positives,
            self.negatives + other.negatives,
        )

    def all_reduce(self) -> OPISState:
        """Sum the counts over all ranks in place (``torch.distributed``)."""
        for tensor in (
            self.positive_histogram,
            self.negative_histogram,
            self.positives,
            self.negatives,
        ):
            _all_reduce(tensor, True)
        return self


def _pair_totals(stream: _PairStream) -> tuple[Tensor, Tensor]:
    num_classes = stream.classes.shape[0]
    in_classes = torch.isin(stream.reference_labels, stream.classes)
    reference_count = torch.bincount(
        torch.searchsorted(stream.classes, stream.reference_labels[in_classes]),
        minlength=num_classes,
    )
    queries_per_class = torch.bincount(stream.query_class, minlength=num_classes)
    self_pairs = 1 if stream.self_offset is not None else 0
    positives = queries_per_class * (reference_count - self_pairs)
    negatives = queries_per_class * (stream.reference_labels.shape[0] - reference_count)
    return positives, negatives


class _KeyCounts:
    """Counts of int64 keys in ``[0, size)``, each added with a weight of +1 or -1.

    Large batches of +1 keys are held until there are several times ``size`` of them and
    then ``bincount``-ed together (one dense pass of ``size`` per flush, not per chunk);
    small batches are scattered directly with ``index_add_``."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.counts = torch.zeros(size, dtype=torch.int64, device=device)
        self._pending: list[Tensor] = []
        self._pending_keys = 0

    def add(self, keys: Tensor, weight: int = 1) -> None:
        size = self.counts.numel()
        if weight != 1 or 8 * keys.numel() < size:
            step = torch.full((1,), weight, dtype=torch.int64, device=keys.device)
            self.counts.index_add_(0, keys, step.expand(keys.numel()))
            return
        self._pending.append(keys)
        self._pending_keys += keys.numel()
        if self._pending_keys >= 4 * size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            keys = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
            self.counts += torch.bincount(keys, minlength=self.counts.numel())
            self._pending, self._pending_keys = [], 0

    def total(self) -> Tensor:
        self._flush()
        return self.counts


class _GridCounter:
    """Per-(class, bucket) histograms of streamed :class:`_ChunkPairs` on a fixed grid.

    A pair's bucket is the number of grid points at or below its score (0: below
    ``g_0``), exact: the comparisons are made against the grid rounded up to the scores'
    dtype (``x >= g_i`` iff ``x >= ⌈g_i⌉``). The positive pairs are counted directly; the
    negatives as all pairs minus the positive and the self pairs.
    """

    def __init__(self, stream: _PairStream, closeness_grid: Tensor) -> None:
        self.stream = stream
        self.grid_size = closeness_grid.shape[0]
        self.num_classes = stream.classes.shape[0]
        self.grid = closeness_grid.to(torch.float64)
        self._edges: dict[torch.dtype, tuple[Tensor, float, float]] = {}
        size = self.num_classes * (self.grid_size + 1)
        device = stream.queries.device
        self.positive = _KeyCounts(size, device)
        self.negative = _KeyCounts(size, device)

    def add(self, pairs: _ChunkPairs) -> None:
        """Count the pairs of one chunk (gathered at or below ``g_0``)."""
        row_key = self.stream.query_class[pairs.start : pairs.end] * (self.grid_size + 1)
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

    def histograms(self) -> tuple[Tensor, Tensor]:
        """``(positive, negative)`` histograms, each ``(C, G)`` int64."""
        shape = (self.num_classes, self.grid_size + 1)
        positive = self.positive.total().view(shape)[:, 1:].contiguous()
        negative = self.negative.total().view(shape)[:, 1:].contiguous()
        return positive, negative

    def buckets(self, values: Tensor) -> Tensor:
        """How many grid points are ``<= value``, for each value (int64, exact).

        The grid is evenly spaced, so an arithmetic estimate is off by at most one except
        for degenerate grids; it is corrected against the rounded-up grid and checked,
        and ``searchsorted`` answers whatever the check rejects."""
        dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
        values = values.to(dtype)
        edges, lo, hi = self._edges_of(dtype, values.device)
        size = self.grid_size
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            return torch.searchsorted(edges[1:-1], values, right=True)
        count = ((values - lo) * ((size - 1) / (hi - lo))).floor_().add_(1).clamp_(0, size)
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
            bounds = _ceil_grid(self.grid, dtype).to(device)
            below = torch.full((1,), -math.inf, dtype=dtype, device=device)
            above = torch.full((1,), math.nan, dtype=dtype, device=device)
            edges = torch.cat([below, bounds, above])
            self._edges[dtype] = (edges, float(bounds[0]), float(bounds[-1]))
        return self._edges[dtype]


def _count_state(
    stream: _PairStream,
    closeness_grid: Tensor,
    retained: list[_ChunkPairs] | None = None,
) -> OPISState:
    """Counts on the grid: from ``retained`` pairs (gathered at or below ``g_0``) or from
    a pass over all chunks."""
    counter = _GridCounter(stream, closeness_grid)
    if retained is None:
        floor = float(closeness_grid[0])
        retained = (stream.scan(floor, s, e) for s, e in stream.chunks())
    for pairs in retained:
        counter.add(pairs)
    positive_histogram, negative_histogram = counter.histograms()
    positives, negatives = _pair_totals(stream)
    return OPISState(positive_histogram, negative_histogram, positives, negatives)


def opis_update(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor,
    reference_labels: Tensor,
    classes: Tensor,
    closeness_grid: Tensor,
    *,
    self_offset: int | None = None,
    score_fn: ScoreFn = cosine_similarity_scores,
    higher_is_closer: bool = True,
    chunk_size: int | None = None,
) -> OPISState:
    """Per-class counts of a block of queries against the reference set.

    States of disjoint query blocks add up to the state of their union (torchmetrics
    ``_update`` style); no input check is made here (see :func:`opis`).

    Args:
        queries: ``(N, D)`` floating point.
        query_labels: ``(N,)`` int64, each one of ``classes``.
        references: ``(M, D)``, same dtype and device.
        reference_labels: ``(M,)`` int64.
        classes: ``(C,)`` sorted distinct labels (the class index of each row of the state).
        closeness_grid: ``(G,)`` float64 ascending closeness thresholds.
        self_offset: position of query 0 in the reference set when the references include
            the queries (self pairs are skipped), else ``None``.
        score_fn: scores of a query block against the references.
        higher_is_closer: ``False`` for a distance (closeness = minus the score).
        chunk_size: query rows per block (default: :func:`default_chunk_size`).

    Returns:
        The :class:`OPISState` of these queries.
    """
    stream = _PairStream(
        queries,
        query_labels,
        references,
        reference_labels,
        classes,
        self_offset,
        score_fn,
        higher_is_closer,
        chunk_size,
    )
    return _count_state(stream, closeness_grid.to(torch.float64))


# --------------------------------------------------------------------------- result


@dataclass
class OPISResult:
    """OPIS, ε-OPIS and the utility curves they come from.

    Attributes:
        opis: OPIS (float, >= 0).
        eps_opis: ε-OPIS (float, >= 0).
        calibration_range: ``(t_lo, t_hi)`` in the score's units (for a distance,
            ``t_lo < t_hi`` are distances too).
        thresholds: ``(G,)`` float64 grid in the score's units, ascending.
        classes: ``(C,)`` the distinct query labels, ascending.
        class_utility: ``(C, G)`` float64, ``U_c`` at each threshold.
        pooled_utility: ``(G,)`` float64, ``U_all``.
        mean_class_utility: ``(C,)`` float64, ``⟨U_c⟩``.
        excluded: ``(C,)`` bool, classes without a positive pair (left out of the means).
        beta: the β of the F-β utility.
        epsilon: the ε of ε-OPIS.
        higher_is_closer: ``True`` for a similarity, ``False`` for a distance.
        state: the counts the result was computed from.
    """

    opis: float
    eps_opis: float
    calibration_range: tuple[float, float]
    thresholds: Tensor
    classes: Tensor
    class_utility: Tensor
    pooled_utility: Tensor
    mean_class_utility: Tensor
    excluded: Tensor
    beta: float
    epsilon: float
    higher_is_closer: bool = True
    state: OPISState | None = field(default=None, repr=False)


def f_beta(true_positives: Tensor, false_positives: Tensor, positives: Tensor, beta: float):
    """F-β from counts, 0 where the denominator is 0. Broadcasts; returns float64."""
    tp = true_positives.to(torch.float64)
    fp = false_positives.to(torch.float64)
    fn = positives.to(torch.float64) - tp
    weight = 1.0 + beta * beta
    denominator = weight * tp + beta * beta * fn + fp
    utility = weight * tp / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, utility, torch.zeros_like(utility))


def grid_mean(curves: Tensor, closeness_grid: Tensor) -> Tensor:
    """``⟨g⟩`` along the last dimension: trapezoid integral / range, or the plain mean."""
    width = float(closeness_grid[-1] - closeness_grid[0])
    if width <= 0:
        return curves.mean(dim=-1)
    return torch.trapezoid(curves, closeness_grid, dim=-1) / width


def opis_compute(
    state: OPISState,
    classes: Tensor,
    closeness_grid: Tensor,
    *,
    beta: float = 1.0,
    epsilon: float = 0.1,
    higher_is_closer: bool = True,
) -> OPISResult:
    """OPIS, ε-OPIS and the curves from (summed) counts.

    Args:
        state: counts from :func:`opis_update` (summed over blocks/ranks).
        classes: ``(C,)`` the labels of the state's rows.
        closeness_grid: ``(G,)`` float64 ascending closeness thresholds of the state.
        beta: β > 0 of F-β.
        epsilon: ε in (0, 1).
        higher_is_closer: ``False`` to report thresholds as distances.

    Returns:
        The :class:`OPISResult`.
    """
    grid = closeness_grid.to(torch.float64).cpu()
    positive_histogram = state.positive_histogram.cpu()
    negative_histogram = state.negative_histogram.cpu()
    positives = state.positives.cpu()
    true_positives = positive_histogram.flip(-1).cumsum(-1).flip(-1)
    false_positives = negative_histogram.flip(-1).cumsum(-1).flip(-1)
    class_utility = f_beta(true_positives, false_positives, positives.unsqueeze(1), beta)
    pooled_utility = f_beta(true_positives.sum(0), false_positives.sum(0), positives.sum(), beta)
    mean_class_utility = grid_mean(class_utility, grid)
    excluded = positives == 0
    included = (~excluded).nonzero().squeeze(1)

    opis_value = 0.0
    eps_opis_value = 0.0
    num_included = included.shape[0]
    if num_included > 0:
        spread = (class_utility[included] - pooled_utility).square()
        opis_value = float(grid_mean(spread, grid).mean())
        order = torch.sort(mean_class_utility[included], stable=True).indices
        ranked = class_utility[included][order]
        worst = max(1, ceil_fraction_of(epsilon, num_included))
        if worst < num_included:
            gap = ranked[:worst].mean(0) - ranked[worst:].mean(0)
            eps_opis_value = float(grid_mean(gap.square(), grid))

    lo, hi = float(grid[0]), float(grid[-1])
    if higher_is_closer:
        thresholds = grid
        calibration_range = (lo, hi)
    else:
        thresholds = -grid.flip(0)
        class_utility = class_utility.flip(-1)
        pooled_utility = pooled_utility.flip(-1)
        calibration_range = (-hi, -lo)
    return OPISResult(
        opis=opis_value,
        eps_opis=eps_opis_value,
        calibration_range=calibration_range,
        thresholds=thresholds,
        classes=classes.cpu(),
        class_utility=class_utility,
        pooled_utility=pooled_utility,
        mean_class_utility=mean_class_utility,
        excluded=excluded,
        beta=float(beta),
        epsilon=float(epsilon),
        higher_is_closer=higher_is_closer,
        state=state,
    )


def threshold_grid(lo: float, hi: float, num_thresholds: int) -> Tensor:
    """``(G,)`` float64: ``lo + i · (hi - lo) / (G - 1)``, last point ``hi`` exactly."""
    step = (hi - lo) / (num_thresholds - 1)
    grid = torch.arange(num_thresholds, dtype=torch.float64) * step + lo
    grid[-1] = hi
    return grid


# --------------------------------------------------------------------------- FAR search


@dataclass
class _Target:
    rank: int  # 1-based rank from the top among all negatives
    lo: float = -math.inf  # bracket [lo, hi): closeness values
    hi: float = math.inf
    above: int = 0  # negatives >= hi (known before the pass when pivoting)
    inside: int | None = None  # negatives in [lo, hi) when known
    pivots: Tensor | None = None
    value: float | None = None


def _guide_brackets(
    stream: _PairStream, targets: list[_Target], num_negatives: int, distributed: bool, seed: int
) -> None:
    """Set each target's bracket from a histogram of a random 1/16 of the queries."""
    num_queries = stream.queries.shape[0]
    generator = torch.Generator().manual_seed(seed)
    picked = max(1, -(-num_queries // GUIDE_FRACTION))
    rows = torch.randperm(num_queries, generator=generator)[:picked].sort().values
    sample = stream.negative_sample(rows.to(stream.queries.device), GUIDE_BUDGET)
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
    _all_reduce(bounds, distributed, "min")
    low, high = float(bounds[0]), -float(bounds[1])
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return  # keep the whole-range brackets
    # bins of width (high - low) / GUIDE_BINS; bin GUIDE_BINS collects the non-negatives
    bins = ((sample - low) * (GUIDE_BINS / (high - low))).floor_().clamp_(0, GUIDE_BINS - 1)
    bins = torch.where(valid, bins, GUIDE_BINS).to(torch.int64)
    histogram = torch.bincount(bins, minlength=GUIDE_BINS + 1)[:GUIDE_BINS].clone()
    _all_reduce(histogram, distributed)
    sampled = int(histogram.sum())
    if sampled == 0:
        return
    # the bracket search is host-side arithmetic on 2^16 counts: one copy, then no
    # device tensor meets a Python scalar
    from_top = histogram.flip(0).cumsum(0).cpu()
    width = (high - low) / GUIDE_BINS
    for target in targets:
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


def _negatives_at_or_above(pairs: _ChunkPairs, threshold: float) -> Tensor:
    """Negative pairs of ``pairs`` with score ``>= threshold``: all minus the positive and
    self pairs (a 0-d int64 tensor)."""
    limit = _ceil_to_dtype(threshold, pairs.values.dtype)
    return (
        (pairs.values >= limit).sum()
        - (pairs.positive_values >= limit).sum()
        - (pairs.self_values >= limit).sum()
    )


def _negatives_between(stream: _PairStream, pairs: _ChunkPairs, low: float, high: float) -> Tensor:
    """The negative scores of ``pairs`` in ``[low, high)``, as float64 (labels are looked
    up for these pairs only)."""
    values = pairs.values
    inside = values < _ceil_to_dtype(high, values.dtype)
    if low > -math.inf:
        inside &= values >= _ceil_to_dtype(low, values.dtype)
    selected = inside.nonzero().squeeze(1)
    negative = stream.negatives_of(pairs, selected).nonzero().squeeze(1)
    return values.index_select(0, selected.index_select(0, negative)).to(torch.float64)


def _far_closeness_thresholds(
    stream: _PairStream,
    ranks: Sequence[int],
    num_negatives: int,
    distributed: bool,
    collect_limit: int,
    retain_limit: int,
    seed: int,
) -> tuple[list[float], list[_ChunkPairs] | None, float]:
    """Exact k-th largest negative closeness for each rank; retained pairs for counting."""
    targets = [_Target(rank=r) for r in ranks]
    dtype = stream.queries.dtype
    device = stream.queries.device
    if num_negatives > collect_limit:
        _guide_brackets(stream, targets, num_negatives, distributed, seed)

    retained: list[_ChunkPairs] | None = None
    retained_floor = math.inf
    for _ in range(200):
        open_targets = [t for t in targets if t.value is None]
        if not open_targets:
            break
        floor = min(t.lo for t in open_targets)
        keep_pairs: list[_ChunkPairs] | None = []
        kept = 0
        count_slots = 2 + PIVOTS + 1
        counts = torch.zeros(len(open_targets), count_slots, dtype=torch.int64, device=device)
        extremes = torch.full((len(open_targets), 2), math.inf, dtype=torch.float64, device=device)
        collected: list[list[Tensor]] = [[] for _ in open_targets]
        collected_size = [0] * len(open_targets)
        device_pivots = [None if t.pivots is None else t.pivots.to(device) for t in open_targets]
        for start, end in stream.chunks():
            pairs = stream.scan(floor, start, end, keep_positions=True)
            in_bracket: dict[tuple[float, float], Tensor] = {}  # targets may share one
            for j, target in enumerate(open_targets):
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
                    piece = torch.searchsorted(device_pivots[j], inside, right=True)
                    counts[j, 2 : 2 + target.pivots.numel() + 1] += torch.bincount(
                        piece, minlength=target.pivots.numel() + 1
                    )
                elif collected_size[j] <= collect_limit:
                    collected[j].append(inside.to(dtype))
                    collected_size[j] += inside.shape[0]
            pairs.positions = None
            if keep_pairs is not None:
                kept += pairs.size
                if kept <= retain_limit:
                    keep_pairs.append(pairs)
                else:
                    keep_pairs = None
        _all_reduce(counts, distributed)
        _all_reduce(extremes, distributed, "min")
        overflow = torch.tensor(
            [float(s > collect_limit) for s in collected_size], dtype=torch.float64, device=device
        )
        _all_reduce(overflow, distributed, "max")
        # the bracket updates below are host-side: one copy each per pass
        counts, extremes, overflow = counts.cpu(), extremes.cpu(), overflow.cpu()
        if keep_pairs is not None and floor <= retained_floor:
            retained, retained_floor = keep_pairs, floor

        for j, target in enumerate(open_targets):
            above, inside = int(counts[j, 0]), int(counts[j, 1])
            low, high = float(extremes[j, 0]), -float(extremes[j, 1])
            if target.rank <= above:  # the value is >= hi: look above
                target.lo, target.hi, target.above, target.pivots = target.hi, math.inf, 0, None
                continue
            if target.rank > above + inside:  # the value is < lo: look below
                target.above = above + inside
                target.hi, target.lo, target.pivots = target.lo, -math.inf, None
                continue
            target.above = above
            rank_inside = target.rank - above
            if target.pivots is None and not bool(overflow[j]):
                values = _all_gather_values(torch.cat(collected[j]), distributed)
                # the rank_inside-th largest
                kth = values.numel() - rank_inside + 1
                target.value = float(torch.kthvalue(values, kth).values)
                continue
            if target.pivots is not None:
                pieces = counts[j, 2 : 2 + target.pivots.numel() + 1].flip(0).cumsum(0)
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
                inside = int(pieces[piece_from_top]) - already_above
                # the piece's own extremes are unknown; its edges bound it
                low, high = max(target.lo, low), min(target.hi, high)
            target.inside = inside
            if inside <= collect_limit:
                target.pivots = None
                continue
            target.pivots = _next_pivots(low, high, target.hi, dtype)
            if target.pivots is None:  # no value above low in the bracket: all equal low
                target.value = low
    values = [t.value for t in targets]
    return values, retained, retained_floor


# --------------------------------------------------------------------------- entry point


def opis(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor | None = None,
    reference_labels: Tensor | None = None,
    *,
    ref_includes_query: bool = False,
    query_offset: int = 0,
    calibration_range: tuple[float, float] | None = None,
    far_range: tuple[float, float] = (1e-3, 1e-2),
    num_thresholds: int = 1000,
    beta: float = 1.0,
    epsilon: float = 0.1,
    score_fn: ScoreFn = cosine_similarity_scores,
    higher_is_closer: bool = True,
    chunk_size: int | None = None,
    distributed: bool = False,
    collect_limit: int = 1 << 24,
    retain_limit: int = 1 << 27,
    seed: int = 0,
) -> OPISResult:
    """OPIS and ε-OPIS of queries against references (see the module docstring).

    Args:
        queries: ``(N, D)`` float embeddings (this rank's shard when ``distributed``).
        query_labels: ``(N,)`` integer labels.
        references: ``(M, D)`` embeddings, or ``None`` to use the queries (self pairs are
            then skipped, as with ``ref_includes_query``).
        reference_labels: ``(M,)`` labels, required with ``references``.
        ref_includes_query: the references start with the (full) query set, in order;
            the self pair of query ``i`` is reference ``i + query_offset``.
        query_offset: position of query 0 in the reference set (a shard's start).
        calibration_range: explicit ``(t_lo, t_hi)`` in the score's units, or ``None``
            for the FAR-defined range.
        far_range: ``(far_lo, far_hi)`` with ``0 < far_lo <= far_hi <= 1``.
        num_thresholds: grid size ``G >= 2``.
        beta: β > 0 of the F-β utility.
        epsilon: ε in (0, 1).
        score_fn: scores of a query block against the references (default cosine).
        higher_is_closer: ``False`` when ``score_fn`` is a distance.
        chunk_size: query rows per block (default :func:`default_chunk_size`).
        distributed: sum the counts over ``torch.distributed`` ranks.
        collect_limit: most candidate values collected for an exact FAR threshold.
        retain_limit: most gathered pairs kept between the FAR search and the counting
            (a score of 4 bytes each for float32; above it counting is a second pass).
        seed: seed of the guide's random query sample.

    Returns:
        An :class:`OPISResult`. With no negative pair the FAR range is undefined and the
        range falls back to the lowest and highest positive score (``(0, 0)`` without
        any pair); with a single class OPIS and ε-OPIS are 0.

    Raises:
        ValueError: empty sets, NaN/Inf, mismatched lengths or sizes, invalid settings.
    """
    validation.check_opis_settings(calibration_range, far_range, num_thresholds, beta, epsilon)
    validation.check_chunk_size(chunk_size)
    if references is None:
        if reference_labels is not None:
            raise ValueError("reference_labels was given without references")
        references, reference_labels = queries, query_labels
        ref_includes_query = True
    elif reference_labels is None:
        raise ValueError("reference_labels is required with references")
    validation.check_evaluation_set(queries, query_labels, "queries", "query_labels")
    validation.check_evaluation_set(references, reference_labels, "references", "reference_labels")
    if references.shape[1] != queries.shape[1]:
        raise ValueError(
            f"references have embedding size {references.shape[1]} but queries have "
            f"{queries.shape[1]}"
        )
    if references.dtype != queries.dtype:
        references = references.to(queries.dtype)
    if ref_includes_query and query_offset + queries.shape[0] > references.shape[0]:
        raise ValueError(
            "ref_includes_query needs the queries inside the references: query_offset "
            f"{query_offset} + {queries.shape[0]} queries > {references.shape[0]} references"
        )
    query_labels = query_labels.to(device=queries.device, dtype=torch.int64)
    reference_labels = reference_labels.to(device=queries.device, dtype=torch.int64)
    references = references.to(queries.device)

    classes = global_classes(query_labels, distributed)
    stream = _PairStream(
        queries,
        query_labels,
        references,
        reference_labels,
        classes,
        query_offset if ref_includes_query else None,
        score_fn,
        higher_is_closer,
        chunk_size,
    )
    retained = None
    if calibration_range is not None:
        lo, hi = calibration_range
        closeness_range = (lo, hi) if higher_is_closer else (-hi, -lo)
    else:
        positives, negatives = _pair_totals(stream)
        num_negatives = int(_all_reduce(negatives.sum().reshape(1), distributed))
        if num_negatives == 0:
            closeness_range = _positive_score_range(stream, distributed)
        else:
            far_lo, far_hi = far_range
            ranks = [
                max(1, ceil_fraction_of(far_hi, num_negatives)),
                max(1, ceil_fraction_of(far_lo, num_negatives)),
            ]
            (t_lo, t_hi), retained, retained_floor = _far_closeness_thresholds(
                stream, ranks, num_negatives, distributed, collect_limit, retain_limit, seed
            )
            closeness_range = (t_lo, t_hi)
            if retained is not None and retained_floor > t_lo:
                retained = None
    grid = threshold_grid(closeness_range[0], closeness_range[1], num_thresholds)
    state = _count_state(stream, grid.to(queries.device), retained)
    if distributed:
        state.all_reduce()
    return opis_compute(
        state, classes, grid, beta=beta, epsilon=epsilon, higher_is_closer=higher_is_closer
    )


def _positive_score_range(stream: _PairStream, distributed: bool) -> tuple[float, float]:
    extremes = torch.full((2,), math.inf, dtype=torch.float64, device=stream.queries.device)
    for start, end in stream.chunks():
        values, _, _ = stream.pairs_at_or_above(-math.inf, start, end)
        values = values[torch.isfinite(values)].to(torch.float64)
        if values.numel():
            extremes[0] = torch.minimum(extremes[0], values.min())
            extremes[1] = torch.minimum(extremes[1], -values.max())
    _all_reduce(extremes, distributed, "min")
    if not math.isfinite(float(extremes[0])):
        return (0.0, 0.0)
    return (float(extremes[0]), -float(extremes[1]))

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .normalize import unit_rows
from .pairs import self_pair_columns

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(queries (n, D), references (M, D)) -> scores (n, M)``, floating point."""

DEFAULT_BLOCK_ELEMENTS = 1 << 26
MAX_CHUNK_ROWS = 4096


MIN_GEMM_ROWS = 8
"""Both operands of a score product get at least this many rows: with fewer, BLAS takes
a matrix-vector path whose rounding differs, and a score would depend on how the queries
were chunked (identical rows came out as 0.99999994, 1.0 or 1.0000001)."""


def unit_products(queries: Tensor, references: Tensor, out: Tensor | None = None) -> Tensor:
    """``queries @ references.T`` of unit rows, clamped to ``[-1, 1]``, with the same
    rounding whatever the number of rows (see :data:`MIN_GEMM_ROWS`). ``(n, D), (M, D)
    -> (n, M)``, written into ``out`` when given."""
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
    return out.clamp_(-1.0, 1.0)


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


def default_chunk_size(num_references: int) -> int:
    """Query rows per chunk: an ``(rows, M)`` block of about 2^26 scores, 1..4096 rows."""
    return max(1, min(MAX_CHUNK_ROWS, DEFAULT_BLOCK_ELEMENTS // max(1, num_references)))


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


@dataclass
class ChunkPairs:
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
        """Memory held, in scores' worth: every stored score, plus the int64 row of each
        positive and self pair (with few classes most gathered pairs are positives)."""
        with_rows = self.positive_values.numel() + self.self_values.numel()
        return self.values.numel() + with_rows * (1 + 8 // self.values.element_size())


class PairStream:
    """The query chunks of one rank against the full reference set.

    With the default :func:`cosine_similarity_scores` the references are normalized once
    and every block is written into one reused buffer (a fresh block per chunk costs page
    faults comparable to the matrix product itself); the values are bit-equal to calling
    the score function on the chunk. Any other ``score_fn`` is called per chunk.

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
        self._positive_pair_ends: list[int] | None = None

    @property
    def num_references(self) -> int:
        return self.references.shape[0]

    def pair_totals(self) -> tuple[Tensor, Tensor]:
        """``(positives, negatives)`` per class, ``(C,)`` int64 each: all pairs of this
        rank's queries, from label counts alone (no score)."""
        num_classes = self.classes.shape[0]
        in_classes = torch.isin(self.reference_labels, self.classes)
        reference_count = torch.bincount(
            torch.searchsorted(self.classes, self.reference_labels[in_classes]),
            minlength=num_classes,
        )
        queries_per_class = torch.bincount(self.query_class, minlength=num_classes)
        self_pairs = 1 if self.self_offset is not None else 0
        positives = queries_per_class * (reference_count - self_pairs)
        negatives = queries_per_class * (self.reference_labels.shape[0] - reference_count)
        return positives, negatives

    def _block_capacity(self) -> int:
        """Scores in the largest block: ``min(chunk_size, N) · M``."""
        return min(self.chunk_size, self.queries.shape[0]) * self.num_references

    def scores(self, start: int, end: int) -> Tensor:
        """A fresh ``(end - start, M)`` closeness block of queries ``[start, end)``."""
        return self._closeness(self.queries[start:end], reuse_buffer=False)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` of each chunk of query rows, in order."""
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
            # the same values as cosine_similarity_scores(queries, references)
            unit_products(unit_rows(queries), references, out=block)
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
        torch.ge(block, ceil_to_dtype(floor, block.dtype), out=mask[:count].view(block.shape))
        mask[count:].zero_()
        words = mask.view(torch.int64)
        hit_words = words.nonzero().squeeze(1)
        hit_bytes = words.index_select(0, hit_words).view(torch.bool)
        within = hit_bytes.nonzero().squeeze(1)  # 8 · (index in hit_words) + byte
        return hit_words.index_select(0, within >> 3) * 8 + (within & 7)

    def _label_layout(self) -> tuple[Tensor, Tensor, Tensor]:
        """References sorted by label (``order``) and, per class, where its references
        start in that order (``first``) and how many there are (``count``)."""
        if self._same_label_layout is None:
            order = torch.argsort(self.reference_labels, stable=True)
            sorted_labels = self.reference_labels.index_select(0, order)
            first = torch.searchsorted(sorted_labels, self.classes)
            count = torch.searchsorted(sorted_labels, self.classes, right=True) - first
            self._same_label_layout = (order, first, count)
        return self._same_label_layout

    def _same_label_positions(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """``(rows, columns)`` of the positive pairs of queries ``[start, end)`` (same label,
        self pair excluded), rows relative to ``start``."""
        order, first, count = self._label_layout()
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

    def _positive_pairs(self, start: int, end: int) -> int:
        """Same-label pairs of queries ``[start, end)`` (self pairs included): a host-side
        count (one copy to the host per stream), to pick the cheaper positive gather."""
        if self._positive_pair_ends is None:
            per_row = self._label_layout()[2].index_select(0, self.query_class)
            self._positive_pair_ends = torch.cumsum(per_row, 0).cpu().tolist()
        ends = self._positive_pair_ends
        return ends[end - 1] - (ends[start - 1] if start else 0) if end > start else 0

    def _positives_among(
        self, positions: Tensor, values: Tensor, start: int
    ) -> tuple[Tensor, Tensor]:
        """The positive pairs among the pairs at ``positions`` (row-major, rows relative to
        ``start``) with scores ``values``, by looking up both labels of each pair: cheaper
        than :meth:`_same_label_positions` when the positives outnumber these pairs (few
        classes). Returns ``(scores, rows)``."""
        rows = torch.div(positions, self.num_references, rounding_mode="floor")
        columns = positions - rows * self.num_references
        positive = self.query_labels.index_select(0, rows + start) == (
            self.reference_labels.index_select(0, columns)
        )
        if self.self_offset is not None:
            positive &= columns != self_pair_columns(rows, start + self.self_offset)
        kept = positive.nonzero().squeeze(1)
        return values.index_select(0, kept), rows.index_select(0, kept)

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

    def scan(self, floor: float, start: int, end: int, keep_positions: bool = False) -> ChunkPairs:
        """The pairs of queries ``[start, end)`` with closeness ``>= floor`` (one block,
        filtered once); ``keep_positions`` keeps their flat positions (FAR search)."""
        block = self._closeness(self.queries[start:end])
        flat_block = block.view(-1)
        num_references = self.num_references
        positions = self._positions_at_or_above(block, floor)
        values = flat_block.index_select(0, positions)
        boundaries = torch.arange(end - start + 1, device=positions.device) * num_references
        row_counts = torch.diff(torch.searchsorted(positions, boundaries))
        floor_value = ceil_to_dtype(floor, block.dtype)

        def gather(rows: Tensor, columns: Tensor) -> tuple[Tensor, Tensor]:
            scores = flat_block.index_select(0, rows * num_references + columns)
            kept = (scores >= floor_value).nonzero().squeeze(1)
            return scores.index_select(0, kept), rows.index_select(0, kept)

        if self._positive_pairs(start, end) <= positions.numel():
            positive_values, positive_rows = gather(*self._same_label_positions(start, end))
        else:  # few classes: fewer pairs pass the floor than there are positives
            positive_values, positive_rows = self._positives_among(positions, values, start)
        self_values, self_rows = gather(*self._self_positions(start, end))
        return ChunkPairs(
            start=start,
            end=end,
            values=values,
            row_counts=row_counts,
            positive_values=positive_values,
            positive_rows=positive_rows,
            self_values=self_values,
            self_rows=self_rows,
            positions=positions if keep_positions else None,
        )

    def negatives_of(self, pairs: ChunkPairs, selected: Tensor) -> Tensor:
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

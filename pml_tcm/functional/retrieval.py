"""Exact precision@1 and MAP@R in bounded memory, without neighbour lists.

The definitions are pml's (``AccuracyCalculator`` with ``avg_of_avgs=False``): for a query
labelled ``c``, ``R`` is the number of references labelled ``c``, minus the query's own copy
when the reference set includes the queries; queries with ``R = 0`` are left out of both
means. Precision@1 is 1 when the most similar reference is labelled ``c``;
``AP@R = (1/R) Σ_{k <= R} P(k) rel(k)`` over the ``R`` most similar references, ``P(k)``
being the fraction of relevant references among the first ``k``. Each metric is the mean
over the queries (NaN when no query has a positive). Similarity is cosine.

pml asks a k-NN search for ``max R`` neighbours of every query at once (``N × max R``
indices and distances). Here queries run in chunks against the whole reference set: the
``(chunk, M)`` scores become integer keys that sort like the scores, tagged with relevance
in their lowest bit; per query, a partition picks the ``R`` best keys and a sort of those
alone gives the ranks. A relevant and an irrelevant reference with equal scores rank the
irrelevant one first (ties never raise a metric; pml's order among equal distances is
faiss's). The chunk size follows from ``max_bytes``; the ranking (numpy's vectorised
partition and sort, about 20x ``torch.sort`` on CPU) runs on the host, in cache-sized
groups of rows spread over ``num_workers`` threads.

The report needs no pass of its own: :class:`StreamRanking` ranks each query where the
OPIS pass (:class:`~pml_tcm.functional.streaming.PairStream`) scores its whole row, into
:class:`RankSums` that add; :func:`retrieval_sums_of_sets` ranks the rows it left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import host, validation
from .normalize import unit_rows_into
from .prepare import PreparedSets, prepare_sets
from .streaming import HookedRows, PairStream, unit_products

RETRIEVAL_METRICS = ("precision_at_1", "mean_average_precision_at_r")
DEFAULT_MAX_BYTES = 256 * 2**20
GROUP_BYTES = 2**21  # score rows ranked together by one worker: about a core's cache
RAGGED_PART = 1 << 14  # candidates of a chunk ranked by one worker, at least
SELF_SCORE = -1.5  # below every cosine similarity: a query's own copy ranks last


class RetrievalMemoryError(MemoryError):
    """The work of a single query does not fit the memory budget."""


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    ref_includes_query: bool = False,
    include: Sequence[str] = RETRIEVAL_METRICS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
    num_workers: int | None = None,
    *,
    rows_are_unit: bool = False,
) -> dict[str, float]:
    """Precision@1 and MAP@R of ``query`` against ``ref_emb`` (see the module docstring).

    Args:
        query: ``(N, D)`` embeddings, a tensor or NumPy array, checked and converted by
            :func:`~pml_tcm.functional.prepare.prepare_sets` (half precision and
            integers scored in float32, zero-norm rows refused).
        query_labels: ``(N,)`` labels (or ``(N, K)`` label rows) of any real dtype,
            compared by value (:func:`~pml_tcm.functional.labels.dense_class_ids`).
        ref_emb: ``(M, D)`` references on the same device, or ``None`` for the queries
            themselves (self pairs excluded).
        ref_labels: ``(M,)`` labels (with ``ref_emb``), like ``query_labels``.
        ref_includes_query: ``ref_emb[:N]`` are the queries (each query's own copy is
            excluded), as in pml.
        include: metrics to compute, a subset of :data:`RETRIEVAL_METRICS`.
        max_bytes: memory budget of the temporaries (score block on the host, ranking).
        chunk_size: at most this many query rows per chunk (``None``: as the budget allows).
        num_workers: ranking threads (``None``: ``torch.get_num_threads()``).
        rows_are_unit: the float32/float64 rows are unit rows already (as from
            :func:`~pml_tcm.functional.normalize.unit_rows`): scored as they are, without
            a normalised copy of the sets.

    Returns:
        ``{metric: value}`` for the metrics in ``include``.

    Raises:
        ValueError: bad sets or settings.
        RetrievalMemoryError: one query's work needs more than ``max_bytes``.
    """
    if ref_emb is None and ref_labels is not None:
        raise ValueError("ref_labels given without ref_emb")
    _check_settings(include, max_bytes, chunk_size, num_workers)
    sets = prepare_sets(
        query,
        query_labels,
        ref_emb,
        ref_labels,
        ref_includes_query=ref_includes_query,
        names=("query", "query_labels", "ref_emb", "ref_labels"),
    )
    return retrieval_of_sets(
        sets,
        include=include,
        max_bytes=max_bytes,
        chunk_size=chunk_size,
        num_workers=num_workers,
        rows_are_unit=rows_are_unit,
    )


def _check_settings(
    include: Sequence[str], max_bytes: int, chunk_size: int | None, num_workers: int | None
) -> tuple[str, ...]:
    """The checked settings' ``include`` as a tuple (``ValueError`` naming a bad one)."""
    include = _check_include(include)
    validation.check_chunk_size(chunk_size)
    for name, value in (("max_bytes", max_bytes), ("num_workers", num_workers)):
        if (value is not None or name == "max_bytes") and (
            not validation.is_integer(value) or value < 1
        ):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return include


def retrieval_of_sets(
    sets: PreparedSets, *, include: Sequence[str] = RETRIEVAL_METRICS, **settings
) -> dict[str, float]:
    """:func:`retrieval_metrics` of sets already prepared by
    :func:`~pml_tcm.functional.prepare.prepare_sets` (not checked again; the self pairs
    must be those of reference rows ``[0, N)``); ``settings``: the keywords of
    :func:`retrieval_sums_of_sets`."""
    return retrieval_sums_of_sets(sets, include=include, **settings).metrics(tuple(include))


@dataclass
class RankSums:
    """Sums over queries that add (chunks, row subsets): hits at 1, AP@R, and the queries
    counted (those with a positive)."""

    hits: int = 0
    precision: float = 0.0
    queries: int = 0

    def __add__(self, other: RankSums) -> RankSums:
        return RankSums(
            self.hits + other.hits, self.precision + other.precision, self.queries + other.queries
        )

    def metrics(self, include: Sequence[str] = RETRIEVAL_METRICS) -> dict[str, float]:
        """``{metric: mean over the queries}`` (NaN without a query)."""
        if self.queries == 0:
            return dict.fromkeys(include, float("nan"))
        values = {
            "precision_at_1": self.hits / self.queries,
            "mean_average_precision_at_r": self.precision / self.queries,
        }
        return {name: values[name] for name in include}


def retrieval_sums_of_sets(
    sets: PreparedSets,
    *,
    include: Sequence[str] = RETRIEVAL_METRICS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    chunk_size: int | None = None,
    num_workers: int | None = None,
    rows_are_unit: bool = False,
    rows: Tensor | None = None,
) -> RankSums:
    """The :class:`RankSums` of :func:`retrieval_of_sets`, over the query rows ``rows``
    (``(K,)`` int64 indices into ``sets.queries``; ``None``: all)."""
    include = _check_settings(include, max_bytes, chunk_size, num_workers)
    if sets.self_offset not in (None, 0):
        raise ValueError("retrieval needs the queries at the start of the references")
    with torch.no_grad():
        return _metrics(
            sets.queries,
            sets.query_ids,
            None if sets.references_are_queries else sets.references,
            sets.reference_ids,
            sets.self_offset is not None,
            include,
            max_bytes,
            chunk_size,
            num_workers or max(1, torch.get_num_threads()),
            rows_are_unit,
            None if rows is None else rows.cpu().numpy(),
        )


def _positive_counts(
    query_labels: np.ndarray, ref_labels: np.ndarray, ref_includes_query: bool
) -> np.ndarray:
    """``R`` of each query: its references of the same label, less its own copy."""
    classes, class_sizes = np.unique(ref_labels, return_counts=True)
    where = np.searchsorted(classes, query_labels).clip(max=len(classes) - 1)
    found = classes[where] == query_labels
    return np.where(found, class_sizes[where], 0) - int(ref_includes_query)


def _metrics(
    query: Tensor,
    query_labels: Tensor,
    ref_emb: Tensor | None,
    ref_labels: Tensor,
    ref_includes_query: bool,
    include: tuple[str, ...],
    max_bytes: int,
    chunk_size: int | None,
    num_workers: int,
    rows_are_unit: bool = False,
    rows: np.ndarray | None = None,
) -> RankSums:
    dtype = query.dtype if query.dtype in (torch.float32, torch.float64) else torch.float32

    def unit(rows: Tensor) -> Tensor:
        if rows_are_unit and rows.dtype == dtype:
            return rows
        return unit_rows_into(rows, torch.empty(rows.shape, dtype=dtype, device=query.device))

    query_labels, ref_labels = query_labels.cpu().numpy(), ref_labels.cpu().numpy()
    positives = _positive_counts(query_labels, ref_labels, ref_includes_query)
    order = np.flatnonzero(positives > 0)  # pml leaves queries without a positive out
    if rows is not None:
        order = np.intersect1d(order, rows)
    if order.size == 0:
        return RankSums()
    queries = unit(query)
    refs = queries if ref_emb is None else unit(ref_emb)
    order = order[np.argsort(query_labels[order], kind="stable")]
    depth = int(positives[order].max()) if "mean_average_precision_at_r" in include else 1
    chunk_rows, group = _plan(refs.shape[0], dtype.itemsize, depth, num_workers, max_bytes)
    chunk_rows = min(chunk_rows, chunk_size or order.size, order.size)
    buffer = torch.empty((chunk_rows, refs.shape[0]), dtype=dtype)
    ranker = RowRanker(ref_labels, depth, group)
    sums = RankSums()
    with ThreadPoolExecutor(num_workers) as pool:
        for start in range(0, order.size, chunk_rows):
            chunk = order[start : start + chunk_rows]
            scores = _scores(queries, refs, torch.from_numpy(chunk), buffer)
            if ref_includes_query:
                scores[np.arange(chunk.size), chunk] = SELF_SCORE
            sums += ranker.rank(scores, query_labels[chunk], positives[chunk], pool.map)
    return sums


class RowRanker:
    """Ranks whole score rows (every reference of a query) into :class:`RankSums`.

    Args:
        ref_labels: ``(M,)`` the references' labels (the scores' columns).
        depth: the largest ``R`` ranked (1 for precision@1 alone).
        group: score rows ranked together by one task (about a core's cache).
    """

    def __init__(self, ref_labels: np.ndarray, depth: int, group: int) -> None:
        self.ref_labels = ref_labels
        self.depth = depth
        self.group = max(1, group)
        self.harmonic = harmonic_numbers(depth)

    def rank(
        self,
        scores: np.ndarray,
        labels: np.ndarray,
        positives: np.ndarray,
        map_tasks: Callable[..., Iterable[tuple[int, float]]] = map,
    ) -> RankSums:
        """The sums of the rows of ``scores`` (``(n, M)``, overwritten; self pairs already
        at :data:`SELF_SCORE`), rows sorted by label, ``labels`` and ``positives`` (``R``)
        ``(n,)`` each; rows with ``R = 0`` are left out. ``map_tasks``: ``map`` or a
        pool's."""
        depths = np.minimum(positives, self.depth)
        tasks = [
            (scores[low:high], labels[low:high], depths[low:high])
            for low, high in self._row_ranges(labels, depths)
        ]
        sums = RankSums(queries=int(np.count_nonzero(positives > 0)))
        for task_hits, task_precision in map_tasks(self._rank_task, tasks):
            sums.hits += task_hits
            sums.precision += task_precision
        return sums

    def _row_ranges(self, labels: np.ndarray, depths: np.ndarray) -> list[tuple[int, int]]:
        """``[low, high)`` row ranges of at most ``group`` rows ranked by one task: a
        label's rows alone, or consecutive labels of few rows each whose ``R`` all take
        the ``topk`` way (one task per label of a pair or two would spend its time in the
        hand-off, not the ranking). Every row with ``R > 0`` is in one range."""
        bounds = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist(), labels.size]
        ranges: list[tuple[int, int]] = []
        pending: list[int] = []  # [low, high) of the merged labels so far

        def flush() -> None:
            if pending:
                ranges.append((pending[0], pending[1]))
                pending.clear()

        for low, high in zip(bounds[:-1], bounds[1:]):
            depth = int(depths[low])
            if high - low < self.group and depth <= TOPK_DEPTH:
                if pending and high - pending[0] > self.group:
                    flush()
                if pending:
                    pending[1] = high
                elif depth > 0:
                    pending.extend((low, high))
                continue
            flush()
            if depth > 0:
                ranges.extend((g, min(g + self.group, high)) for g in range(low, high, self.group))
        flush()
        return ranges

    def _rank_task(self, task: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, float]:
        scores, labels, depths = task
        if labels[0] == labels[-1]:  # rows sorted by label: one label
            return _rank(scores, self.ref_labels == labels[0], int(depths[0]), self.harmonic)
        relevant = self.ref_labels == labels[:, None]
        return _rank(scores, relevant, depths, self.harmonic)


class StreamRanking:
    """:class:`RankSums` of the whole score rows a cosine
    :class:`~pml_tcm.functional.streaming.PairStream` hands its ``row_hook`` (set it to
    this): each query ranked in the pass that scores its whole row (a small class's chunk
    in the main pass, a large class's with its positive slab), so that no second pass is
    needed; :meth:`PairStream.unhooked_rows` are left to :func:`retrieval_sums_of_sets`.
    A row handed over with the scan's pairs above its floor is ranked from those alone
    when they number at least its ``R`` (``R <=`` :data:`TOPK_DEPTH`; about 1 % of a row
    in the report's pass), the others from the whole row.

    Args:
        stream: the stream (cosine closeness, on the CPU).
        include: the metrics wanted (MAP@R ranks ``R`` deep, precision@1 alone 1 deep).
    """

    def __init__(self, stream: PairStream, include: Sequence[str]) -> None:
        self.labels = stream.query_labels.cpu().numpy()
        ref_labels = stream.reference_labels.cpu().numpy()
        with_self = stream.self_columns is not None
        self.self_columns = stream.self_columns.cpu().numpy() if with_self else None
        self.positives = _positive_counts(self.labels, ref_labels, with_self)
        depth = 1
        if "mean_average_precision_at_r" in include and self.positives.size:
            depth = max(1, int(self.positives.max()))
        score_row = stream.queries.element_size() * max(1, stream.num_references)
        self.ranker = RowRanker(ref_labels, depth, GROUP_BYTES // score_row)
        self.sums = RankSums()

    def __call__(self, rows: HookedRows) -> None:
        start, end = rows.start, rows.end
        labels, positives = self.labels[start:end], self.positives[start:end]
        depths = np.minimum(positives, self.ranker.depth)
        whole = np.ones(end - start, dtype=bool)
        if rows.positions is not None and rows.values is not None:
            whole = self._rank_candidates(rows, depths)
        if not whole.any():
            return
        scores = rows.block.numpy()
        if not whole.all():
            kept = np.flatnonzero(whole)
            scores, labels, positives = scores[kept], labels[kept], positives[kept]
        else:
            kept = np.arange(end - start)
        if not rows.clamped:
            np.minimum(scores, 1.0, out=scores)
            np.maximum(scores, -1.0, out=scores)
        if self.self_columns is not None:
            scores[np.arange(kept.size), self.self_columns[start + kept]] = SELF_SCORE
        self.sums += self.ranker.rank(scores, labels, positives, host.map_on_threads)

    def _rank_candidates(self, rows: HookedRows, depths: np.ndarray) -> np.ndarray:
        """Ranks, into :attr:`sums`, the rows whose scores at or above the scan's floor
        (their *candidates*, self pair aside) number at least their ``R`` (at most
        :data:`TOPK_DEPTH`): every other reference scores below each candidate, so the
        ``R`` best are among them. Returns the ``(n,)`` mask of the rows left to rank
        whole."""
        start, count = rows.start, rows.end - rows.start
        positions = rows.positions.numpy()
        width = rows.block.shape[1]
        row, column = np.divmod(positions, width)
        if self.self_columns is not None:
            other = column != self.self_columns[start + row]
            row, column = row[other], column[other]
            values = rows.values.numpy()[other]
        else:
            values = rows.values.numpy()
        counts = np.bincount(row, minlength=count)
        ranked = (counts >= depths) & (depths > 0) & (depths <= TOPK_DEPTH)
        if ranked.any():
            keep = ranked[row]
            row, column, values = row[keep], column[keep], values[keep]
            relevant = self.ranker.ref_labels[column] == self.labels[start + row]
            # the rows in about equal parts, one a worker
            parts = max(1, min(torch.get_num_threads(), row.size // RAGGED_PART))
            cuts = np.searchsorted(row, np.linspace(0, count, parts + 1)[1:-1])
            bounds = [0, *cuts.tolist(), row.size]

            def rank_part(part: int) -> tuple[int, float]:
                low, high = bounds[part], bounds[part + 1]
                if low == high:
                    return 0, 0.0
                first = int(row[low])
                return _rank_ragged(
                    values[low:high],
                    row[low:high] - first,
                    relevant[low:high],
                    depths[first : int(row[high - 1]) + 1],
                    int(row[high - 1]) + 1 - first,
                    self.ranker.harmonic,
                )

            for hits, precision in host.map_on_threads(rank_part, range(parts)):
                self.sums += RankSums(hits, precision)
            self.sums += RankSums(queries=int(np.count_nonzero(ranked)))
        return ~ranked & (depths > 0)


def _plan(
    num_refs: int, itemsize: int, depth: int, workers: int, max_bytes: int
) -> tuple[int, int]:
    """``(rows per chunk, rows per ranking group)`` within ``max_bytes``.

    A chunk row costs its scores; each worker ranking a group needs the label's relevance
    mask plus, per row, an integer copy of the scores and about 21 bytes per rank.
    """
    score_row = itemsize * num_refs

    def ranking(group: int) -> int:
        return workers * (num_refs + group * (score_row + 21 * depth))

    group = max(1, GROUP_BYTES // score_row)
    while group > 1 and (max_bytes - ranking(group)) // score_row < group:
        group //= 2
    rows = (max_bytes - ranking(group)) // score_row
    if rows < 1:
        need = score_row + ranking(1)
        raise RetrievalMemoryError(
            f"one query needs about {need / 2**20:.3g} MiB ({num_refs} references, R up to "
            f"{depth}, {workers} workers), over the budget of {max_bytes / 2**20:.3g} MiB"
        )
    return rows, min(group, rows)


GATHER_BYTES = 2**24
"""Query rows copied at a time for one block of scores (a chunk's rows are gathered in
pieces this size: with wide rows a chunk's rows would otherwise be a copy of the set)."""


def _scores(queries: Tensor, refs: Tensor, chunk: Tensor, buffer: Tensor) -> np.ndarray:
    """``(len(chunk), M)`` similarities of the chunk's queries, in ``buffer`` (host)."""
    block = buffer[: chunk.numel()]
    first, size = int(chunk[0]), chunk.numel()
    # the usual case (every query has a positive, rows by class): the rows are a view
    consecutive = bool((chunk == torch.arange(first, first + size)).all())
    step = (
        size if consecutive else max(1, GATHER_BYTES // (queries.shape[1] * queries.element_size()))
    )
    for start in range(0, size, step):
        if consecutive:
            rows = queries[first : first + size]
        else:
            rows = queries.index_select(0, chunk[start : start + step].to(queries.device))
        target = block[start : start + rows.shape[0]]
        if queries.device.type == "cpu":
            unit_products(rows, refs, out=target)
        else:
            target.copy_(unit_products(rows, refs))
    return block.numpy()


TOPK_DEPTH = 256
"""Up to this ``R`` a row's ``R`` smallest keys come from ``torch.topk`` (sorted), beyond
it from NumPy's ``partition`` and a sort of those ``R`` (2-core EPYC, rows of 20 000 int32
keys: ``topk`` 26 / 32 / 116 µs a row for R = 1 / 49 / 400, ``partition`` 106-113 µs
whatever R, then the sort: 249 µs in all at R = 10 000 against ``topk``'s 508); R = 1 is
a row's minimum (1.3 µs a row)."""


def _rank(
    scores: np.ndarray, relevant: np.ndarray, r: int | np.ndarray, harmonic: np.ndarray
) -> tuple[int, float]:
    """Hits at 1 and the sum of AP@R over the rows of ``scores`` (``(g, M)``, overwritten),
    ``relevant`` an ``(M,)`` mask (one label) or ``(g, M)``; ``r``: every row's ``R``, or
    each row's own ``(g,)`` (rows with ``R = 0`` count for nothing; all at most the depth
    of ``harmonic``, :func:`harmonic_numbers`)."""
    keys = _rank_keys(scores)
    keys += relevant  # relevant: even, right after irrelevant keys of equal score
    per_row = not isinstance(r, int)
    depth = int(r.max()) if per_row else r
    top = _smallest_keys(keys, depth)
    hits = top[:, 0] & 1 == 0
    if per_row:
        hits &= r > 0
    irrelevant = (top & 1).astype(bool)  # (a bool mask: nonzero over ints costs 3x)
    rows, columns = np.divmod(np.flatnonzero(irrelevant), depth)
    if per_row:
        own = columns < r[rows]  # a row's own R best only
        rows, columns = rows[own], columns[own]
    misses = np.bincount(rows, minlength=top.shape[0])  # irrelevant among a row's R best
    missing = _missing_precision(rows, columns, misses, r, harmonic)
    if per_row:
        counted = r > 0
        precision = float((1.0 - (misses[counted] + missing[counted]) / r[counted]).sum())
    else:
        precision = top.shape[0] - (rows.size + float(missing.sum())) / r
    return int(np.count_nonzero(hits)), precision


def harmonic_numbers(depth: int) -> np.ndarray:
    """``(depth + 1,)`` float64: ``H[k] = 1 + 1/2 + ... + 1/k`` (``H[0] = 0``)."""
    out = np.zeros(depth + 1)
    np.cumsum(1.0 / np.arange(1, depth + 1, dtype=np.float64), out=out[1:])
    return out


def _missing_precision(
    rows: np.ndarray,
    columns: np.ndarray,
    misses: np.ndarray,
    r: int | np.ndarray,
    harmonic: np.ndarray,
) -> np.ndarray:
    """``(g,)`` per row, ``Σ_k rel(k) (1 - P(k))`` over its ``R`` best, from where its
    irrelevant ones rank: ``rows``/``columns`` (row-major) their 0-based places, ``misses``
    ``(g,)`` how many each row has. A relevant
    reference at rank ``k`` after ``t`` irrelevant ones has ``P(k) = (k - t) / k``, so a
    run of them between the ``t``-th and the next irrelevant one, at ranks ``a..b``, misses
    ``t (H[b] - H[a - 1])``; ``AP@R = 1 - (m + Σ that) / R`` with ``m`` the irrelevant
    ones among the ``R`` best."""
    if rows.size == 0:
        return np.zeros(misses.shape[0])
    ranks = columns + 1
    first = np.cumsum(misses) - misses
    t = np.arange(1, rows.size + 1) - first[rows]  # the t-th irrelevant of its row
    run_end = np.empty_like(ranks)  # rank of the run's last relevant reference
    run_end[:-1] = ranks[1:] - 1
    last = first[misses > 0] + misses[misses > 0] - 1
    run_end[last] = r[rows[last]] if not isinstance(r, int) else r
    missing = t * (harmonic[run_end] - harmonic[ranks])
    return np.bincount(rows, weights=missing, minlength=misses.shape[0])


def _rank_ragged(
    scores: np.ndarray,
    rows: np.ndarray,
    relevant: np.ndarray,
    depths: np.ndarray,
    count: int,
    harmonic: np.ndarray,
) -> tuple[int, float]:
    """:func:`_rank` of ragged rows: ``scores`` ``(K,)`` (may be overwritten) of rows
    ``rows`` (``(K,)`` int64 in ``[0, count)``, ascending), ``relevant`` ``(K,)``; row
    ``i`` ranks its ``depths[i]`` best (it has at least that many scores, ``depths[i] <=``
    :data:`TOPK_DEPTH`). The rows are padded to a matrix with :data:`SELF_SCORE`
    (irrelevant, below every score: never among a row's ``R`` best)."""
    sizes = np.bincount(rows, minlength=count)
    counted = np.flatnonzero(sizes)
    first = np.cumsum(sizes) - sizes
    if depths[counted].max(initial=0) == 1:  # R = 1: each row's least key (no matrix)
        keys = _rank_keys(scores)  # (overwrites scores)
        keys += relevant
        hits = int(np.count_nonzero(np.minimum.reduceat(keys, first[counted]) & 1 == 0))
        return hits, float(hits)
    padded = np.full((counted.size, int(sizes.max(initial=1))), SELF_SCORE, dtype=scores.dtype)
    padded_relevant = np.zeros(padded.shape, dtype=bool)
    at = (np.repeat(np.arange(counted.size), sizes[counted]), np.arange(rows.size) - first[rows])
    padded[at] = scores
    padded_relevant[at] = relevant
    return _rank(padded, padded_relevant, depths[counted], harmonic)


def _smallest_keys(keys: np.ndarray, r: int) -> np.ndarray:
    """``(g, r)`` the ``r`` smallest keys of each row of ``keys`` (``(g, M)``, reordered),
    ascending: the ``R`` most similar references, most similar first."""
    if r == 1:
        return keys.min(axis=1, keepdims=True)  # ~20x faster than topk's k = 1
    if r <= TOPK_DEPTH:
        return torch.topk(torch.from_numpy(keys), r, dim=1, largest=False).values.numpy()
    keys.partition(r - 1, axis=1)
    top = keys[:, :r]
    top.sort(axis=1)
    return top


def _rank_keys(scores: np.ndarray) -> np.ndarray:
    """Integer keys, computed in place over ``scores``, whose ascending order is the
    descending order of the scores: ``-2 k - 1`` with ``k`` the score's IEEE bits read as an
    order-preserving integer (``-0.0`` and ``0.0`` share a key). Keys are odd, so adding 1
    to a relevant reference's key ranks it right after irrelevant ones of equal score and
    before any lower score. No overflow for ``|score| < 2``."""
    scores += 0.0  # -0.0 becomes 0.0
    ints = scores.view(np.int32 if scores.dtype == np.float32 else np.int64)
    flip = ints >> (8 * ints.itemsize - 1)  # -1 where negative
    flip &= np.iinfo(ints.dtype).max
    ints ^= flip  # negative scores: -1 - magnitude
    ints <<= 1
    np.invert(ints, out=ints)  # -2 k - 1
    return ints


def _check_include(include: Sequence[str]) -> tuple[str, ...]:
    if isinstance(include, str) or not all(isinstance(m, str) for m in include):
        raise ValueError(f"include must be a sequence of metric names, got {include!r}")
    if not include or any(m not in RETRIEVAL_METRICS for m in include):
        raise ValueError(f"include must name metrics from {RETRIEVAL_METRICS}, got {include!r}")
    return tuple(include)

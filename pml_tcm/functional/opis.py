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
built. Only the pairs whose score is at or above the lowest threshold of interest are
gathered (a compare and a ``nonzero`` over the block); they are bucketed into the grid
with ``searchsorted`` (in float64, so ``score >= g_i`` is exact) and histogrammed per
(class, bucket) with ``bincount``; reversed cumulative sums give ``TP_c(g_i)`` and
``FP_c(g_i)``. Pairs below ``t_lo`` only matter through the per-class totals, which come
from label counts without any score.

Exact FAR thresholds
--------------------
The k-th largest negative score is found without holding all pairs:

1. *Guide* (only when there are more negatives than ``collect_limit``): an evenly
   strided sample of at most 2^23 negative scores of a random 1/16 of the queries is
   histogrammed; the bins around the
   target rank, widened by a 6σ sampling margin and one bin for rounding, give a bracket
   ``[lo, hi)``.
2. *Exact pass*: one pass over all chunks counts the negatives ``>= hi`` and collects the
   negatives in ``[lo, hi)``. If the target rank lies in the bracket, sorting the
   collected values gives the exact k-th value; the scores come from the same chunked
   computation as the counting pass, so the threshold is bit-equal to the k-th largest
   negative of that score matrix.
3. *Fallback*: if the bracket missed or held more than ``collect_limit`` values, further
   passes split the bracket at up to 255 pivots, count per piece and keep the piece
   holding the rank, until it is small enough to collect (or cannot be split: then all
   its values are equal).

When the gathered pairs of the exact pass (everything ``>= lo``) number at most
``retain_limit``, they are kept and the counting reuses them: two passes over the data
in total (guide + one). Otherwise counting is a further pass.

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
import torch.nn.functional as F
from torch import Tensor

from . import validation

ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``(queries (n, D), references (M, D)) -> scores (n, M)``, floating point."""

DEFAULT_BLOCK_ELEMENTS = 1 << 26
MAX_CHUNK_ROWS = 4096
GUIDE_FRACTION = 16
GUIDE_BINS = 1 << 16
PIVOTS = 255
GUIDE_BUDGET = 1 << 23


def cosine_similarity_scores(queries: Tensor, references: Tensor) -> Tensor:
    """Cosine similarity of every query with every reference.

    Args:
        queries: ``(n, D)`` floating point.
        references: ``(M, D)`` floating point, same dtype.

    Returns:
        ``(n, M)`` similarities (a zero row has similarity 0 with everything).
    """
    return F.normalize(queries, dim=1) @ F.normalize(references, dim=1).T


def ceil_fraction_of(fraction: float, count: int) -> int:
    """``⌈fraction · count⌉`` on the decimal value of ``fraction`` (0.1 · 30 is 3)."""
    return math.ceil(Fraction(repr(float(fraction))) * count)


def default_chunk_size(num_references: int) -> int:
    """Query rows per chunk: an ``(rows, M)`` block of about 2^26 scores, 1..4096 rows."""
    return max(1, min(MAX_CHUNK_ROWS, DEFAULT_BLOCK_ELEMENTS // max(1, num_references)))


# --------------------------------------------------------------------------- data stream


class _PairStream:
    """The query chunks of one rank against the full reference set."""

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
        chunk_size: int,
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
        self.chunk_size = chunk_size

    def scores(self, start: int, end: int) -> Tensor:
        block = self.score_fn(self.queries[start:end], self.references)
        if not self.higher_is_closer:
            block = block.neg()
        return block

    def chunks(self) -> Iterator[tuple[int, int]]:
        for start in range(0, self.queries.shape[0], self.chunk_size):
            yield start, min(start + self.chunk_size, self.queries.shape[0])

    def pairs_at_or_above(
        self, floor: float, start: int, end: int, scores: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pairs of queries ``[start, end)`` with score ``>= floor`` (self pairs dropped).

        Returns ``(scores, class_index, is_positive)``, each 1-D. NaN scores never pass.
        """
        if scores is None:
            scores = self.scores(start, end)
        rows, cols = (scores >= _round_down(floor, scores.dtype)).nonzero().unbind(1)
        values = scores[rows, cols]
        is_positive = self.query_labels[start + rows] == self.reference_labels[cols]
        if self.self_offset is not None:
            keep = rows + (start + self.self_offset) != cols
            rows, values, is_positive = rows[keep], values[keep], is_positive[keep]
        return values, self.query_class[start + rows], is_positive

    def negatives_of_rows(self, rows: Tensor, budget: int) -> Tensor:
        """About ``budget`` negative scores of the given query rows, evenly strided
        (guide only; at most ``budget`` values are ever held)."""
        per_row = max(1, self.references.shape[0])
        stride = max(1, -(-rows.shape[0] * per_row // budget))
        out = []
        for start in range(0, rows.shape[0], self.chunk_size):
            picked = rows[start : start + self.chunk_size]
            scores = self.score_fn(self.queries[picked], self.references)
            if not self.higher_is_closer:
                scores = scores.neg()
            negative = self.query_labels[picked].unsqueeze(1) != self.reference_labels
            out.append(scores[negative][::stride].clone())
            del scores, negative
        return torch.cat(out) if out else self.queries.new_zeros(0)


def _round_down(value: float, dtype: torch.dtype) -> float:
    """The largest ``dtype`` value ``<= value`` (so a float32 pre-filter keeps every pair
    that the exact float64 comparison would accept)."""
    if math.isinf(value):
        return value
    rounded = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(rounded) > value:
        rounded = torch.nextafter(rounded, torch.tensor(-math.inf, dtype=dtype))
    return float(rounded)


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


def _histogram(
    values: Tensor, class_index: Tensor, is_positive: Tensor, grid: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    grid_size = grid.shape[0]
    bucket = torch.searchsorted(grid, values.to(torch.float64), right=True) - 1
    accepted = bucket >= 0
    flat = (class_index * grid_size + bucket)[accepted]
    positive = is_positive[accepted]
    size = num_classes * grid_size
    positive_histogram = torch.bincount(flat[positive], minlength=size)
    negative_histogram = torch.bincount(flat[~positive], minlength=size)
    return (
        positive_histogram.view(num_classes, grid_size),
        negative_histogram.view(num_classes, grid_size),
    )


def _empty_state(num_classes: int, grid_size: int, device: torch.device) -> OPISState:
    zeros = torch.zeros(num_classes, grid_size, dtype=torch.int64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    return OPISState(zeros, zeros.clone(), counts, counts.clone())


def _count_state(
    stream: _PairStream,
    closeness_grid: Tensor,
    retained: list[tuple[Tensor, Tensor, Tensor]] | None = None,
) -> OPISState:
    num_classes = stream.classes.shape[0]
    state = _empty_state(num_classes, closeness_grid.shape[0], stream.queries.device)
    state.positives, state.negatives = _pair_totals(stream)
    if retained is None:
        floor = float(closeness_grid[0])
        retained = (stream.pairs_at_or_above(floor, s, e) for s, e in stream.chunks())
    for values, class_index, is_positive in retained:
        pos, neg = _histogram(values, class_index, is_positive, closeness_grid, num_classes)
        state.positive_histogram += pos
        state.negative_histogram += neg
    return state


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
        chunk_size or default_chunk_size(references.shape[0]),
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
    sample = stream.negatives_of_rows(rows.to(stream.queries.device), GUIDE_BUDGET)
    sample = sample[torch.isfinite(sample)].to(torch.float64)
    bounds = torch.tensor(
        [
            float(sample.min()) if sample.numel() else math.inf,
            -float(sample.max()) if sample.numel() else math.inf,
        ],
        dtype=torch.float64,
        device=stream.queries.device,
    )
    _all_reduce(bounds, distributed, "min")
    low, high = float(bounds[0]), -float(bounds[1])
    if not math.isfinite(low) or not math.isfinite(high) or high <= low:
        return  # keep the whole-range brackets
    histogram = torch.histc(sample, bins=GUIDE_BINS, min=low, max=high).to(torch.int64)
    _all_reduce(histogram, distributed)
    sampled = int(histogram.sum())
    if sampled == 0:
        return
    from_top = histogram.flip(0).cumsum(0)
    width = (high - low) / GUIDE_BINS
    for target in targets:
        expected = target.rank / num_negatives * sampled
        # 6σ of a binomial count plus 2% for the correlation of pairs sharing a query
        margin = 6.0 * math.sqrt(expected) + 0.02 * expected + 2.0
        top_rank, bottom_rank = expected - margin, expected + margin
        # bins counted from the top; a bin holding rank r is the first with from_top >= r
        top_bin = int(torch.searchsorted(from_top, torch.tensor(max(top_rank, 0.0)).double()))
        bottom_bin = int(torch.searchsorted(from_top, torch.tensor(bottom_rank).double()))
        # one more bin on each side for histc's rounding at bin edges
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


def _far_closeness_thresholds(
    stream: _PairStream,
    ranks: Sequence[int],
    num_negatives: int,
    distributed: bool,
    collect_limit: int,
    retain_limit: int,
    seed: int,
) -> tuple[list[float], list[tuple[Tensor, Tensor, Tensor]] | None, float]:
    """Exact k-th largest negative closeness for each rank; retained pairs for counting."""
    targets = [_Target(rank=r) for r in ranks]
    dtype = stream.queries.dtype
    device = stream.queries.device
    if num_negatives > collect_limit:
        _guide_brackets(stream, targets, num_negatives, distributed, seed)

    retained: list[tuple[Tensor, Tensor, Tensor]] | None = None
    retained_floor = math.inf
    for _ in range(200):
        open_targets = [t for t in targets if t.value is None]
        if not open_targets:
            break
        floor = min(t.lo for t in open_targets)
        keep_pairs: list[tuple[Tensor, Tensor, Tensor]] | None = []
        kept = 0
        count_slots = 2 + PIVOTS + 1
        counts = torch.zeros(len(open_targets), count_slots, dtype=torch.int64, device=device)
        extremes = torch.full((len(open_targets), 2), math.inf, dtype=torch.float64, device=device)
        collected: list[list[Tensor]] = [[] for _ in open_targets]
        collected_size = [0] * len(open_targets)
        for start, end in stream.chunks():
            values, class_index, is_positive = stream.pairs_at_or_above(floor, start, end)
            if keep_pairs is not None:
                kept += values.shape[0]
                if kept <= retain_limit:
                    keep_pairs.append((values, class_index, is_positive))
                else:
                    keep_pairs = None
            negatives = values[~is_positive].to(torch.float64)
            for j, target in enumerate(open_targets):
                counts[j, 0] += (negatives >= target.hi).sum()
                inside = negatives[(negatives >= target.lo) & (negatives < target.hi)]
                # (float64 copies of float32 scores: exact, and the pivots compare in float64)
                counts[j, 1] += inside.shape[0]
                if inside.numel():
                    extremes[j, 0] = torch.minimum(extremes[j, 0], inside.min())
                    extremes[j, 1] = torch.minimum(extremes[j, 1], -inside.max())
                if target.pivots is not None:
                    piece = torch.searchsorted(target.pivots.to(device), inside, right=True)
                    counts[j, 2 : 2 + target.pivots.numel() + 1] += torch.bincount(
                        piece, minlength=target.pivots.numel() + 1
                    )
                elif collected_size[j] <= collect_limit:
                    collected[j].append(inside.to(dtype))
                    collected_size[j] += inside.shape[0]
        _all_reduce(counts, distributed)
        _all_reduce(extremes, distributed, "min")
        overflow = torch.tensor(
            [float(s > collect_limit) for s in collected_size], dtype=torch.float64, device=device
        )
        _all_reduce(overflow, distributed, "max")
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
                target.value = float(torch.topk(values, rank_inside).values[-1])
                continue
            if target.pivots is not None:
                pieces = counts[j, 2 : 2 + target.pivots.numel() + 1].flip(0).cumsum(0)
                piece_from_top = int(torch.searchsorted(pieces, torch.tensor(rank_inside)))
                piece = target.pivots.numel() - piece_from_top
                edges = torch.cat(
                    [torch.tensor([target.lo]), target.pivots.cpu(), torch.tensor([target.hi])]
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


def check_opis_arguments(
    calibration_range: tuple[float, float] | None,
    far_range: tuple[float, float],
    num_thresholds: int,
    beta: float,
    epsilon: float,
) -> None:
    """Raise a ``ValueError`` naming the argument for an invalid OPIS setting."""
    validation.check_opis_settings(calibration_range, far_range, num_thresholds, beta, epsilon)


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
    retain_limit: int = 1 << 24,
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
        retain_limit: most gathered pairs kept between the FAR search and the counting.
        seed: seed of the guide's random query sample.

    Returns:
        An :class:`OPISResult`. With no negative pair the FAR range is undefined and the
        range falls back to the lowest and highest positive score (``(0, 0)`` without
        any pair); with a single class OPIS and ε-OPIS are 0.

    Raises:
        ValueError: empty sets, NaN/Inf, mismatched lengths or sizes, invalid settings.
    """
    check_opis_arguments(calibration_range, far_range, num_thresholds, beta, epsilon)
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
        chunk_size or default_chunk_size(references.shape[0]),
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

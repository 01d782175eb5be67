"""OPIS and ε-OPIS (threshold consistency of a metric-learning embedding): the metric.

Owns the additive counts (:class:`OPISState`, :func:`opis_update`), the metric computed
from them (:func:`opis_compute`, :class:`OPISResult`, :func:`threshold_grid`; the curves'
math, :func:`f_beta` and :func:`grid_mean`, lives in :mod:`pml_tcm.functional.utility`)
and the entry point :func:`opis`. The definitions (pairs, F-β
utility, FAR-defined calibration range, grid average, OPIS, ε-OPIS, classes without a
positive pair) are those of the documentation's concepts page (section "OPIS and
ε-OPIS"). The pairs are streamed by :mod:`pml_tcm.functional.streaming`, counted by
:mod:`pml_tcm.functional.counting`, the FAR range found by
:mod:`pml_tcm.functional.far_search` and combined over ranks by
:mod:`pml_tcm.functional.collectives`.

Everything runs on a *closeness score*: the similarity itself, or minus the distance
(negation is exact, so no value changes). Thresholds are reported back in the user's
units: for a distance, ``t_lo``/``t_hi`` are the distances at ``far_lo``/``far_hi``
(the k-th smallest negative distance) and :attr:`OPISResult.thresholds` ascends in
distance, with the curves reordered to match.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import validation
from .bootstrap import check_bootstrap_settings, opis_replicates, percentile_interval
from .calibration import QueryErrors
from .collectives import all_reduce, global_classes
from .counting import grid_histograms
from .far_search import (
    COLLECT_LIMIT,
    ceil_fraction_of,
    far_closeness_thresholds,
    far_rank,
    num_negative_pairs,
)
from .prepare import PreparedSets, prepare_sets
from .retrieval import RankSums, StreamRanking
from .streaming import ChunkPairs, PairStream, ScoreFn, cosine_similarity_scores
from .utility import (
    CLASS_BLOCK_ELEMENTS,
    at_or_above,
    class_curves,
    f_beta,
    grid_mean,  # noqa: F401 (documented here before: still importable from this module)
    mean_weights,
)


@dataclass
class OPISState:
    """Additive per-class counts on a threshold grid (merge two states with ``+``).

    Attributes:
        positive_histogram: ``(C, G)`` int32 (int64 where a count could pass 2^31;
            ``+`` gives int64); ``[c, i]`` = positive pairs of class ``c``
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
        def add(a: Tensor, b: Tensor) -> Tensor:  # in int64: a sum can pass int32
            return a.to(torch.int64) + b.to(torch.int64)

        return OPISState(
            add(self.positive_histogram, other.positive_histogram),
            add(self.negative_histogram, other.negative_histogram),
            add(self.positives, other.positives),
            add(self.negatives, other.negatives),
        )

    def all_reduce(self) -> OPISState:
        """Sum the counts over all ranks in place (``torch.distributed``)."""
        for name in ("positive_histogram", "negative_histogram", "positives", "negatives"):
            tensor = getattr(self, name).contiguous()
            all_reduce(tensor, distributed=True)
            setattr(self, name, tensor)
        return self


def _count_state(
    stream: PairStream,
    closeness_grid: Tensor,
    retained: list[ChunkPairs] | None = None,
) -> OPISState:
    """Counts on the grid: from ``retained`` pairs (gathered at or below ``g_0``) or from
    a pass over all chunks."""
    positive_histogram, negative_histogram, _ = grid_histograms(
        stream=stream, closeness_grid=closeness_grid, retained=retained
    )
    positives, negatives = stream.pair_totals()
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
        chunk_size: query rows per block (default:
            :func:`~pml_tcm.functional.streaming.default_chunk_size`).

    Returns:
        The :class:`OPISState` of these queries.
    """
    stream = PairStream(
        queries=queries,
        query_labels=query_labels,
        references=references,
        reference_labels=reference_labels,
        classes=classes,
        self_offset=self_offset,
        score_fn=score_fn,
        higher_is_closer=higher_is_closer,
        chunk_size=chunk_size,
    )
    return _count_state(stream, closeness_grid.to(torch.float64))


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
        class_utility: ``(C, G)`` float64, ``U_c`` at each threshold (computed from
            ``state`` on first access: with many classes the curves are the largest
            thing a result holds, and OPIS itself never needs them all at once).
        pooled_utility: ``(G,)`` float64, ``U_all``.
        mean_class_utility: ``(C,)`` float64, ``⟨U_c⟩``.
        excluded: ``(C,)`` bool, classes without a positive pair (left out of the means).
        beta: the β of the F-β utility.
        epsilon: the ε of ε-OPIS.
        higher_is_closer: ``True`` for a similarity, ``False`` for a distance.
        state: the counts the result was computed from.
        by: what the rows are: ``"class"``, or ``"group"`` when ``groups`` were given
            (then ``classes`` holds the group of each row and every per-row field is
            per group).
        opis_interval: percentile bootstrap interval ``(lo, hi)`` of OPIS (resampling
            the rows' classes or groups), ``None`` without ``bootstrap``.
        eps_opis_interval: the same for ε-OPIS.
        confidence: the intervals' level (``None`` without them).
    """

    opis: float
    eps_opis: float
    calibration_range: tuple[float, float]
    thresholds: Tensor
    classes: Tensor
    pooled_utility: Tensor
    mean_class_utility: Tensor
    excluded: Tensor
    beta: float
    epsilon: float
    higher_is_closer: bool = True
    state: OPISState | None = field(default=None, repr=False)
    _class_utility: Tensor | None = field(default=None, repr=False)
    by: str = "class"
    opis_interval: tuple[float, float] | None = None
    eps_opis_interval: tuple[float, float] | None = None
    confidence: float | None = None

    @property
    def class_utility(self) -> Tensor:
        if self._class_utility is None:
            assert self.state is not None
            curves = class_curves(self.state, slice(None), self.beta)
            self._class_utility = curves if self.higher_is_closer else curves.flip(-1)
        return self._class_utility


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

    The per-class curves are computed in blocks of classes (memory bounded by
    :data:`CLASS_BLOCK_ELEMENTS`, whatever the number of classes); the result computes
    :attr:`OPISResult.class_utility` only when it is read.

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
    tau = mean_weights(grid)
    num_classes, grid_size = state.positive_histogram.shape
    positives = state.positives.cpu()
    block = max(1, CLASS_BLOCK_ELEMENTS // max(1, grid_size))
    blocks = [(first, min(num_classes, first + block)) for first in range(0, num_classes, block)]

    pooled_tp = torch.zeros(grid_size, dtype=torch.int64)
    pooled_fp = torch.zeros(grid_size, dtype=torch.int64)
    for first, last in blocks:
        pooled_tp += state.positive_histogram[first:last].cpu().to(torch.int64).sum(0)
        pooled_fp += state.negative_histogram[first:last].cpu().to(torch.int64).sum(0)
    pooled_utility = f_beta(at_or_above(pooled_tp), at_or_above(pooled_fp), positives.sum(), beta)
    excluded = positives == 0
    mean_class_utility = torch.zeros(num_classes, dtype=torch.float64)
    spread = torch.zeros(num_classes, dtype=torch.float64)
    included_sum = torch.zeros(grid_size, dtype=torch.float64)  # Σ of the included curves
    included_weight = (~excluded).to(torch.float64)
    for first, last in blocks:
        curves = class_curves(state, slice(first, last), beta)
        mean_class_utility[first:last] = curves @ tau
        included_sum += included_weight[first:last] @ curves
        curves -= pooled_utility
        spread[first:last] = curves.square_() @ tau
    included = (~excluded).nonzero().squeeze(1)

    opis_value = 0.0
    eps_opis_value = 0.0
    num_included = included.shape[0]
    if num_included > 0:
        opis_value = float(spread[included].mean())
        order = torch.sort(mean_class_utility[included], stable=True).indices
        worst = max(1, ceil_fraction_of(epsilon, num_included))
        if worst < num_included:
            # only the worst classes' curves again: the rest's sum is the included sum less theirs
            worst_rows = included[order[:worst]].sort().values
            worst_sum = torch.zeros(grid_size, dtype=torch.float64)
            for first in range(0, worst, block):
                worst_sum += class_curves(state, worst_rows[first : first + block], beta).sum(0)
            rest_sum = included_sum - worst_sum
            gap = worst_sum / worst - rest_sum / (num_included - worst)
            eps_opis_value = float(gap.square() @ tau)

    lo, hi = float(grid[0]), float(grid[-1])
    if higher_is_closer:
        thresholds = grid
        calibration_range = (lo, hi)
    else:
        thresholds = -grid.flip(0)
        pooled_utility = pooled_utility.flip(-1)
        calibration_range = (-hi, -lo)
    return OPISResult(
        opis=opis_value,
        eps_opis=eps_opis_value,
        calibration_range=calibration_range,
        thresholds=thresholds,
        classes=classes.cpu(),
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
    collect_limit: int = COLLECT_LIMIT,
    retain_limit: int = 1 << 27,
    seed: int = 0,
    groups: Tensor | None = None,
    bootstrap: int = 0,
    confidence: float = 0.95,
) -> OPISResult:
    """OPIS and ε-OPIS of queries against references (definitions: the concepts page).

    With ``groups`` the rows are groups instead of classes: a group's pairs are the pairs
    whose query belongs to it, its curve is F-β over the same calibration range and grid,
    and OPIS / ε-OPIS are taken across groups (groups without a positive pair excluded);
    ``groups=query_labels`` gives the class OPIS.

    Args:
        queries: ``(N, D)`` float embeddings (this rank's shard when ``distributed``).
        query_labels: ``(N,)`` labels of any real dtype (or ``(N, K)`` label rows),
            compared by value; ``OPISResult.classes`` holds them as given.
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
        chunk_size: query rows per block (default
            :func:`~pml_tcm.functional.streaming.default_chunk_size`).
        distributed: sum the counts over ``torch.distributed`` ranks.
        collect_limit: most candidate values collected for an exact FAR threshold.
        retain_limit: most memory, in scores' worth, of the gathered pairs kept between
            the FAR search and the counting (4 bytes a score in float32; a positive or
            self pair also keeps an 8-byte row); above it counting is a second pass.
        seed: seed of the guide's random query sample and of the bootstrap.
        groups: ``(N,)`` a group id per query (any label-like dtype, tensor or NumPy),
            at least two groups; ``None`` for classes.
        bootstrap: ``B`` replicates for percentile intervals on OPIS and ε-OPIS
            (resampling the classes, or the groups), ``0`` for none. They come from the
            pass's counts: no second pass over the pairs.
        confidence: the intervals' level in (0, 1).

    Returns:
        An :class:`OPISResult`. With no negative pair the FAR range is undefined and the
        range falls back to the lowest and highest positive score (``(0, 0)`` without
        any pair); with a single class OPIS and ε-OPIS are 0.

    Raises:
        ValueError: naming the argument: bad sets (see
            :func:`~pml_tcm.functional.prepare.prepare_sets`) or invalid settings.
    """
    validation.check_opis_settings(calibration_range, far_range, num_thresholds, beta, epsilon)
    validation.check_chunk_size(chunk_size)
    check_bootstrap_settings(bootstrap, confidence, seed)
    sets = prepare_sets(
        queries,
        query_labels,
        references,
        reference_labels,
        ref_includes_query=ref_includes_query,
        query_offset=query_offset,
        require_direction=score_fn is cosine_similarity_scores,
        distributed=distributed,
        groups=groups,
    )
    return opis_of_sets(
        sets,
        calibration_range=calibration_range,
        far_range=far_range,
        num_thresholds=num_thresholds,
        beta=beta,
        epsilon=epsilon,
        score_fn=score_fn,
        higher_is_closer=higher_is_closer,
        chunk_size=chunk_size,
        distributed=distributed,
        collect_limit=collect_limit,
        retain_limit=retain_limit,
        seed=seed,
        bootstrap=bootstrap,
        confidence=confidence,
    )


def opis_of_sets(sets: PreparedSets, **settings) -> OPISResult:
    """:func:`opis` of sets already prepared by
    :func:`~pml_tcm.functional.prepare.prepare_sets` (settings unchecked; the keywords of
    :func:`evaluate_sets` other than ``target_far``)."""
    return evaluate_sets(sets, **settings).opis


@dataclass
class Evaluation:
    """OPIS and a calibrated threshold from one pass (:func:`evaluate_sets`).

    Attributes:
        opis: the :class:`OPISResult`.
        threshold: the closeness threshold of ``target_far`` (``None`` without one).
        classes: ``(C,)`` int64 sorted query class ids (``errors.classes`` index them).
        errors: this rank's per-query counts at ``threshold`` (``None`` without one).
        ranked: with ``rank``, the R@1 / MAP@R sums of this rank's queries ranked in the
            pass (``None`` when the pass could not rank: another score, a sync-free
            stream).
        unranked: with ``ranked``, ``(K,)`` int64 the rows of ``sets.queries`` the pass
            never scored whole (none when every piece was scanned; rank them apart).
    """

    opis: OPISResult
    threshold: float | None = None
    classes: Tensor | None = None
    errors: QueryErrors | None = None
    ranked: RankSums | None = None
    unranked: Tensor | None = None


def evaluate_sets(
    sets: PreparedSets,
    *,
    target_far: float | None = None,
    calibration_range: tuple[float, float] | None = None,
    far_range: tuple[float, float] = (1e-3, 1e-2),
    num_thresholds: int = 1000,
    beta: float = 1.0,
    epsilon: float = 0.1,
    score_fn: ScoreFn = cosine_similarity_scores,
    higher_is_closer: bool = True,
    chunk_size: int | None = None,
    distributed: bool = False,
    collect_limit: int = COLLECT_LIMIT,
    retain_limit: int = 1 << 27,
    seed: int = 0,
    bootstrap: int = 0,
    confidence: float = 0.95,
    rows_are_unit: bool = False,
    rank: Sequence[str] = (),
) -> Evaluation:
    """OPIS and, with ``target_far``, the threshold of that FAR with its per-class error
    counts, from one guide and one pass: the three FAR ranks (``far_range`` and
    ``target_far``) are searched together, and the per-class pairs at the threshold are
    counted with the grid (same numbers as :func:`opis` and
    :func:`~pml_tcm.functional.calibration.calibrate_closeness_threshold`). The OPIS rows
    are the groups when ``sets`` has them; ``bootstrap`` replicates give its intervals;
    ``rows_are_unit``: see :class:`~pml_tcm.functional.streaming.PairStream`. ``rank``
    (retrieval metric names, cosine on the CPU): the queries whose rows the pass scores
    whole are ranked there too (:class:`~pml_tcm.functional.retrieval.StreamRanking`),
    into :attr:`Evaluation.ranked`."""
    classes = global_classes(sets.query_ids, distributed=distributed)
    stream = PairStream(
        queries=sets.queries,
        query_labels=sets.query_ids,
        references=sets.references,
        reference_labels=sets.reference_ids,
        classes=classes,
        self_offset=sets.self_offset,
        score_fn=score_fn,
        higher_is_closer=higher_is_closer,
        chunk_size=chunk_size,
        query_groups=sets.query_groups,
        num_groups=sets.num_groups,
        rows_are_unit=rows_are_unit,
    )
    ranking = None
    if rank and stream.cosine and higher_is_closer and not stream.sync_free:
        if stream.queries.device.type == "cpu":
            ranking = stream.row_hook = StreamRanking(stream, rank)
    retained = None
    threshold = None
    if target_far is not None or calibration_range is None:
        num_negatives = num_negative_pairs(stream, distributed=distributed)
        if target_far is not None and num_negatives == 0:
            raise ValueError("target_far: there is no negative pair (a single class)")
    if calibration_range is not None:
        lo, hi = calibration_range
        closeness_range = (lo, hi) if higher_is_closer else (-hi, -lo)
        if target_far is not None:
            (threshold,) = _far_thresholds(
                stream, [target_far], num_negatives, distributed, collect_limit, 0, seed
            )[0]
    elif num_negatives == 0:
        closeness_range = _positive_score_range(stream, distributed)
    else:
        fars = [far_range[1], far_range[0]] + ([] if target_far is None else [target_far])
        values, retained, retained_floor = _far_thresholds(
            stream, fars, num_negatives, distributed, collect_limit, retain_limit, seed
        )
        closeness_range = (values[0], values[1])
        threshold = values[2] if target_far is not None else None
        lowest = min(values[0], values[2]) if threshold is not None else values[0]
        if retained is not None and retained_floor > lowest:
            retained = None
    grid = threshold_grid(closeness_range[0], closeness_range[1], num_thresholds)
    positive_histogram, negative_histogram, accepted = grid_histograms(
        stream=stream,
        closeness_grid=grid.to(sets.queries.device),
        retained=retained,
        threshold=threshold,
    )
    ranked = unranked = None
    if ranking is not None:
        ranked, stream.row_hook = ranking.sums, None
        unranked = stream.query_order.cpu().index_select(0, stream.unhooked_rows())
    # the pass is over: its buffers and pairs need not stand beside the bootstrap's
    stream.release_buffers()
    retained = None
    positives, negatives = stream.pair_totals()
    state = OPISState(positive_histogram, negative_histogram, positives, negatives)
    if distributed:
        state.all_reduce()
    units = classes if sets.query_groups is None else torch.arange(sets.num_groups)
    result = opis_compute(
        state, units, grid, beta=beta, epsilon=epsilon, higher_is_closer=higher_is_closer
    )
    if sets.query_groups is None:
        result.classes = sets.label_values[result.classes]
    else:
        result.classes, result.by = sets.group_values, "group"
    if bootstrap:
        opis_values, eps_values = opis_replicates(
            state, grid, beta=beta, epsilon=epsilon, replicates=bootstrap, seed=seed
        )
        result.opis_interval = _pair(percentile_interval(opis_values, confidence))
        result.eps_opis_interval = _pair(percentile_interval(eps_values, confidence))
        result.confidence = float(confidence)
    if threshold is None:
        return Evaluation(result, ranked=ranked, unranked=unranked)
    errors = QueryErrors.of_stream(stream, *accepted)
    return Evaluation(result, threshold, classes, errors, ranked, unranked)


def _pair(interval: Tensor) -> tuple[float, float]:
    return float(interval[0]), float(interval[1])


def _far_thresholds(
    stream: PairStream,
    fars: list[float],
    num_negatives: int,
    distributed: bool,
    collect_limit: int,
    retain_limit: int,
    seed: int,
) -> tuple[list[float], list[ChunkPairs] | None, float]:
    """The exact closeness threshold of each FAR, the retained pairs and their floor."""
    search = far_closeness_thresholds(
        stream=stream,
        ranks=[far_rank(far, num_negatives) for far in fars],
        num_negatives=num_negatives,
        distributed=distributed,
        collect_limit=collect_limit,
        retain_limit=retain_limit,
        seed=seed,
    )
    return search.values, search.retained, search.retained_floor


def _positive_score_range(stream: PairStream, distributed: bool) -> tuple[float, float]:
    """Lowest and highest positive closeness, ``(0, 0)`` without any pair (the range
    when there is no negative pair)."""
    extremes = torch.full((2,), math.inf, dtype=torch.float64, device=stream.queries.device)
    for values in stream.positive_values():
        if values.numel():  # (NaN, a slab's self pairs, is left out by masking: no sync)
            values = values.to(torch.float64)
            finite = torch.isfinite(values)
            low = torch.where(finite, values, math.inf).amin()
            high = torch.where(finite, -values, math.inf).amin()
            extremes = torch.minimum(extremes, torch.stack([low, high]))
    all_reduce(extremes, distributed=distributed, op="min")
    if not math.isfinite(float(extremes[0])):
        return (0.0, 0.0)
    return (float(extremes[0]), -float(extremes[1]))

"""Deployment threshold calibration: one global threshold and its per-class FAR/FRR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from torch import Tensor

from ._rate_text import PERCENT, rate_lines
from ._scores import needs_direction, score_function
from ._sharding import check_shard_queries, data_fingerprint, query_shard
from .functional import validation
from .functional.bootstrap import check_bootstrap_settings, percentile_interval, rate_replicates
from .functional.calibration import QueryErrors, calibrate_closeness_threshold
from .functional.prepare import prepare_sets

PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class GroupRates:
    """FAR and FRR of each group of queries at one global threshold.

    A group's pairs are the pairs whose query belongs to it. Rates are fractions; a
    group without negative (positive) pairs has no FAR (FRR): 0 there, masked out by
    ``has_negatives`` (``has_positives``) and skipped by the worst / best / ratio.

    Attributes:
        groups: ``(U,)`` the group values, ascending, as given.
        far: ``(U,)`` float64 per-group FAR.
        frr: ``(U,)`` float64 per-group FRR.
        has_negatives: ``(U,)`` bool.
        has_positives: ``(U,)`` bool.
        false_accepts: ``(U,)`` int64.
        false_rejects: ``(U,)`` int64.
        negatives: ``(U,)`` int64.
        positives: ``(U,)`` int64.
        far_interval: ``(U, 2)`` float64 percentile bootstrap interval of each group's
            FAR (its queries resampled), or ``None`` without ``bootstrap``.
        frr_interval: the same for FRR.
        worst_far_group: the group with the highest FAR (``None`` if none has negatives).
        worst_far: its FAR.
        best_far: the lowest group FAR.
        far_ratio: ``worst_far / best_far`` (``inf`` when only the best is 0, 1 when both).
        worst_frr_group: the group with the highest FRR.
        worst_frr: its FRR.
        best_frr: the lowest group FRR.
        frr_ratio: ``worst_frr / best_frr``.
    """

    groups: Tensor
    far: Tensor
    frr: Tensor
    has_negatives: Tensor
    has_positives: Tensor
    false_accepts: Tensor
    false_rejects: Tensor
    negatives: Tensor
    positives: Tensor
    far_interval: Tensor | None
    frr_interval: Tensor | None
    worst_far_group: int | float | None
    worst_far: float
    best_far: float
    far_ratio: float
    worst_frr_group: int | float | None
    worst_frr: float
    best_frr: float
    frr_ratio: float


def _ratio(worst: float, best: float) -> float:
    if best > 0:
        return worst / best
    return math.inf if worst > 0 else 1.0


@dataclass
class CalibrationReport:
    """A global threshold and how its error rates spread over the classes.

    Rates are fractions in [0, 1]. A class without negative pairs has no FAR and one
    without positive pairs no FRR: ``class_far``/``class_frr`` hold 0 there, the masks
    ``has_negatives``/``has_positives`` say so, and the summaries skip those classes.

    Attributes:
        threshold: the threshold in the distance's units (a pair matches when its
            similarity is ``>= threshold``, or its distance ``<= threshold``).
        target: ``("far", value)`` or ``("frr", value)``.
        far: pooled false accept rate at the threshold.
        frr: pooled false reject rate.
        classes: ``(C,)`` the distinct query labels, ascending, as given (any dtype).
        class_far: ``(C,)`` float64 per-class FAR.
        class_frr: ``(C,)`` float64 per-class FRR.
        has_negatives: ``(C,)`` bool.
        has_positives: ``(C,)`` bool.
        worst_far_class: label with the highest FAR (``None`` if no class has negatives).
        worst_far: its FAR (0 if none).
        worst_frr_class: label with the highest FRR.
        worst_frr: its FRR.
        far_spread: max - min of the per-class FAR.
        frr_spread: max - min of the per-class FRR.
        far_percentiles: ``{p: value}`` for p in 5, 25, 50, 75, 95 (linear interpolation).
        frr_percentiles: the same for FRR.
        far_interval: percentile bootstrap interval ``(lo, hi)`` of the pooled FAR
            (queries resampled within their groups, or classes), ``None`` without
            ``bootstrap``.
        frr_interval: the same for the pooled FRR.
        class_far_interval: ``(C, 2)`` float64 interval of each class's FAR (the same
            replicates as the pooled interval), ``None`` without ``bootstrap``.
        class_frr_interval: the same for the per-class FRR.
        groups: the per-group rates (:class:`GroupRates`), ``None`` without ``groups``.
        confidence: the intervals' level (``None`` without them).
    """

    threshold: float
    target: tuple[str, float]
    far: float
    frr: float
    classes: Tensor
    class_far: Tensor
    class_frr: Tensor
    has_negatives: Tensor
    has_positives: Tensor
    worst_far_class: int | float | None
    worst_far: float
    worst_frr_class: int | float | None
    worst_frr: float
    far_spread: float
    frr_spread: float
    far_percentiles: dict[int, float]
    frr_percentiles: dict[int, float]
    far_interval: tuple[float, float] | None = None
    frr_interval: tuple[float, float] | None = None
    class_far_interval: Tensor | None = None
    class_frr_interval: Tensor | None = None
    groups: GroupRates | None = None
    confidence: float | None = None

    def summary(self) -> str:
        """A few readable lines (rates in percent)."""
        return "\n".join(rate_lines(self, PERCENT))

    def __str__(self) -> str:
        return self.summary()


def _label(value: Tensor) -> int | float | bool | tuple:
    """A class label as a Python value (a tuple for a label row)."""
    return tuple(value.tolist()) if value.ndim else value.item()


def _rate_summary(rates: Tensor, valid: Tensor, classes: Tensor):
    if not bool(valid.any()):
        return None, 0.0, 0.0, {p: 0.0 for p in PERCENTILES}
    values = rates[valid]
    worst = int(values.argmax())
    quantiles = torch.quantile(values, torch.tensor(PERCENTILES, dtype=torch.float64) / 100)
    return (
        _label(classes[valid][worst]),
        float(values[worst]),
        float(values.max() - values.min()),
        {p: float(q) for p, q in zip(PERCENTILES, quantiles)},
    )


def calibrate_threshold(
    embeddings: Tensor,
    labels: Tensor,
    reference: Tensor | None = None,
    reference_labels: Tensor | None = None,
    *,
    target_far: float | None = None,
    target_frr: float | None = None,
    ref_includes_query: bool = False,
    distance: BaseDistance | None = None,
    chunk_size: int | None = None,
    shard_queries: bool | str = False,
    groups: Tensor | None = None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> CalibrationReport:
    """The global threshold meeting a target FAR (or FRR) and its per-class FAR/FRR
    (and per-group, with ``groups``).

    Pairs follow :mod:`pml_tcm.functional.opis` (no self pair when the reference set is
    the embeddings themselves or includes them). For ``target_far = f`` the threshold is
    the k-th largest negative similarity (smallest distance), ``k = max(1, ⌈f·n_neg⌉)``,
    found exactly without building the pair matrix; for ``target_frr = r`` it is the
    k-th lowest positive similarity with ``k = ⌊r·n_pos⌋ + 1`` (at most ``r·n_pos``
    positive pairs rejected).

    Args:
        embeddings: ``(N, D)`` queries, a tensor or a NumPy array (checked and converted
            as by :func:`~pml_tcm.functional.prepare.prepare_sets`: half precision is
            scored in float32, zero-norm rows are refused for a normalising distance).
        labels: ``(N,)`` class labels: any integer dtype (any magnitude), bool, or float
            (compared by value; NaN is refused).
        reference: ``(M, D)`` references, or ``None`` for the embeddings themselves.
        reference_labels: ``(M,)`` labels of ``reference``, compared with ``labels`` by
            value.
        target_far: FAR in (0, 1]; give exactly one of ``target_far``/``target_frr``.
        target_frr: FRR in [0, 1).
        ref_includes_query: the reference starts with the embeddings (pml convention);
            verified row for row.
        distance: pml distance (default ``CosineSimilarity()``).
        chunk_size: query rows per streamed block.
        shard_queries: ``True`` or ``"auto"`` (when a ``torch.distributed`` group with
            several ranks is initialised) splits the queries over the ranks: each rank
            streams its contiguous share against the whole reference set and the counts
            are summed, so every rank gets the one-process report. Every rank must then
            call with the same data. ``False`` (default) never communicates.
        groups: ``(N,)`` a group id per query (e.g. the customer; any label-like dtype,
            tensor or NumPy), at least two groups: the report then gives each group's
            FAR and FRR at the global threshold (a group's pairs are those of its
            queries), the worst group and the worst-to-best ratio.
        bootstrap: ``B`` replicates for percentile intervals on the pooled, per-class
            and per-group FAR/FRR (queries resampled, each with all its pairs, within
            their group, or within their class without groups), ``0`` for none. The
            threshold stays fixed: the intervals say how its rates would vary with other
            queries like these.
        confidence: the intervals' level in (0, 1).
        seed: the bootstrap's seed (reproducible intervals).

    Returns:
        A :class:`CalibrationReport`.

    Raises:
        ValueError: naming the argument: bad targets, bad sets, no negative pair for a
            FAR target or no positive pair for an FRR target.
    """
    check_shard_queries(shard_queries)
    validation.check_chunk_size(chunk_size)
    if (target_far is None) == (target_frr is None):
        raise ValueError("give exactly one of target_far and target_frr")
    if target_far is not None and not (validation.is_real(target_far) and 0 < target_far <= 1):
        raise ValueError(f"target_far must lie in (0, 1], got {target_far!r}")
    if target_frr is not None and not (validation.is_real(target_frr) and 0 <= target_frr < 1):
        raise ValueError(f"target_frr must lie in [0, 1), got {target_frr!r}")
    check_bootstrap_settings(bootstrap, confidence, seed)
    distance = CosineSimilarity() if distance is None else distance
    if not isinstance(distance, BaseDistance):
        raise ValueError(f"distance must be a pml distance, got {type(distance).__name__}")
    sets = prepare_sets(
        embeddings,
        labels,
        reference,
        reference_labels,
        ref_includes_query=ref_includes_query,
        require_direction=needs_direction(distance),
        groups=groups,
        names=("embeddings", "labels", "reference", "reference_labels"),
    )
    settings = ()
    if shard_queries is not False:
        fingerprint = [sets.queries, sets.query_ids, sets.references, sets.reference_ids]
        if sets.query_groups is not None:
            fingerprint.append(sets.query_groups)
        settings = (
            data_fingerprint(*fingerprint),
            target_far,
            target_frr,
            type(distance).__name__,
            chunk_size,
            bootstrap,
            confidence,
            seed,
        )
    start, end, distributed = query_shard(sets.queries.shape[0], shard_queries, settings)
    query_groups = None if sets.query_groups is None else sets.query_groups[start:end]
    closeness, classes, errors = calibrate_closeness_threshold(
        sets.queries[start:end],
        sets.query_ids[start:end],
        sets.references,
        sets.reference_ids,
        target_far=target_far,
        target_frr=target_frr,
        self_offset=None if sets.self_offset is None else sets.self_offset + start,
        score_fn=score_function(distance),
        higher_is_closer=distance.is_inverted,
        chunk_size=chunk_size,
        distributed=distributed,
        query_groups=query_groups,
        num_groups=sets.num_groups,
    )
    target = ("far", float(target_far)) if target_far is not None else ("frr", float(target_frr))
    return calibration_report(
        closeness,
        target,
        sets.label_values[classes.cpu()],
        errors,
        distance.is_inverted,
        group_values=sets.group_values,
        bootstrap=bootstrap,
        confidence=confidence,
        seed=seed,
        distributed=distributed,
    )


def calibration_report(
    closeness: float,
    target: tuple[str, float],
    classes: Tensor,
    errors: QueryErrors,
    higher_is_closer: bool = True,
    *,
    group_values: Tensor | None = None,
    bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    distributed: bool = False,
) -> CalibrationReport:
    """The :class:`CalibrationReport` of a closeness threshold from each query's counts.

    Args:
        closeness: the threshold as a closeness (minus a distance).
        target: ``("far" | "frr", value)``.
        classes: ``(C,)`` the labels of the class indices in ``errors.classes``.
        errors: this rank's per-query counts at the threshold.
        higher_is_closer: ``False`` to report the threshold as a distance.
        group_values: ``(U,)`` the group of each id in ``errors.groups``.
        bootstrap: replicates of the intervals (``0``: none).
        confidence: their level.
        seed: their seed.
        distributed: sum (and, for the bootstrap, gather) the counts over ranks.
    """
    num_classes = classes.shape[0]
    false_accepts, false_rejects, negatives, positives = (
        c.cpu() for c in errors.per(errors.classes, num_classes, distributed)
    )
    has_negatives, has_positives = negatives > 0, positives > 0
    class_far = false_accepts.double() / negatives.clamp(min=1)
    class_frr = false_rejects.double() / positives.clamp(min=1)
    far = float(false_accepts.sum()) / max(1, int(negatives.sum()))
    frr = float(false_rejects.sum()) / max(1, int(positives.sum()))
    worst_far_class, worst_far, far_spread, far_pct = _rate_summary(
        class_far, has_negatives, classes
    )
    worst_frr_class, worst_frr, frr_spread, frr_pct = _rate_summary(
        class_frr, has_positives, classes
    )
    threshold = float(closeness if higher_is_closer else -closeness)
    report = CalibrationReport(
        threshold=threshold,
        target=target,
        far=far,
        frr=frr,
        classes=classes,
        class_far=class_far,
        class_frr=class_frr,
        has_negatives=has_negatives,
        has_positives=has_positives,
        worst_far_class=worst_far_class,
        worst_far=worst_far,
        worst_frr_class=worst_frr_class,
        worst_frr=worst_frr,
        far_spread=far_spread,
        frr_spread=frr_spread,
        far_percentiles=far_pct,
        frr_percentiles=frr_pct,
    )
    if group_values is not None:
        assert errors.groups is not None
        report.groups = _group_rates(
            errors.per(errors.groups, group_values.shape[0], distributed), group_values
        )
    if bootstrap:
        _add_intervals(report, errors.gathered(distributed), bootstrap, confidence, seed)
    return report


def _group_rates(counts: tuple[Tensor, Tensor, Tensor, Tensor], groups: Tensor) -> GroupRates:
    false_accepts, false_rejects, negatives, positives = (c.cpu() for c in counts)
    has_negatives, has_positives = negatives > 0, positives > 0
    far = false_accepts.double() / negatives.clamp(min=1)
    frr = false_rejects.double() / positives.clamp(min=1)
    extremes = []
    for rates, valid in ((far, has_negatives), (frr, has_positives)):
        if not bool(valid.any()):
            extremes.append((None, 0.0, 0.0, 1.0))
            continue
        values = rates[valid]
        worst = float(values.max())
        best = float(values.min())
        extremes.append(
            (_label(groups[valid][int(values.argmax())]), worst, best, _ratio(worst, best))
        )
    (worst_far_group, worst_far, best_far, far_ratio), frr_extremes = extremes
    worst_frr_group, worst_frr, best_frr, frr_ratio = frr_extremes
    return GroupRates(
        groups=groups,
        far=far,
        frr=frr,
        has_negatives=has_negatives,
        has_positives=has_positives,
        false_accepts=false_accepts,
        false_rejects=false_rejects,
        negatives=negatives,
        positives=positives,
        far_interval=None,
        frr_interval=None,
        worst_far_group=worst_far_group,
        worst_far=worst_far,
        best_far=best_far,
        far_ratio=far_ratio,
        worst_frr_group=worst_frr_group,
        worst_frr=worst_frr,
        best_frr=best_frr,
        frr_ratio=frr_ratio,
    )


def _add_intervals(
    report: CalibrationReport, errors: QueryErrors, bootstrap: int, confidence: float, seed: int
) -> None:
    """Bootstrap intervals from one resampling of the queries: within their group when
    there are groups (per-group, per-class and pooled rates from the same replicates),
    else within their class."""
    counts = errors.counts()
    classes = errors.classes.cpu()
    num_classes = report.classes.shape[0]
    if report.groups is None:
        rates = rate_replicates(counts, classes, num_classes, replicates=bootstrap, seed=seed)
        class_far, class_frr = rates.far, rates.frr
    else:
        assert errors.groups is not None
        rates = rate_replicates(
            counts,
            errors.groups.cpu(),
            report.groups.groups.shape[0],
            replicates=bootstrap,
            seed=seed,
            other=classes,
            num_other=num_classes,
        )
        class_far, class_frr = rates.other_far, rates.other_frr
        report.groups.far_interval = percentile_interval(rates.far, confidence)
        report.groups.frr_interval = percentile_interval(rates.frr, confidence)
    report.class_far_interval = percentile_interval(class_far, confidence)
    report.class_frr_interval = percentile_interval(class_frr, confidence)
    report.far_interval = _pair(percentile_interval(rates.pooled_far, confidence))
    report.frr_interval = _pair(percentile_interval(rates.pooled_frr, confidence))
    report.confidence = float(confidence)


def _pair(interval: Tensor) -> tuple[float, float]:
    return float(interval[0]), float(interval[1])

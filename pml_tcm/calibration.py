"""Deployment threshold calibration: one global threshold and its per-class FAR/FRR."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from torch import Tensor

from ._scores import needs_direction, score_function
from ._sharding import check_shard_queries, data_fingerprint, query_shard
from .functional import validation
from .functional.calibration import calibrate_closeness_threshold
from .functional.prepare import prepare_sets

PERCENTILES = (5, 25, 50, 75, 95)


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

    def summary(self) -> str:
        """A few readable lines."""
        kind, value = self.target
        lines = [
            f"threshold {self.threshold:.6g} for target {kind.upper()} {value:.10g}",
            f"pooled: FAR {self.far:.4%}  FRR {self.frr:.4%}",
        ]
        for name, worst_class, worst, spread, pct in (
            ("FAR", self.worst_far_class, self.worst_far, self.far_spread, self.far_percentiles),
            ("FRR", self.worst_frr_class, self.worst_frr, self.frr_spread, self.frr_percentiles),
        ):
            if worst_class is None:
                lines.append(f"per class {name}: no class has such pairs")
                continue
            shown = "  ".join(f"p{p} {v:.4%}" for p, v in pct.items())
            lines.append(
                f"per class {name}: worst {worst:.4%} (class {worst_class}), "
                f"spread {spread:.4%}; {shown}"
            )
        return "\n".join(lines)

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
) -> CalibrationReport:
    """The global threshold meeting a target FAR (or FRR) and its per-class FAR/FRR.

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
        names=("embeddings", "labels", "reference", "reference_labels"),
    )
    settings = ()
    if shard_queries is not False:
        settings = (
            data_fingerprint(sets.queries, sets.query_ids, sets.references, sets.reference_ids),
            target_far,
            target_frr,
            type(distance).__name__,
            chunk_size,
        )
    start, end, distributed = query_shard(sets.queries.shape[0], shard_queries, settings)
    closeness, classes, counts = calibrate_closeness_threshold(
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
    )
    target = ("far", float(target_far)) if target_far is not None else ("frr", float(target_frr))
    return calibration_report(
        closeness, target, sets.label_values[classes.cpu()], counts, distance.is_inverted
    )


def calibration_report(
    closeness: float,
    target: tuple[str, float],
    classes: Tensor,
    counts: tuple[Tensor, Tensor, Tensor, Tensor],
    higher_is_closer: bool = True,
) -> CalibrationReport:
    """The :class:`CalibrationReport` of a closeness threshold and its per-class counts
    ``(false_accepts, false_rejects, negatives, positives)`` (``(C,)`` each; ``classes``
    the labels of their rows)."""
    false_accepts, false_rejects, negatives, positives = (c.cpu() for c in counts)
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
    return CalibrationReport(
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

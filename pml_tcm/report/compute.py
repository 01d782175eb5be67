"""The numbers of ``pml-tcm report``, all from :func:`compute_report`.

The sets are prepared once (:func:`pml_tcm.functional.prepare.prepare_sets`); OPIS,
ε-OPIS and the global threshold for a target FAR with its per-class FAR/FRR come from one
guide and one pass over the pairs (:func:`pml_tcm.functional.opis.evaluate_sets`: the
same numbers as :class:`pml_tcm.OPISAccuracyCalculator` and
:func:`pml_tcm.calibrate_threshold`), R@1 and MAP@R from the exact ranking of each
query's scores (pml's definitions), in that pass where it scores the query's whole row
(:class:`pml_tcm.functional.retrieval.StreamRanking`: every query on the CPU engine, a
small class's in the main pass and a large class's with its positive slab), in a
bounded-memory ranking pass for any other
(:func:`pml_tcm.functional.retrieval.retrieval_sums_of_sets`: every query on the sync-free
engine).
Embeddings are L2-normalised first, as pml's testers do, so every number is cosine-based.

With groups that pass gives the group OPIS and each query's counts at the threshold
(hence per-class and per-group FAR/FRR); the class OPIS takes one more counting pass on
the same grid. Bootstrap intervals (:mod:`pml_tcm.functional.bootstrap`) come from those
counts, with no further pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from ..calibration import CalibrationReport, calibration_report
from ..functional.bootstrap import check_bootstrap_settings
from ..functional.normalize import unit_rows_into
from ..functional.opis import OPISResult, evaluate_sets, opis_of_sets
from ..functional.prepare import PreparedSets, prepare_sets
from ..functional.retrieval import (
    RETRIEVAL_METRICS,
    RankSums,
    RetrievalMemoryError,
    retrieval_sums_of_sets,
)
from ..functional.streaming import stream_order
from .inputs import ReportInputError, require_pairs

REPORT_METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")
GROUP_METRICS = ("group_opis", "group_eps_opis")
"""The metrics added with ``groups``: OPIS and ε-OPIS over the groups instead of the
classes (:data:`REPORT_METRICS`' ``opis`` and ``eps_opis`` stay the class values)."""
BOOTSTRAP = 1000
"""Default bootstrap replicates of the report's intervals."""


@dataclass(frozen=True)
class GroupRow:
    """One group's FAR and FRR at the calibrated threshold.

    Attributes:
        group: the group id as given.
        far: its FAR (NaN when it has no negative pair).
        frr: its FRR (NaN when it has no positive pair).
        far_interval: ``(lo, hi)`` of its FAR, ``None`` without bootstrap.
        frr_interval: the same for FRR.
        false_accepts: its negative pairs at or above the threshold.
        negatives: its negative pairs.
        false_rejects: its positive pairs below the threshold.
        positives: its positive pairs.
    """

    group: Any
    far: float
    frr: float
    far_interval: tuple[float, float] | None
    frr_interval: tuple[float, float] | None
    false_accepts: int
    negatives: int
    false_rejects: int
    positives: int


@dataclass
class EmbeddingReport:
    """Everything ``pml-tcm report`` computes.

    Attributes:
        metrics: :data:`REPORT_METRICS` values, and :data:`GROUP_METRICS` with groups.
        opis_result: the class OPIS result (per-class utility curves; ``by == "class"``).
        calibration: the threshold for the target FAR, its pooled and per-class FAR/FRR
            and, with groups, its per-group FAR/FRR (``calibration.groups``); with
            intervals unless the bootstrap is off.
        num_queries: number of query embeddings.
        num_references: number of reference embeddings (the queries when no reference
            set is given).
        notes: one line per metric skipped (NaN in ``metrics``) and why.
        group_result: the group OPIS result (``by == "group"``), ``None`` without groups.
        bootstrap: the replicates behind the intervals (``0``: no intervals).
    """

    metrics: dict[str, float]
    opis_result: OPISResult
    calibration: CalibrationReport
    num_queries: int
    num_references: int
    notes: list[str] = field(default_factory=list)
    group_result: OPISResult | None = None
    bootstrap: int = 0

    @property
    def confidence(self) -> float | None:
        """The level of the intervals (``None`` without them)."""
        return self.calibration.confidence

    def intervals(self) -> dict[str, tuple[float, float]]:
        """The bootstrap interval of each metric that has one (``opis``, ``eps_opis``
        and, with groups, ``group_opis``, ``group_eps_opis``); empty without bootstrap."""
        found = {}
        for prefix, result in (("", self.opis_result), ("group_", self.group_result)):
            if result is None:
                continue
            for name in ("opis", "eps_opis"):
                interval = getattr(result, f"{name}_interval")
                if interval is not None:
                    found[prefix + name] = interval
        return found

    def worst_classes(self, count: int) -> list[tuple[int | float, float, float, float]]:
        """``(label, mean utility, FAR, FRR)`` of the ``count`` classes with the lowest
        mean utility ``⟨U_c⟩`` over the calibration range; classes without a positive
        pair (``OPISResult.excluded``: OPIS leaves them out) are never among them."""
        result, calibration = self.opis_result, self.calibration
        rates = {
            label: (float(far), float(frr))
            for label, far, frr in zip(
                calibration.classes.tolist(), calibration.class_far, calibration.class_frr
            )
        }
        included = (~result.excluded).nonzero().squeeze(1)
        order = torch.argsort(result.mean_class_utility[included], stable=True)[:count]
        rows = []
        for index in included[order].tolist():
            label = result.classes[index].item()
            far, frr = rates.get(label, (float("nan"), float("nan")))
            rows.append((label, float(result.mean_class_utility[index]), far, frr))
        return rows

    def group_rows(self) -> list[GroupRow]:
        """Every group's rates at the threshold, in ascending group order (empty without
        groups)."""
        rates = self.calibration.groups
        if rates is None:
            return []
        nan = float("nan")
        rows = []
        for index, group in enumerate(rates.groups.tolist()):
            intervals = []
            for interval, valid in (
                (rates.far_interval, rates.has_negatives),
                (rates.frr_interval, rates.has_positives),
            ):
                pair = None
                if interval is not None:
                    pair = tuple(map(float, interval[index])) if valid[index] else (nan, nan)
                intervals.append(pair)
            rows.append(
                GroupRow(
                    group=group,
                    far=float(rates.far[index]) if rates.has_negatives[index] else nan,
                    frr=float(rates.frr[index]) if rates.has_positives[index] else nan,
                    far_interval=intervals[0],
                    frr_interval=intervals[1],
                    false_accepts=int(rates.false_accepts[index]),
                    negatives=int(rates.negatives[index]),
                    false_rejects=int(rates.false_rejects[index]),
                    positives=int(rates.positives[index]),
                )
            )
        return rows

    def worst_groups(self, count: int, rate: str) -> list[GroupRow]:
        """The ``count`` groups with the highest ``rate`` (``"far"`` or ``"frr"``), worst
        first (ties in group order); groups without such pairs are never among them."""
        rows = [row for row in self.group_rows() if math.isfinite(getattr(row, rate))]
        return sorted(rows, key=lambda row: -getattr(row, rate))[:count]

    def excluded_classes(self) -> list[int | float]:
        """Labels of the classes without a positive pair (left out of OPIS)."""
        result = self.opis_result
        return result.classes[result.excluded].tolist()


def compute_report(
    embeddings: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    far_range: tuple[float, float] = (1e-3, 1e-2),
    target_far: float = 1e-3,
    device: str | torch.device = "cpu",
    *,
    groups: np.ndarray | None = None,
    bootstrap: int = BOOTSTRAP,
    confidence: float = 0.95,
    seed: int = 0,
    overwrite: bool = False,
) -> EmbeddingReport:
    """The report for in-memory arrays.

    Without a reference set the embeddings are their own references, self pairs
    excluded. Everything (R@1 and MAP@R, OPIS, calibration) runs on ``device``; R@1 and
    MAP@R rank on the host and are skipped (NaN, with a note) when one query's ranking
    does not fit their memory budget.

    With ``groups`` the one pass gives the group OPIS and the threshold's per-query
    counts (so per-class and per-group FAR/FRR); the class OPIS then takes a second
    counting pass over the pairs on the same grid (no FAR search: the calibration range
    is the one already found).

    Args:
        embeddings: ``(N, D)`` float queries.
        labels: ``(N,)`` their class labels.
        reference: ``(M, D)`` references, or ``None`` for the embeddings themselves.
        reference_labels: ``(M,)`` labels of ``reference``.
        far_range: ``(far_lo, far_hi)`` of the range OPIS is measured over (fractions).
        target_far: the FAR (a fraction) the threshold is calibrated for.
        device: where to compute.
        groups: ``(N,)`` a group id per query (e.g. the customer), at least two
            groups, or ``None``.
        bootstrap: replicates of the percentile intervals on OPIS, ε-OPIS and the
            FAR/FRR at the threshold (``0``: none).
        confidence: the intervals' level in (0, 1).
        seed: the bootstrap's seed (and of the FAR search's random guide).
        overwrite: normalise ``embeddings`` and ``reference`` in place, and reorder
            their rows by class (then group), where they are writable float32/float64
            arrays and ``device`` is the CPU (the command line's own loaded arrays): one
            copy of each set less.

    Raises:
        ValueError: bad settings or sets (e.g. a single class: no negative pair, or a
            single group).
    """
    check_bootstrap_settings(bootstrap, confidence, seed)
    require_pairs(labels, reference_labels)
    device = torch.device(device)
    queries = _unit_rows(embeddings, device, overwrite=overwrite)
    references = None
    if reference is not None:
        if reference.shape[1] != embeddings.shape[1]:
            raise ReportInputError(
                f"reference has embedding size {reference.shape[1]}, embeddings "
                f"{embeddings.shape[1]}"
            )
        references = _unit_rows(reference, device, queries.dtype, overwrite=overwrite)
    sets = prepare_sets(
        queries,
        torch.as_tensor(labels).to(device),
        references,
        None if reference is None else torch.as_tensor(reference_labels).to(device),
        groups=None if groups is None else torch.as_tensor(groups),
        names=("embeddings", "labels", "reference", "reference labels"),
    )
    # the rows (ours: normalised above) in the streams' order, so that no stream copies them
    sets = _in_stream_order(sets)
    intervals = {"bootstrap": bootstrap, "confidence": confidence, "seed": seed}
    # OPIS (over the groups, with groups) and the calibrated threshold from one guide and
    # one pass over the pairs
    evaluation = evaluate_sets(
        sets,
        far_range=far_range,
        target_far=target_far,
        rows_are_unit=True,
        rank=RETRIEVAL_METRICS,
        **intervals,
    )
    calibration = calibration_report(
        evaluation.threshold,
        ("far", float(target_far)),
        sets.label_values[evaluation.classes.cpu()],
        evaluation.errors,
        group_values=sets.group_values,
        **intervals,
    )
    result, group_result = evaluation.opis, None
    if sets.query_groups is not None:
        group_result = result
        by_class = replace(sets, query_groups=None, group_values=None)
        result = opis_of_sets(
            by_class,
            calibration_range=group_result.calibration_range,
            rows_are_unit=True,
            **intervals,
        )
    # R@1 and MAP@R in bounded memory (pml's k-NN search holds N x max R neighbours): the
    # queries the pass ranked, then a ranking pass over any other
    knn, notes = _retrieval_metrics(sets, evaluation.ranked, evaluation.unranked)
    metrics = {**knn, "opis": result.opis, "eps_opis": result.eps_opis}
    names = REPORT_METRICS
    if group_result is not None:
        metrics.update(group_opis=group_result.opis, group_eps_opis=group_result.eps_opis)
        names += GROUP_METRICS
    return EmbeddingReport(
        {name: float(metrics[name]) for name in names},
        result,
        calibration,
        len(sets.queries),
        len(sets.references),
        notes,
        group_result,
        bootstrap,
    )


def _unit_rows(
    array: np.ndarray,
    device: torch.device,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> torch.Tensor:
    """Unit rows of ``array`` on ``device``: one ``(N, D)`` result (``array`` itself with
    ``overwrite`` where it can hold them), no ``(N, D)`` temporaries beside it."""
    source = torch.as_tensor(array)
    dtype = source.dtype if dtype is None else dtype
    in_place = (
        overwrite
        and device.type == "cpu"
        and source.dtype == dtype
        and dtype in (torch.float32, torch.float64)
        and isinstance(array, np.ndarray)
        and array.flags.writeable
        and array.flags.c_contiguous
    )
    if in_place:
        return unit_rows_into(source)
    return unit_rows_into(source, torch.empty(source.shape, dtype=dtype, device=device))


def permute_rows_(rows: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``rows[:] = rows[order]`` in place with one row of extra memory (CPU: by cycles;
    elsewhere a copy is made and written back)."""
    if rows.device.type != "cpu":
        return rows.copy_(rows.index_select(0, order))
    data, source = rows.numpy(), order.cpu().numpy()
    done = source == np.arange(len(source))
    for start in np.flatnonzero(~done).tolist():
        if done[start]:
            continue
        held, row = data[start].copy(), start
        while True:  # row takes the value of source[row]; the cycle closes at start
            done[row] = True
            take = int(source[row])
            if take == start:
                data[row] = held
                break
            data[row] = data[take]
            row = take
    return rows


def _in_stream_order(sets: PreparedSets) -> PreparedSets:
    """``sets`` with their rows (and ids, groups) permuted in place into the order the
    streams sort them in (the report's numbers do not depend on the order)."""
    order = stream_order(sets.query_ids, sets.query_groups)
    permute_rows_(sets.queries, order)
    query_ids = sets.query_ids.index_select(0, order)
    groups = None if sets.query_groups is None else sets.query_groups.index_select(0, order)
    if sets.references_are_queries:
        return replace(sets, query_ids=query_ids, reference_ids=query_ids, query_groups=groups)
    reference_order = stream_order(sets.reference_ids)
    permute_rows_(sets.references, reference_order)
    return replace(
        sets,
        query_ids=query_ids,
        reference_ids=sets.reference_ids.index_select(0, reference_order),
        query_groups=groups,
    )


def _retrieval_metrics(
    sets: PreparedSets, ranked: RankSums | None = None, unranked: torch.Tensor | None = None
) -> tuple[dict[str, float], list[str]]:
    """R@1 and MAP@R: ``ranked`` (the pass's sums) plus a ranking of the query rows
    ``unranked`` (all rows without ``ranked``); those that do not fit the memory budget
    are NaN, with a note."""
    nan = float("nan")
    ranked = RankSums() if ranked is None else ranked
    if unranked is not None and unranked.numel() == 0:
        return ranked.metrics(), []
    try:
        rest = retrieval_sums_of_sets(sets, rows_are_unit=True, rows=unranked)
        return (ranked + rest).metrics(), []
    except RetrievalMemoryError as error:
        note = f"MAP@R skipped: {error}"
    try:
        rest = retrieval_sums_of_sets(
            sets, include=("precision_at_1",), rows_are_unit=True, rows=unranked
        )
    except RetrievalMemoryError as error:
        return dict.fromkeys(RETRIEVAL_METRICS, nan), [f"R@1, MAP@R skipped: {error}"]
    values = (ranked + rest).metrics(("precision_at_1",))
    return {**values, "mean_average_precision_at_r": nan}, [note]

"""The numbers of ``pml-tcm report``, all from :func:`compute_report`.

The sets are prepared once (:func:`pml_tcm.functional.prepare.prepare_sets`); OPIS,
ε-OPIS and the global threshold for a target FAR with its per-class FAR/FRR come from one
guide and one pass over the pairs (:func:`pml_tcm.functional.opis.evaluate_sets`: the
same numbers as :class:`pml_tcm.OPISAccuracyCalculator` and
:func:`pml_tcm.calibrate_threshold`), R@1 and MAP@R from the exact bounded-memory
ranking (:func:`pml_tcm.functional.retrieval.retrieval_metrics`, pml's definitions).
Embeddings are L2-normalised first, as pml's testers do, so every number is cosine-based.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..calibration import CalibrationReport, calibration_report
from ..functional.normalize import unit_rows_into
from ..functional.opis import OPISResult, evaluate_sets
from ..functional.prepare import PreparedSets, prepare_sets
from ..functional.retrieval import RETRIEVAL_METRICS, RetrievalMemoryError, retrieval_metrics
from .inputs import ReportInputError, require_pairs

REPORT_METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")


@dataclass
class EmbeddingReport:
    """Everything ``pml-tcm report`` computes.

    Attributes:
        metrics: :data:`REPORT_METRICS` values.
        opis_result: the OPIS result (per-class utility curves).
        calibration: the threshold for the target FAR and its per-class FAR/FRR.
        num_queries: number of query embeddings.
        num_references: number of reference embeddings (the queries when no reference
            set is given).
        notes: one line per metric skipped (NaN in ``metrics``) and why.
    """

    metrics: dict[str, float]
    opis_result: OPISResult
    calibration: CalibrationReport
    num_queries: int
    num_references: int
    notes: list[str] = field(default_factory=list)

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
    overwrite: bool = False,
) -> EmbeddingReport:
    """The report for in-memory arrays.

    Without a reference set the embeddings are their own references, self pairs
    excluded. Everything (R@1 and MAP@R, OPIS, calibration) runs on ``device``; R@1 and
    MAP@R rank on the host and are skipped (NaN, with a note) when one query's ranking
    does not fit their memory budget.

    Args:
        embeddings: ``(N, D)`` float queries.
        labels: ``(N,)`` their class labels.
        reference: ``(M, D)`` references, or ``None`` for the embeddings themselves.
        reference_labels: ``(M,)`` labels of ``reference``.
        far_range: ``(far_lo, far_hi)`` of the range OPIS is measured over (fractions).
        target_far: the FAR (a fraction) the threshold is calibrated for.
        device: where to compute.
        overwrite: normalise ``embeddings`` and ``reference`` in place where they are
            writable float32/float64 arrays and ``device`` is the CPU (the command line's
            own loaded arrays): one copy of each set less.

    Raises:
        ValueError: bad settings or sets (e.g. a single class: no negative pair).
    """
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
        names=("embeddings", "labels", "reference", "reference labels"),
    )
    # OPIS and the calibrated threshold from one guide and one pass over the pairs
    evaluation = evaluate_sets(sets, far_range=far_range, target_far=target_far)
    calibration = calibration_report(
        evaluation.threshold,
        ("far", float(target_far)),
        sets.label_values[evaluation.classes.cpu()],
        evaluation.errors,
    )
    result = evaluation.opis
    # R@1 and MAP@R in bounded memory (pml's k-NN search holds N x max R neighbours)
    knn, notes = _retrieval_metrics(sets)
    metrics = {**knn, "opis": result.opis, "eps_opis": result.eps_opis}
    return EmbeddingReport(
        {name: float(metrics[name]) for name in REPORT_METRICS},
        result,
        calibration,
        len(sets.queries),
        len(sets.references),
        notes,
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


def _retrieval_metrics(sets: PreparedSets) -> tuple[dict[str, float], list[str]]:
    """R@1 and MAP@R; those that do not fit the memory budget are NaN, with a note."""
    refs = (None, None)
    if not sets.references_are_queries:
        refs = (sets.references, sets.reference_ids)
    queries, ids, nan = sets.queries, sets.query_ids, float("nan")
    try:
        return retrieval_metrics(queries, ids, *refs, rows_are_unit=True), []
    except RetrievalMemoryError as error:
        note = f"MAP@R skipped: {error}"
    try:
        values = retrieval_metrics(
            queries, ids, *refs, include=("precision_at_1",), rows_are_unit=True
        )
    except RetrievalMemoryError as error:
        return dict.fromkeys(RETRIEVAL_METRICS, nan), [f"R@1, MAP@R skipped: {error}"]
    return {**values, "mean_average_precision_at_r": nan}, [note]

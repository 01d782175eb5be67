"""``pml-tcm report``: accuracy, OPIS and a calibrated threshold for saved embeddings.

For embeddings a user saved from any model (``.npy``): R@1 and MAP@R (exact, in bounded
memory: :func:`pml_tcm.functional.retrieval.retrieval_metrics`), OPIS and ε-OPIS
(through :class:`pml_tcm.OPISAccuracyCalculator`), the global threshold for a target FAR
with the per-class FAR/FRR spread (:func:`pml_tcm.calibration.calibrate_threshold`), the
worst classes, and the utility-curve PNG (:func:`pml_tcm.plotting.plot_utility_curves`).
Embeddings are L2-normalised first, as pml's testers do, so every number is cosine-based.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accuracy import OPISAccuracyCalculator
from .calibration import CalibrationReport, calibrate_threshold
from .functional.normalize import unit_rows
from .functional.opis import OPISResult
from .functional.retrieval import RETRIEVAL_METRICS, RetrievalMemoryError, retrieval_metrics
from .output_files import folder_problem, write_whole

REPORT_METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")


class ReportInputError(ValueError):
    """A file given to ``report`` is missing or malformed; the message is one line."""


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
        mean utility ``⟨U_c⟩`` over the calibration range."""
        result, calibration = self.opis_result, self.calibration
        rates = {
            label: (float(far), float(frr))
            for label, far, frr in zip(
                calibration.classes.tolist(), calibration.class_far, calibration.class_frr
            )
        }
        order = torch.argsort(result.mean_class_utility, stable=True)[:count]
        rows = []
        for index in order.tolist():
            label = result.classes[index].item()
            far, frr = rates.get(label, (float("nan"), float("nan")))
            rows.append((label, float(result.mean_class_utility[index]), far, frr))
        return rows

    def text(self, worst: int) -> str:
        """The report as printed by the CLI."""
        result = self.opis_result
        low, high = result.calibration_range
        lines = [
            f"{self.num_queries} queries vs {self.num_references} references, "
            f"{len(result.classes)} classes",
            f"R@1       {self.metrics['precision_at_1']:.4f}",
            f"MAP@R     {self.metrics['mean_average_precision_at_r']:.4f}",
            f"OPIS      {self.metrics['opis']:.4g}  (calibration range: similarity "
            f"{low:.4f} .. {high:.4f})",
            f"eps-OPIS  {self.metrics['eps_opis']:.4g}  (epsilon {result.epsilon:g})",
            *self.notes,
            "",
            self.calibration.summary(),
            "",
            "worst classes (lowest mean utility over the calibration range):",
            "| class | mean utility | FAR | FRR |",
            "|---|---|---|---|",
        ]
        for label, utility, far, frr in self.worst_classes(worst):
            lines.append(f"| {label} | {utility:.4f} | {far:.4%} | {frr:.4%} |")
        return "\n".join(lines)


def load_embeddings(path: Path, what: str) -> np.ndarray:
    """An ``(N, D)`` finite float array from a ``.npy`` file.

    Raises:
        ReportInputError: missing/unreadable file, wrong shape or dtype, NaN/Inf.
    """
    array = _load_npy(path, what)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ReportInputError(
            f"{what} {path} must be a non-empty (N, D) array, got shape {array.shape}"
        )
    if array.dtype.kind not in "fiu":
        raise ReportInputError(f"{what} {path} must hold numbers, got dtype {array.dtype}")
    array = array.astype(np.float32 if array.dtype != np.float64 else np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ReportInputError(f"{what} {path} contains NaN or Inf (first at row {row})")
    if (np.linalg.norm(array, axis=1) == 0).any():
        row = int(np.flatnonzero(np.linalg.norm(array, axis=1) == 0)[0])
        raise ReportInputError(f"{what} {path} has an all-zero row ({row}); it has no direction")
    return array


def load_labels(path: Path, what: str, expected: int) -> np.ndarray:
    """An ``(expected,)`` array of class labels from a ``.npy`` file: integers of any
    size, bools or floats (compared by value), kept in their dtype.

    Raises:
        ReportInputError: missing/unreadable file, wrong shape or length, not numbers,
            NaN.
    """
    array = _load_npy(path, what)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ReportInputError(f"{what} {path} must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ReportInputError(
            f"{what} {path} must hold class labels (integers, bools or floats), got dtype "
            f"{array.dtype}"
        )
    if array.shape[0] != expected:
        raise ReportInputError(
            f"{what} {path} has {array.shape[0]} labels but there are {expected} embeddings"
        )
    if array.dtype.kind == "f" and np.isnan(array).any():
        row = int(np.flatnonzero(np.isnan(array))[0])
        raise ReportInputError(f"{what} {path} contains NaN (first at row {row})")
    return array


def compute_report(
    embeddings: np.ndarray,
    labels: np.ndarray,
    reference: np.ndarray | None = None,
    reference_labels: np.ndarray | None = None,
    far_range: tuple[float, float] = (1e-3, 1e-2),
    target_far: float = 1e-3,
    device: str | torch.device = "cpu",
) -> EmbeddingReport:
    """The report for in-memory arrays (see :func:`report_embeddings`).

    Without a reference set the embeddings are their own references, self pairs
    excluded. Everything (R@1 and MAP@R, OPIS, calibration) runs on ``device``; R@1 and
    MAP@R rank on the host and are skipped (NaN, with a note) when one query's ranking
    does not fit their memory budget.

    Raises:
        ValueError: bad settings or sets (e.g. a single class: no negative pair).
    """
    _require_positive_pairs(labels, reference_labels)
    device = torch.device(device)
    queries = unit_rows(torch.as_tensor(embeddings).to(device))
    query_labels = torch.as_tensor(labels).to(device)
    if reference is None:
        references, ref_labels, ref_includes_query = queries, query_labels, True
    else:
        if reference.shape[1] != embeddings.shape[1]:
            raise ReportInputError(
                f"reference has embedding size {reference.shape[1]}, embeddings "
                f"{embeddings.shape[1]}"
            )
        references = torch.as_tensor(reference).to(device=device, dtype=queries.dtype)
        references = unit_rows(references)
        ref_labels, ref_includes_query = torch.as_tensor(reference_labels).to(device), False
    calculator = OPISAccuracyCalculator(
        far_range=far_range, include=("opis", "eps_opis"), device=device
    )
    accuracies = calculator.get_accuracy(
        queries, query_labels, references, ref_labels, ref_includes_query
    )
    # R@1 and MAP@R in bounded memory (pml's k-NN search holds N x max R neighbours)
    knn, notes = _retrieval_metrics(queries, query_labels, references, ref_labels)
    accuracies.update(knn)
    calibration = calibrate_threshold(
        queries,
        query_labels,
        None if reference is None else references,
        None if reference is None else ref_labels,
        target_far=target_far,
    )
    return EmbeddingReport(
        {name: float(accuracies[name]) for name in REPORT_METRICS},
        calculator.last_result,
        calibration,
        len(queries),
        len(references),
        notes,
    )


def _require_positive_pairs(labels: np.ndarray, reference_labels: np.ndarray | None) -> None:
    """R@1, MAP@R and OPIS need a query with a positive pair (same class, not itself)."""
    labels = np.asarray(labels)
    if reference_labels is None:
        _, counts = np.unique(labels, return_counts=True)
        if (counts < 2).all():
            raise ReportInputError(
                "every class has a single sample: no query has a positive pair, so R@1, "
                "MAP@R and OPIS are undefined"
            )
    elif not np.isin(labels, np.asarray(reference_labels)).any():
        raise ReportInputError(
            "the reference set shares no class with the embeddings: no query has a "
            "positive pair, so R@1, MAP@R and OPIS are undefined"
        )


def _retrieval_metrics(
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    references: torch.Tensor,
    ref_labels: torch.Tensor,
) -> tuple[dict[str, float], list[str]]:
    """R@1 and MAP@R; those that do not fit the memory budget are NaN, with a note."""
    refs = (None, None) if references is queries else (references, ref_labels)
    nan = float("nan")
    try:
        return retrieval_metrics(queries, query_labels, *refs), []
    except RetrievalMemoryError as error:
        note = f"MAP@R skipped: {error}"
    try:
        values = retrieval_metrics(queries, query_labels, *refs, include=("precision_at_1",))
    except RetrievalMemoryError as error:
        return dict.fromkeys(RETRIEVAL_METRICS, nan), [f"R@1, MAP@R skipped: {error}"]
    return {**values, "mean_average_precision_at_r": nan}, [note]


def report_embeddings(
    embeddings: Path,
    labels: Path,
    reference: Path | None = None,
    reference_labels: Path | None = None,
    far_range: tuple[float, float] = (1e-3, 1e-2),
    target_far: float = 1e-3,
    worst: int = 5,
    out: Path = Path("report_out"),
    device: str | torch.device = "cpu",
) -> EmbeddingReport:
    """Load the files, print the report, write ``report.md`` (Markdown: metrics,
    threshold, worst classes, inputs with checksums, settings, versions), ``report.json``
    (the same at full precision) and ``utility_curves.png`` into ``out``.

    Raises:
        ReportInputError: a file is missing or malformed, or only one of ``reference``
            and ``reference_labels`` is given.
        ValueError: bad settings.
    """
    if (reference is None) != (reference_labels is None):
        raise ReportInputError("give --reference and --reference-labels together")
    if worst < 1:
        raise ReportInputError(f"--worst must be positive, got {worst}")
    problem = folder_problem(Path(out), "--out")
    if problem is not None:  # checked before any work
        raise ReportInputError(problem)
    query = load_embeddings(Path(embeddings), "embeddings")
    query_labels = load_labels(Path(labels), "labels", len(query))
    ref = ref_labels = None
    if reference is not None:
        ref = load_embeddings(Path(reference), "reference")
        ref_labels = load_labels(Path(reference_labels), "reference labels", len(ref))
    report = compute_report(
        query, query_labels, ref, ref_labels, far_range, target_far, device=device
    )
    from .plotting import plot_utility_curves
    from .report_document import InputFile, Provenance, report_json, report_markdown

    given = [("embeddings", embeddings), ("labels", labels)]
    if reference is not None:
        given += [("reference", reference), ("reference labels", reference_labels)]
    inputs = [InputFile.of(role, Path(path)) for role, path in given]
    settings = {
        "far_range": tuple(far_range),
        "target_far": target_far,
        "worst": worst,
        "device": str(device),
    }
    provenance = Provenance.now()
    text = report.text(worst)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        out / "report.md": "the report in Markdown, with inputs, settings and versions",
        out / "report.json": "the same numbers at full precision, machine-readable",
        out / "utility_curves.png": "per-class utility vs threshold, calibrated threshold marked",
    }
    paths = list(files)
    markdown = report_markdown(report, worst, inputs, settings, provenance)
    as_json = report_json(report, worst, inputs, settings, provenance)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.8, 4.8), layout="constrained")
    plot_utility_curves(
        report.opis_result,
        ax=figure.add_subplot(),
        threshold=report.calibration.threshold,
        threshold_label=f"threshold for\nFAR {target_far:g}: {report.calibration.threshold:.4f}",
        title=f"OPIS {report.metrics['opis']:.4g}   ε-OPIS {report.metrics['eps_opis']:.4g}",
        legend=False,
    )
    handles = [line for line in figure.axes[0].get_lines() if not line.get_label().startswith("_")]
    labels = [line.get_label() for line in handles]
    if len(handles) > 12:  # the classes share one colour: one entry for them all
        handles, labels = handles[:1] + handles[-2:], ["each class"] + labels[-2:]
    figure.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    figure.suptitle(
        "Per-class utility (F1) vs similarity threshold over the calibration range; black: "
        "all classes pooled.\nLower OPIS is better: the class curves stay closer to the "
        "pooled one, so one threshold suits every class.",
        fontsize=9,
    )
    try:
        write_whole(paths[0], lambda partial: partial.write_text(markdown))
        write_whole(paths[1], lambda partial: partial.write_text(as_json))
        write_whole(paths[2], lambda partial: figure.savefig(partial, dpi=120, format="png"))
    except OSError as error:
        raise ReportInputError(
            f"cannot write into --out {out}: {error.strerror or error}"
        ) from error
    print(text)
    print()
    for path, what in files.items():
        print(f"wrote {path}  ({what})")
    return report


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ReportInputError(f"{what} file {path} does not exist")
    try:
        # memory-mapped first: the header is checked against the file's size before any
        # allocation (a header claiming 10^12 rows fails here, not in the allocator)
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        if isinstance(array, np.ndarray):
            array = np.array(array, order="C")  # also a Fortran-order array, as C order
    except Exception as error:  # noqa: BLE001 - numpy's header parser raises many kinds
        # (ValueError, SyntaxError, tokenize errors, EOFError, OSError, MemoryError, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ReportInputError(f"cannot read {what} file {path} as .npy: {reason}") from error
    if not isinstance(array, np.ndarray):
        raise ReportInputError(
            f"{what} file {path} holds several arrays (.npz); save one with np.save"
        )
    return array

"""``pml-tcm report``: check everything, load once, compute, render, write the set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..output_files import write_file_set
from ..plotting import INSTALL_HINT
from ..provenance import Provenance, sha256_file
from . import render
from .compute import BOOTSTRAP, EmbeddingReport, compute_report
from .inputs import (
    InputFile,
    ReportInputError,
    check_file,
    check_out,
    check_settings,
    load_embeddings,
    load_groups,
    load_labels,
)

FILES = {
    "report.md": "the report in Markdown, with inputs, settings and versions",
    render.FIGURE_NAME: "per-class utility vs threshold, worst classes and threshold marked",
    render.GROUP_FIGURE_NAME: "per-group FAR and FRR at the threshold with their intervals",
    "report.json": "the same numbers at full precision, machine-readable; lists the set",
}


SEED = 0
"""The bootstrap's seed (recorded in the settings: the intervals are reproducible)."""


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
    groups: Path | None = None,
    bootstrap: int = BOOTSTRAP,
    confidence: float = 0.95,
) -> EmbeddingReport:
    """Check the settings, ``out`` and the files, load them, print the report, and write
    ``report.md``, ``report.json`` and (with matplotlib) ``utility_curves.png`` (and,
    with ``groups``, ``group_rates.png``) into ``out`` as one set
    (:func:`pml_tcm.output_files.write_file_set`).

    Without matplotlib the figures are left out (and older ones in ``out`` removed, so
    that the folder holds one run's files); a line says which extra adds them. A figure
    this run does not make (``group_rates.png`` without ``groups``) is removed too.

    ``groups`` is a ``.npy`` of one group id per query; ``bootstrap`` replicates give
    the intervals (``0``: none) at level ``confidence``.

    Raises:
        ReportInputError: before any work: a bad setting, a bad ``out``, a file that is
            missing, not a regular file or malformed, or only one of ``reference`` and
            ``reference_labels``; after it: ``out`` cannot be written.
    """
    if (reference is None) != (reference_labels is None):
        raise ReportInputError("give --reference and --reference-labels together")
    far_range, target_far = check_settings(
        far_range, target_far, worst, device, bootstrap, confidence
    )
    out = Path(out)
    check_out(out)
    given = [("embeddings", embeddings), ("labels", labels)]
    if reference is not None:
        given += [("reference", reference), ("reference labels", reference_labels)]
    if groups is not None:
        given.append(("groups", groups))
    for role, path in given:
        check_file(Path(path), role)
    figure_note = _figure_unavailable()

    query = load_embeddings(Path(embeddings), "embeddings")
    query_labels = load_labels(Path(labels), "labels", len(query))
    ref: np.ndarray | None = None
    ref_labels: np.ndarray | None = None
    if reference is not None:
        ref = load_embeddings(Path(reference), "reference")
        ref_labels = load_labels(Path(reference_labels), "reference labels", len(ref))
    query_groups = None if groups is None else load_groups(Path(groups), len(query))
    report = compute_report(
        query,
        query_labels,
        ref,
        ref_labels,
        far_range,
        target_far,
        device=device,
        groups=query_groups,
        bootstrap=bootstrap,
        confidence=confidence,
        seed=SEED,
        overwrite=True,
    )
    del query, ref  # the report keeps what it needs

    record = render.ReportRecord(
        inputs=[InputFile.of(role, Path(path)) for role, path in given],
        settings={
            "far_range": far_range,
            "target_far": target_far,
            "worst": worst,
            "device": str(device),
            "bootstrap": bootstrap,
            "confidence": float(confidence),
            "seed": SEED,
        },
        provenance=Provenance.now(),
        figure=None if figure_note else render.FIGURE_NAME,
        figure_note=figure_note,
        group_figure=(
            None if figure_note or report.calibration.groups is None else render.GROUP_FIGURE_NAME
        ),
    )
    writers = {"report.md": lambda path: path.write_text(render.markdown(report, worst, record))}
    if figure_note is None:
        metadata = {"Title": f"pml-tcm report, run {record.provenance.run}"}
        drawings = {render.FIGURE_NAME: render.figure(report, worst, target_far)}
        if record.group_figure is not None:
            drawings[record.group_figure] = render.group_figure(report, worst)
        for name, drawing in drawings.items():
            writers[name] = _png_writer(drawing, metadata)

    def manifest(path: Path) -> None:
        files = {name: sha256_file(path.parent / name) for name in writers if name != path.name}
        path.write_text(render.json_document(report, worst, record, files))

    writers["report.json"] = manifest  # last: it names the others
    try:
        written = write_file_set(
            out, writers, remove=[render.FIGURE_NAME, render.GROUP_FIGURE_NAME]
        )
    except OSError as error:
        raise ReportInputError(
            f"cannot write into --out {out}: {error.strerror or error}"
        ) from error
    print(render.text(report, worst))
    print()
    for path in written:
        print(f"wrote {path}  ({FILES[path.name]})")
    if figure_note is not None:
        missing = [render.FIGURE_NAME]
        if report.calibration.groups is not None:
            missing.append(render.GROUP_FIGURE_NAME)
        for name in missing:
            print(f"no {name}: {figure_note}")
    return report


def _png_writer(drawing: Any, metadata: dict[str, str]) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        drawing.savefig(path, dpi=120, format="png", metadata=metadata)

    return write


def _figure_unavailable() -> str | None:
    """Why the figure cannot be drawn (matplotlib missing), or ``None``."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        return f"the figure needs matplotlib: {INSTALL_HINT}"
    return None

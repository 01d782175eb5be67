"""The files of ``pml-tcm report``: ``report.md`` (Markdown) and ``report.json``.

Both record the numbers the terminal shows (the Markdown with the same formatting, the
JSON at full precision), the input files with their shapes and SHA-256, the settings,
the pml-tcm / pytorch-metric-learning / torch versions and the time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .provenance import sha256_file, software_versions, utc_now

if TYPE_CHECKING:
    from .embedding_report import EmbeddingReport

METRIC_ROWS = (
    ("precision_at_1", "R@1", ".4f", "higher is better"),
    ("mean_average_precision_at_r", "MAP@R", ".4f", "higher is better"),
    ("opis", "OPIS", ".4g", "lower is better: one threshold fits the classes more evenly"),
    ("eps_opis", "ε-OPIS", ".4g", "lower is better: the worst classes are less far off"),
)


@dataclass(frozen=True)
class InputFile:
    """One input file as the report records it.

    Attributes:
        role: ``"embeddings"``, ``"labels"``, ``"reference"`` or ``"reference labels"``.
        path: the path as given.
        shape: the array's shape.
        dtype: the array's dtype as stored.
        sha256: the SHA-256 of the file's bytes.
    """

    role: str
    path: Path
    shape: tuple[int, ...]
    dtype: str
    sha256: str

    @classmethod
    def of(cls, role: str, path: str | Path) -> InputFile:
        """Shape and dtype of a ``.npy`` file (memory-mapped: no data read) and its hash."""
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return cls(role, Path(path), tuple(array.shape), str(array.dtype), sha256_file(path))


@dataclass(frozen=True)
class Provenance:
    """What produced a report: the versions and the time (UTC, ISO 8601)."""

    versions: dict[str, str]
    created: str

    @classmethod
    def now(cls) -> Provenance:
        return cls(software_versions(), utc_now())


def report_markdown(
    report: EmbeddingReport,
    worst: int,
    inputs: list[InputFile],
    settings: dict[str, Any],
    provenance: Provenance,
    figure: str | None = "utility_curves.png",
) -> str:
    """``report.md``: headings, the metrics, the calibrated threshold, the worst classes,
    the inputs with shapes and checksums, the settings and the versions."""
    result = report.opis_result
    low, high = result.calibration_range
    versions = ", ".join(f"{name} {version}" for name, version in provenance.versions.items())
    reference = (
        "the embeddings themselves, self pairs excluded"
        if not any(f.role == "reference" for f in inputs)
        else "the reference set listed under Inputs"
    )
    title = f": `{inputs[0].path.name}`" if inputs else ""
    lines = [
        f"# pml-tcm report{title}",
        "",
        f"{report.num_queries} queries vs {report.num_references} references ({reference}); "
        f"{len(result.classes)} classes. Embeddings are L2-normalised, so every number is "
        "cosine-based.",
        "",
        "## Metrics",
        "",
        "| metric | value | reading |",
        "|---|---|---|",
    ]
    for key, name, spec, reading in METRIC_ROWS:
        lines.append(f"| {name} | {format(report.metrics[key], spec)} | {reading} |")
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    lines += [
        "",
        f"OPIS and ε-OPIS (ε = {result.epsilon:g}) are measured over the similarity "
        f"thresholds {low:.4f} .. {high:.4f}, where the pooled FAR runs from "
        f"{settings['far_range'][1]:g} to {settings['far_range'][0]:g}.",
        "",
        "## Calibrated threshold",
        "",
    ]
    lines += [f"- {line}" for line in report.calibration.summary().splitlines()]
    lines += [
        "",
        "## Worst classes",
        "",
        "The classes with the lowest mean utility over the calibration range, with their "
        "FAR and FRR at the calibrated threshold.",
        "",
        "| class | mean utility | FAR | FRR |",
        "|---|---|---|---|",
    ]
    for label, utility, far, frr in report.worst_classes(worst):
        lines.append(f"| {label} | {utility:.4f} | {far:.4%} | {frr:.4%} |")
    if figure is not None:
        lines += ["", f"![Per-class utility curves]({figure})"]
    lines += [
        "",
        "## Inputs",
        "",
        "| role | file | shape | dtype | sha256 |",
        "|---|---|---|---|---|",
    ]
    for item in inputs:
        shape = " × ".join(map(str, item.shape))
        lines.append(f"| {item.role} | `{item.path}` | {shape} | {item.dtype} | `{item.sha256}` |")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    for name, value in settings.items():
        lines.append(f"| {name} | {_setting_text(value)} |")
    lines += ["", "## Provenance", "", f"Created {provenance.created} with {versions}.", ""]
    return "\n".join(lines)


def report_json(
    report: EmbeddingReport,
    worst: int,
    inputs: list[InputFile],
    settings: dict[str, Any],
    provenance: Provenance,
) -> str:
    """``report.json``: the same content at full precision (NaN written as ``null``)."""
    result, calibration = report.opis_result, report.calibration
    document = {
        "created": provenance.created,
        "versions": provenance.versions,
        "inputs": [
            {
                "role": item.role,
                "path": str(item.path),
                "shape": list(item.shape),
                "dtype": item.dtype,
                "sha256": item.sha256,
            }
            for item in inputs
        ],
        "settings": settings,
        "num_queries": report.num_queries,
        "num_references": report.num_references,
        "num_classes": len(result.classes),
        "metrics": dict(report.metrics),
        "notes": list(report.notes),
        "calibration_range": list(result.calibration_range),
        "epsilon": result.epsilon,
        "calibration": {
            "threshold": calibration.threshold,
            "target": {calibration.target[0]: calibration.target[1]},
            "far": calibration.far,
            "frr": calibration.frr,
            "worst_far_class": calibration.worst_far_class,
            "worst_far": calibration.worst_far,
            "worst_frr_class": calibration.worst_frr_class,
            "worst_frr": calibration.worst_frr,
            "far_spread": calibration.far_spread,
            "frr_spread": calibration.frr_spread,
            "far_percentiles": {str(p): v for p, v in calibration.far_percentiles.items()},
            "frr_percentiles": {str(p): v for p, v in calibration.frr_percentiles.items()},
        },
        "worst_classes": [
            {"label": label, "mean_utility": utility, "far": far, "frr": frr}
            for label, utility, far, frr in report.worst_classes(worst)
        ],
    }
    return json.dumps(_finite(document), indent=2, ensure_ascii=False) + "\n"


def _finite(value: Any) -> Any:
    """JSON has no NaN: write ``null`` for it (and plain lists for tuples)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _setting_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " .. ".join(_setting_text(item) for item in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)

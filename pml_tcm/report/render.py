"""Every form of the report, from one place: the terminal text, ``report.md``,
``report.json`` and the utility figure.

:func:`read` turns the computed numbers into what they mean (the scale of OPIS and
ε-OPIS against the pooled utility, the per-class FAR/FRR at the threshold, warnings);
the renderers below only lay that out, each row and rate formatted by one function.
Rates are fractions, as the user types them (``--target-far 1e-3``), shown with their
percentage.
"""

from __future__ import annotations

import json
import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

from ..functional.far_search import ceil_fraction_of
from ..functional.opis import grid_mean
from ..provenance import Provenance
from .compute import EmbeddingReport
from .inputs import InputFile

FIGURE_NAME = "utility_curves.png"
MAX_HIGHLIGHTED = 10  # the figure singles out at most this many of the worst classes
HIGH_FRR = 0.5  # a pooled FRR above this at the calibrated threshold is flagged

METRIC_ROWS = (
    ("precision_at_1", "R@1", ".4f", "higher is better"),
    ("mean_average_precision_at_r", "MAP@R", ".4f", "higher is better"),
    ("opis", "OPIS", ".4g", "lower is better: one threshold fits the classes more evenly"),
    ("eps_opis", "ε-OPIS", ".4g", "lower is better: the worst classes are less far off"),
)
WORST_HEADER = ("class", "mean utility", "FAR", "FRR")


@dataclass(frozen=True)
class Reading:
    """What the report's numbers mean.

    Attributes:
        mean_pooled_utility: ``⟨U_all⟩``, the pooled utility averaged over the
            calibration range.
        typical_gap: ``sqrt(OPIS)``: the root-mean-square gap between a class's
            utility and the pooled one over the range.
        relative_gap: ``typical_gap / mean_pooled_utility`` (NaN when that is 0).
        eps_gap: ``sqrt(ε-OPIS)``: how far the worst ε of the classes trail the rest.
        eps_classes: how many classes that worst ε is.
        num_included: classes with a positive pair (those OPIS averages over).
        excluded: labels of the classes without one.
        far_band: ``(p5, p95)`` of the per-class FAR at the threshold.
        frr_band: ``(p5, p95)`` of the per-class FRR.
        warnings: one line each.
    """

    mean_pooled_utility: float
    typical_gap: float
    relative_gap: float
    eps_gap: float
    eps_classes: int
    num_included: int
    excluded: list[Any]
    far_band: tuple[float, float]
    frr_band: tuple[float, float]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReportRecord:
    """What the files record beside the numbers.

    Attributes:
        inputs: the input files.
        settings: ``far_range``, ``target_far``, ``worst``, ``device``.
        provenance: versions, time and run id.
        figure: the figure's file name, or ``None`` when it is not drawn.
        figure_note: why there is no figure (one line), or ``None``.
    """

    inputs: list[InputFile]
    settings: dict[str, Any]
    provenance: Provenance
    figure: str | None = FIGURE_NAME
    figure_note: str | None = None


def read(report: EmbeddingReport) -> Reading:
    """The :class:`Reading` of ``report``."""
    result, calibration = report.opis_result, report.calibration
    mean_pooled = float(grid_mean(result.pooled_utility, result.thresholds))
    opis, eps_opis = report.metrics["opis"], report.metrics["eps_opis"]
    typical = math.sqrt(opis) if opis >= 0 else math.nan
    num_included = int((~result.excluded).sum())
    far, frr = calibration.far_percentiles, calibration.frr_percentiles
    warnings = []
    low, high = result.calibration_range
    if low == high:
        warnings.append(
            f"the FAR range collapses to the single threshold {low:.6g}: too few negative "
            "pairs (or too many tied scores) to tell its ends apart, so OPIS is measured at "
            "one point; widen --far-range or give more samples"
        )
    if calibration.frr > HIGH_FRR:
        kind, target = calibration.target
        warnings.append(
            f"the pooled FRR at the calibrated threshold is {rate(calibration.frr)}: at "
            f"{kind.upper()} {rate(target)} most genuine pairs are rejected; the embeddings "
            "do not separate the classes this strictly (a larger --target-far trades false "
            "accepts for fewer false rejects)"
        )
    excluded = report.excluded_classes()
    return Reading(
        mean_pooled_utility=mean_pooled,
        typical_gap=typical,
        relative_gap=typical / mean_pooled if mean_pooled > 0 else math.nan,
        eps_gap=math.sqrt(eps_opis) if eps_opis >= 0 else math.nan,
        eps_classes=max(1, ceil_fraction_of(result.epsilon, num_included)),
        num_included=num_included,
        excluded=excluded,
        far_band=(far[5], far[95]),
        frr_band=(frr[5], frr[95]),
        warnings=warnings,
    )


def rate(value: float) -> str:
    """A rate as the fraction the user types and its percentage: ``0.001 (0.1%)``."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g} ({100 * value:.4g}%)"


def worst_row(row: tuple[Any, float, float, float]) -> str:
    """One row of the worst-classes table (terminal and Markdown alike)."""
    label, utility, far, frr = row
    return f"| {label} | {utility:.4f} | {rate(far)} | {rate(frr)} |"


def reading_lines(report: EmbeddingReport, reading: Reading) -> list[str]:
    """The report's reading in plain words, one paragraph a line."""
    result, calibration = report.opis_result, report.calibration
    kind, target = calibration.target
    lines = [
        f"OPIS {report.metrics['opis']:.4g} is the mean squared gap between a class's "
        f"utility (F{result.beta:g}) and the pooled utility over the calibration range "
        f"(0: every class behaves like the pool). Its root, {reading.typical_gap:.3g}, is "
        f"the typical per-class gap; the pooled utility averages "
        f"{reading.mean_pooled_utility:.3g} there, so a typical class sits "
        f"{_percent(reading.relative_gap)} off it.",
    ]
    if reading.eps_classes < reading.num_included:
        lines.append(
            f"ε-OPIS {report.metrics['eps_opis']:.4g}: the worst {_percent(result.epsilon)} of the "
            f"classes ({reading.eps_classes} of {reading.num_included}) trail the rest by "
            f"{reading.eps_gap:.3g} in utility (its root)."
        )
    else:
        lines.append(
            f"ε-OPIS is 0 by definition here: {reading.num_included} class(es) leave no "
            f"rest to compare the worst {_percent(result.epsilon)} with."
        )
    if calibration.worst_far_class is not None:
        far_lo, far_hi = reading.far_band
        frr_lo, frr_hi = reading.frr_band
        lines.append(
            f"At the calibrated threshold the per-class rates spread: the middle 90% of "
            f"the classes (p5 .. p95) have FAR {rate(far_lo)} .. {rate(far_hi)} "
            f"({_times(far_lo, target)} .. {_times(far_hi, target)} the target {kind.upper()} "
            f"{target:g}) and FRR {rate(frr_lo)} .. {rate(frr_hi)}."
        )
    if reading.excluded:
        shown = ", ".join(map(str, reading.excluded[:10]))
        more = f" and {len(reading.excluded) - 10} more" if len(reading.excluded) > 10 else ""
        lines.append(
            f"{len(reading.excluded)} class(es) have no positive pair (a single sample) and "
            f"are left out of OPIS, the worst classes and the figure: {shown}{more}."
        )
    return lines


def calibration_lines(report: EmbeddingReport) -> list[str]:
    """The threshold, the pooled FAR/FRR and the per-class spread."""
    calibration = report.calibration
    kind, target = calibration.target
    lines = [
        f"threshold {calibration.threshold:.6g} for target {kind.upper()} {target:g} "
        f"({100 * target:.4g}%)",
        f"pooled: FAR {rate(calibration.far)}  FRR {rate(calibration.frr)}",
    ]
    for name, worst_class, worst, spread, percentiles in (
        (
            "FAR",
            calibration.worst_far_class,
            calibration.worst_far,
            calibration.far_spread,
            calibration.far_percentiles,
        ),
        (
            "FRR",
            calibration.worst_frr_class,
            calibration.worst_frr,
            calibration.frr_spread,
            calibration.frr_percentiles,
        ),
    ):
        if worst_class is None:
            lines.append(f"per class {name}: no class has such pairs")
            continue
        shown = "  ".join(f"p{p} {value:.4g}" for p, value in percentiles.items())
        lines.append(
            f"per class {name}: worst {rate(worst)} (class {worst_class}), spread "
            f"{rate(spread)}; {shown}"
        )
    return lines


def text(report: EmbeddingReport, worst: int, width: int = 100) -> str:
    """The report as the terminal shows it."""
    result = report.opis_result
    low, high = result.calibration_range
    reading = read(report)
    lines = [
        f"{report.num_queries} queries vs {report.num_references} references, "
        f"{len(result.classes)} classes",
        f"R@1       {report.metrics['precision_at_1']:.4f}",
        f"MAP@R     {report.metrics['mean_average_precision_at_r']:.4f}",
        f"OPIS      {report.metrics['opis']:.4g}  (calibration range: similarity "
        f"{low:.4f} .. {high:.4f})",
        f"eps-OPIS  {report.metrics['eps_opis']:.4g}  (epsilon {result.epsilon:g})",
        *report.notes,
        "",
        *calibration_lines(report),
        "",
        "reading:",
    ]
    for paragraph in reading_lines(report, reading):
        lines += textwrap.wrap(
            paragraph, width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
        )
    for warning in reading.warnings:
        lines += textwrap.wrap(
            f"warning: {warning}",
            width,
            initial_indent="  ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
    lines += [
        "",
        "worst classes (lowest mean utility over the calibration range; FAR and FRR at the "
        "threshold):",
        f"| {' | '.join(WORST_HEADER)} |",
        "|---|---|---|---|",
        *map(worst_row, report.worst_classes(worst)),
    ]
    return "\n".join(lines)


def markdown(report: EmbeddingReport, worst: int, record: ReportRecord) -> str:
    """``report.md``: headings, the metrics, the reading, the calibrated threshold, the
    worst classes, the figure, the inputs with shapes and checksums, the settings and
    the versions."""
    result = report.opis_result
    low, high = result.calibration_range
    reading = read(report)
    provenance, settings = record.provenance, record.settings
    versions = ", ".join(f"{name} {version}" for name, version in provenance.versions.items())
    reference = (
        "the embeddings themselves, self pairs excluded"
        if not any(item.role == "reference" for item in record.inputs)
        else "the reference set listed under Inputs"
    )
    title = f": `{record.inputs[0].path.name}`" if record.inputs else ""
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
    for key, name, spec, meaning in METRIC_ROWS:
        lines.append(f"| {name} | {format(report.metrics[key], spec)} | {meaning} |")
    if report.notes:
        lines += ["", *(f"- {note}" for note in report.notes)]
    far_low, far_high = settings["far_range"]
    lines += [
        "",
        f"OPIS and ε-OPIS (ε = {result.epsilon:g}) are measured over the similarity "
        f"thresholds {low:.4f} .. {high:.4f}, where the pooled FAR runs from "
        f"{rate(far_high)} to {rate(far_low)}.",
        "",
        "## Reading",
        "",
        *(f"- {line}" for line in reading_lines(report, reading)),
    ]
    if reading.warnings:
        lines += ["", *(f"> **Warning:** {warning}" for warning in reading.warnings)]
    lines += ["", "## Calibrated threshold", ""]
    lines += [f"- {line}" for line in calibration_lines(report)]
    lines += [
        "",
        "## Worst classes",
        "",
        "The classes with the lowest mean utility over the calibration range, with their "
        "FAR and FRR at the calibrated threshold.",
        "",
        f"| {' | '.join(WORST_HEADER)} |",
        "|---|---|---|---|",
        *map(worst_row, report.worst_classes(worst)),
    ]
    if record.figure is not None:
        lines += ["", f"![Per-class utility curves]({record.figure})"]
    elif record.figure_note:
        lines += ["", f"No figure: {record.figure_note}"]
    lines += [
        "",
        "## Inputs",
        "",
        "| role | file | shape | dtype | sha256 |",
        "|---|---|---|---|---|",
    ]
    for item in record.inputs:
        shape = " × ".join(map(str, item.shape))
        lines.append(f"| {item.role} | `{item.path}` | {shape} | {item.dtype} | `{item.sha256}` |")
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    for name, value in settings.items():
        shown = _setting_text(value)
        if name in ("far_range", "target_far"):
            shown = " .. ".join(map(rate, value)) if name == "far_range" else rate(value)
        lines.append(f"| {name} | {shown} |")
    lines += [
        "",
        "## Provenance",
        "",
        f"Created {provenance.created} with {versions}; run `{provenance.run}`.",
        "",
    ]
    return "\n".join(lines)


def json_document(
    report: EmbeddingReport, worst: int, record: ReportRecord, files: dict[str, str]
) -> str:
    """``report.json``: the same content at full precision (NaN written as ``null``).
    It is the set's manifest: ``files`` maps the other files of this run to their
    SHA-256, and ``run`` is the id the Markdown and the figure carry too."""
    result, calibration = report.opis_result, report.calibration
    reading = read(report)
    provenance = record.provenance
    document = {
        "run": provenance.run,
        "created": provenance.created,
        "versions": provenance.versions,
        "files": files,
        "figure_note": record.figure_note,
        "inputs": [
            {
                "role": item.role,
                "path": str(item.path),
                "shape": list(item.shape),
                "dtype": item.dtype,
                "sha256": item.sha256,
            }
            for item in record.inputs
        ],
        "settings": record.settings,
        "num_queries": report.num_queries,
        "num_references": report.num_references,
        "num_classes": len(result.classes),
        "metrics": dict(report.metrics),
        "notes": list(report.notes),
        "calibration_range": list(result.calibration_range),
        "epsilon": result.epsilon,
        "reading": {
            "mean_pooled_utility": reading.mean_pooled_utility,
            "typical_class_gap": reading.typical_gap,
            "relative_class_gap": reading.relative_gap,
            "eps_gap": reading.eps_gap,
            "eps_classes": reading.eps_classes,
            "num_included_classes": reading.num_included,
            "excluded_classes": reading.excluded,
            "class_far_p5_p95": list(reading.far_band),
            "class_frr_p5_p95": list(reading.frr_band),
            "warnings": reading.warnings,
        },
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


def figure(report: EmbeddingReport, worst: int, target_far: float) -> Any:
    """The utility figure: the worst classes (at most :data:`MAX_HIGHLIGHTED`) in colour
    and named, the pooled curve in
    black, the calibrated threshold dashed; with many classes the rest is a faint band.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    from ..plotting import plot_utility_curves

    result, calibration = report.opis_result, report.calibration
    rows = report.worst_classes(min(worst, MAX_HIGHLIGHTED))
    names = {label: f"class {label} (worst {rank})" for rank, (label, *_) in enumerate(rows, 1)}
    drawing = Figure(figsize=(8.4, 4.8), layout="constrained")
    plot_utility_curves(
        result,
        ax=drawing.add_subplot(),
        threshold=calibration.threshold,
        threshold_label=f"threshold for FAR {rate(target_far)}: {calibration.threshold:.4f}",
        title=f"OPIS {report.metrics['opis']:.4g}   ε-OPIS {report.metrics['eps_opis']:.4g}",
        class_names=names,
        highlight=list(names),
        legend=False,
    )
    handles, labels = drawing.axes[0].get_legend_handles_labels()
    drawing.legend(handles, labels, loc="outside right center", fontsize=8, frameon=False)
    drawing.suptitle(
        f"Per-class utility (F{result.beta:g}) vs similarity threshold over the calibration "
        "range; black: all classes pooled; coloured: the worst classes.\nLower OPIS is "
        "better: the class curves stay closer to the pooled one, so one threshold suits "
        "every class.",
        fontsize=9,
    )
    return drawing


def _percent(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{100 * value:.3g}%"


def _times(value: float, target: float) -> str:
    return f"{value / target:.3g}x" if target > 0 else "n/a"


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

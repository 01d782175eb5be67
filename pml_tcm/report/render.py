"""Every form of the report, from one place: the terminal text, ``report.md``,
``report.json``, the utility figure and, with groups, the group figure.

:func:`read` turns the computed numbers into what they mean (the scale of OPIS and
ε-OPIS against the pooled utility, the per-class FAR/FRR at the threshold, warnings,
and with groups whether the per-group rates differ by more than their intervals);
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

from .._rate_text import FRACTION, fraction_range, level_text, rate_lines
from .._rate_text import fraction_and_percent as rate
from ..functional.far_search import ceil_fraction_of
from ..functional.utility import grid_mean
from ..provenance import Provenance
from .compute import EmbeddingReport, GroupRow
from .inputs import InputFile

FIGURE_NAME = "utility_curves.png"
GROUP_FIGURE_NAME = "group_rates.png"
MAX_HIGHLIGHTED = 10  # the figure singles out at most this many of the worst classes
HIGH_FRR = 0.5  # a pooled FRR above this at the calibrated threshold is flagged
MANY_GROUPS = 10  # above this, the reading warns that the extremes of many groups are noisy

METRIC_ROWS = (
    ("precision_at_1", "R@1", ".4f", "higher is better"),
    ("mean_average_precision_at_r", "MAP@R", ".4f", "higher is better"),
    ("opis", "OPIS", ".4g", "lower is better: one threshold fits the classes more evenly"),
    ("eps_opis", "ε-OPIS", ".4g", "lower is better: the worst classes are less far off"),
)
GROUP_METRIC_ROWS = (
    (
        "group_opis",
        "group OPIS",
        ".4g",
        "OPIS over the groups: lower is better: one threshold fits the groups more evenly",
    ),
    (
        "group_eps_opis",
        "group ε-OPIS",
        ".4g",
        "ε-OPIS over the groups: lower is better: the worst groups are less far off",
    ),
)
WORST_HEADER = ("class", "mean utility", "FAR", "FRR")
GROUP_HEADER = ("group", "FAR", "FAR interval", "FRR", "FRR interval", "negatives", "positives")


@dataclass(frozen=True)
class GroupReading:
    """What the per-group rates at the threshold mean.

    Attributes:
        num_groups: the groups.
        without_negatives: groups without a negative pair (no FAR).
        without_positives: groups without a positive pair (no FRR).
        far_above_pooled: groups whose FAR interval lies wholly above the pooled FAR
            (``None`` without intervals).
        frr_above_pooled: the same for FRR.
        far_verdict: ``"distinguishable"`` when the worst group's FAR interval lies above
            the best group's, ``"within the intervals"`` when they overlap, ``None``
            without intervals or without two groups with a FAR.
        frr_verdict: the same for FRR.
        best_far_group: the group with the lowest FAR (``None`` if none has one).
        best_frr_group: the group with the lowest FRR.
    """

    num_groups: int
    without_negatives: int
    without_positives: int
    far_above_pooled: int | None
    frr_above_pooled: int | None
    far_verdict: str | None
    frr_verdict: str | None
    best_far_group: Any
    best_frr_group: Any


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
        groups: the :class:`GroupReading`, ``None`` without groups.
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
    groups: GroupReading | None = None


@dataclass(frozen=True)
class ReportRecord:
    """What the files record beside the numbers.

    Attributes:
        inputs: the input files.
        settings: ``far_range``, ``target_far``, ``worst``, ``device``.
        provenance: versions, time and run id.
        figure: the figure's file name, or ``None`` when it is not drawn.
        figure_note: why there is no figure (one line), or ``None``.
        group_figure: the group figure's file name, or ``None`` when it is not drawn
            (no groups, or no matplotlib).
    """

    inputs: list[InputFile]
    settings: dict[str, Any]
    provenance: Provenance
    figure: str | None = FIGURE_NAME
    figure_note: str | None = None
    group_figure: str | None = None


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
        groups=_read_groups(report),
    )


def _read_groups(report: EmbeddingReport) -> GroupReading | None:
    calibration = report.calibration
    if calibration.groups is None:
        return None
    rows = report.group_rows()
    found: dict[str, Any] = {}
    for name, pooled in (("far", calibration.far), ("frr", calibration.frr)):
        ranked = report.worst_groups(len(rows), name)
        found[f"best_{name}_group"] = ranked[-1].group if ranked else None
        intervals = [getattr(row, f"{name}_interval") for row in ranked]
        if not ranked or intervals[0] is None:
            found[f"{name}_above_pooled"] = found[f"{name}_verdict"] = None
            continue
        found[f"{name}_above_pooled"] = sum(1 for lo, _ in intervals if lo > pooled)
        verdict = None
        if len(ranked) >= 2:
            verdict = (
                "distinguishable" if intervals[0][0] > intervals[-1][1] else "within the intervals"
            )
        found[f"{name}_verdict"] = verdict
    return GroupReading(
        num_groups=len(rows),
        without_negatives=sum(1 for row in rows if not math.isfinite(row.far)),
        without_positives=sum(1 for row in rows if not math.isfinite(row.frr)),
        **found,
    )


def _with_interval(value: float, spec: str, interval: Any, confidence: float | None) -> str:
    """``value`` and, when there is one, its interval: ``0.0123 (95% interval 0.01 ..
    0.015)``."""
    shown = format(value, spec)
    if interval is None or not all(math.isfinite(v) for v in interval):
        return shown
    lo, hi = interval
    return f"{shown} ({level_text(confidence)}interval {lo:{spec}} .. {hi:{spec}})"


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
    """The threshold, the pooled FAR/FRR with their intervals, the per-class spread and,
    with groups, the worst and best group (the lines of
    :meth:`pml_tcm.CalibrationReport.summary`, written as fractions)."""
    return rate_lines(report.calibration, FRACTION)


def group_lines(report: EmbeddingReport, reading: Reading) -> list[str]:
    """The groups in plain words, one paragraph a line: how far apart their rates are at
    the threshold, whether that is more than the intervals, the group OPIS."""
    groups, calibration = reading.groups, report.calibration
    rates = calibration.groups
    assert groups is not None and rates is not None
    level = level_text(report.confidence)
    lines = [
        f"{groups.num_groups} groups (--groups); a group's pairs are those of its queries. "
        f"FAR and FRR at the calibrated threshold {calibration.threshold:.6g}"
        + (
            f", with {level}bootstrap intervals (queries resampled within their group)."
            if report.confidence is not None
            else ", without intervals (--bootstrap 0)."
        )
    ]
    for name, worst_group, worst, best_group, best, ratio, verdict, above, pooled, missing in (
        (
            "FAR",
            rates.worst_far_group,
            rates.worst_far,
            groups.best_far_group,
            rates.best_far,
            rates.far_ratio,
            groups.far_verdict,
            groups.far_above_pooled,
            calibration.far,
            groups.without_negatives,
        ),
        (
            "FRR",
            rates.worst_frr_group,
            rates.worst_frr,
            groups.best_frr_group,
            rates.best_frr,
            rates.frr_ratio,
            groups.frr_verdict,
            groups.frr_above_pooled,
            calibration.frr,
            groups.without_positives,
        ),
    ):
        if worst_group is None:
            lines.append(f"{name}: no group has such pairs.")
            continue
        line = (
            f"{name} runs from {rate(best)} in group {best_group} to {rate(worst)} in group "
            f"{worst_group}: worst/best {_ratio_text(ratio)}."
        )
        if verdict == "distinguishable":
            line += (
                f" The worst group's {level}interval lies above the best group's: the gap is "
                "distinguishable from sampling noise."
            )
        elif verdict == "within the intervals":
            line += (
                f" The worst and best groups' {level}intervals overlap: the gap is within the "
                "intervals (not distinguishable from sampling noise with these samples)."
            )
        elif report.confidence is None:
            line += " Without intervals (--bootstrap 0) noise and a real gap look alike."
        if above is not None:
            line += (
                f" {above} of the {groups.num_groups} groups have their {name} interval wholly "
                f"above the pooled {name} {rate(pooled)}"
            )
            if groups.num_groups > MANY_GROUPS:
                chance = (1 - report.confidence) / 2 * groups.num_groups
                line += (
                    f" (about {chance:.2g} would by chance alone). With this many groups the "
                    "worst and best are the extremes of many noisy estimates: that count says "
                    "more than the extremes do."
                )
            else:
                line += "."
        if missing:
            line += f" {missing} group(s) have no such pairs and no {name}."
        lines.append(line)
    group_result = report.group_result
    assert group_result is not None
    opis = _with_interval(group_result.opis, ".4g", group_result.opis_interval, report.confidence)
    eps_opis = _with_interval(
        group_result.eps_opis, ".4g", group_result.eps_opis_interval, report.confidence
    )
    lines.append(
        f"Group OPIS {opis} and group ε-OPIS {eps_opis} are OPIS and ε-OPIS with the "
        "groups in place of the classes (each group's utility curve against the pooled "
        "one over the same calibration range); the OPIS and ε-OPIS above are over the "
        "classes."
    )
    return lines


def group_row(row: GroupRow) -> str:
    """One row of a groups table (terminal and Markdown alike)."""
    return (
        f"| {row.group} | {rate(row.far)} | {_interval_cell(row.far_interval)} | "
        f"{rate(row.frr)} | {_interval_cell(row.frr_interval)} | {row.negatives} | "
        f"{row.positives} |"
    )


def group_tables(report: EmbeddingReport, worst: int) -> list[tuple[str, list[str]]]:
    """``(caption, table lines)``: every group when there are at most ``worst``, else the
    ``worst`` groups with the highest FAR and those with the highest FRR (every group is
    in ``report.json``)."""
    head = [f"| {' | '.join(GROUP_HEADER)} |", "|" + "---|" * len(GROUP_HEADER)]
    rows = report.group_rows()
    if len(rows) <= worst:
        return [(f"all {len(rows)} groups:", head + list(map(group_row, rows)))]
    return [
        (
            f"the {worst} of {len(rows)} groups with the highest {name.upper()} (all "
            "groups: report.json):",
            head + list(map(group_row, report.worst_groups(worst, name))),
        )
        for name in ("far", "frr")
    ]


def text(report: EmbeddingReport, worst: int, width: int = 100) -> str:
    """The report as the terminal shows it."""
    result = report.opis_result
    low, high = result.calibration_range
    reading = read(report)
    intervals, level = report.intervals(), report.confidence
    groups = "" if report.group_result is None else f", {len(report.group_result.classes)} groups"
    lines = [
        f"{report.num_queries} queries vs {report.num_references} references, "
        f"{len(result.classes)} classes{groups}",
        f"R@1       {report.metrics['precision_at_1']:.4f}",
        f"MAP@R     {report.metrics['mean_average_precision_at_r']:.4f}",
        f"OPIS      {_with_interval(report.metrics['opis'], '.4g', intervals.get('opis'), level)}"
        f"  (calibration range: similarity {low:.4f} .. {high:.4f})",
        f"eps-OPIS  "
        f"{_with_interval(report.metrics['eps_opis'], '.4g', intervals.get('eps_opis'), level)}"
        f"  (epsilon {result.epsilon:g})",
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
    if reading.groups is not None:
        lines += ["", "groups:"]
        for paragraph in group_lines(report, reading):
            lines += textwrap.wrap(
                paragraph,
                width,
                initial_indent="  ",
                subsequent_indent="  ",
                break_on_hyphens=False,
            )
        for caption, table in group_tables(report, worst):
            lines += ["", caption, *table]
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
        f"| metric | value | {level_text(report.confidence)}interval | reading |",
        "|---|---|---|---|",
    ]
    intervals = report.intervals()
    for key, name, spec, meaning in _metric_rows(report):
        interval = intervals.get(key)
        shown = "n/a" if interval is None else " .. ".join(format(v, spec) for v in interval)
        lines.append(f"| {name} | {format(report.metrics[key], spec)} | {shown} | {meaning} |")
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
    lines += [
        "",
        f"The intervals are {level_text(report.confidence)}percentile bootstrap intervals "
        f"({report.bootstrap} resamples: of the classes, or groups, for OPIS; of the "
        "queries, within their class or group, for FAR and FRR)."
        if report.confidence is not None
        else "No intervals (--bootstrap 0).",
    ]
    lines += ["", "## Calibrated threshold", ""]
    lines += [f"- {line}" for line in calibration_lines(report)]
    if reading.groups is not None:
        lines += ["", "## Groups", "", *(f"- {line}" for line in group_lines(report, reading))]
        for caption, table in group_tables(report, worst):
            lines += ["", caption[0].upper() + caption[1:], "", *table]
        if record.group_figure is not None:
            lines += ["", f"![Per-group FAR and FRR at the threshold]({record.group_figure})"]
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


def _metric_rows(report: EmbeddingReport) -> tuple[tuple[str, str, str, str], ...]:
    """The metric rows the report has: the class metrics, and the group ones with
    groups."""
    return METRIC_ROWS + (GROUP_METRIC_ROWS if report.group_result is not None else ())


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
        "intervals": {
            "bootstrap": report.bootstrap,
            "confidence": report.confidence,
            **{name: list(interval) for name, interval in report.intervals().items()},
        },
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
            "far_interval": calibration.far_interval,
            "frr_interval": calibration.frr_interval,
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
    if reading.groups is not None:
        document["groups"] = _groups_document(report, reading.groups)
    return json.dumps(_finite(document), indent=2, ensure_ascii=False) + "\n"


def _groups_document(report: EmbeddingReport, groups: GroupReading) -> dict[str, Any]:
    """The groups part of ``report.json``: every group's row, the worst and best, the
    ratios (``null`` when unbounded: the best group has no errors), the reading."""
    rates, result = report.calibration.groups, report.group_result
    assert rates is not None and result is not None
    return {
        "num_groups": groups.num_groups,
        "worst_far_group": rates.worst_far_group,
        "worst_far": rates.worst_far,
        "best_far_group": groups.best_far_group,
        "best_far": rates.best_far,
        "far_ratio": rates.far_ratio,
        "worst_frr_group": rates.worst_frr_group,
        "worst_frr": rates.worst_frr,
        "best_frr_group": groups.best_frr_group,
        "best_frr": rates.best_frr,
        "frr_ratio": rates.frr_ratio,
        "far_verdict": groups.far_verdict,
        "frr_verdict": groups.frr_verdict,
        "far_above_pooled": groups.far_above_pooled,
        "frr_above_pooled": groups.frr_above_pooled,
        "without_negatives": groups.without_negatives,
        "without_positives": groups.without_positives,
        "opis": result.opis,
        "eps_opis": result.eps_opis,
        "opis_interval": result.opis_interval,
        "eps_opis_interval": result.eps_opis_interval,
        "excluded_groups": result.classes[result.excluded].tolist(),
        "table": [
            {
                "group": row.group,
                "far": row.far,
                "far_interval": row.far_interval,
                "frr": row.frr,
                "frr_interval": row.frr_interval,
                "false_accepts": row.false_accepts,
                "negatives": row.negatives,
                "false_rejects": row.false_rejects,
                "positives": row.positives,
            }
            for row in report.group_rows()
        ],
    }


def group_figure(report: EmbeddingReport, worst: int) -> Any:
    """The group figure (:func:`pml_tcm.plotting.plot_group_rates`): per-group FAR and
    FRR at the threshold with their intervals, the worst groups named.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from ..plotting import plot_group_rates

    return plot_group_rates(report.calibration, label_worst=min(worst, MAX_HIGHLIGHTED))


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


def _interval_cell(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else fraction_range(*interval)


def _ratio_text(ratio: float) -> str:
    if math.isinf(ratio):
        return "unbounded (the best group has no errors)"
    return f"{ratio:.3g}x"


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

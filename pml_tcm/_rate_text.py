"""The lines that state a calibrated threshold and its rates, for
:meth:`pml_tcm.CalibrationReport.summary` and ``pml-tcm report`` alike.

One function lays the lines out (:func:`rate_lines`); a :class:`RateStyle` says how a
number is written (the summary writes percentages, the report fractions with their
percentage). This module only formats: it reads a report's fields and computes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .calibration import CalibrationReport


@dataclass(frozen=True)
class RateStyle:
    """How :func:`rate_lines` writes numbers.

    Attributes:
        rate: a rate (FAR, FRR, a spread) as text.
        quantile: a per-class percentile of a rate as text.
        target: the target FAR/FRR as text.
        interval: ``(lo, hi, level)`` as text, ``level`` like ``"95% "`` (or ``""``).
    """

    rate: Callable[[float], str]
    quantile: Callable[[float], str]
    target: Callable[[float], str]
    interval: Callable[[float, float, str], str]


def _percent(value: float) -> str:
    return f"{value:.4%}"


PERCENT = RateStyle(
    rate=_percent,
    quantile=_percent,
    target=lambda value: f"{value:.10g}",
    interval=lambda lo, hi, level: f"{level}interval {lo:.4%} to {hi:.4%}",
)
"""Percentages (``0.1000%``): :meth:`~pml_tcm.CalibrationReport.summary`."""


def fraction_and_percent(value: float) -> str:
    """A rate as the fraction the user types and its percentage: ``0.001 (0.1%)``;
    ``n/a`` when it is not finite."""
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4g} ({100 * value:.4g}%)"


def fraction_range(lo: float, hi: float) -> str:
    """Two rates as fractions and percentages: ``0.0008 .. 0.0012 (0.08% .. 0.12%)``;
    ``n/a`` when one is not finite."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"{lo:.4g} .. {hi:.4g} ({100 * lo:.4g}% .. {100 * hi:.4g}%)"


def fraction_interval(lo: float, hi: float, level: str = "") -> str:
    """An interval of rates as fractions and percentages:
    ``95% interval 0.0008 .. 0.0012 (0.08% .. 0.12%)``."""
    return f"{level}interval {fraction_range(lo, hi)}"


FRACTION = RateStyle(
    rate=fraction_and_percent,
    quantile=lambda value: f"{value:.4g}",
    target=lambda value: f"{value:g} ({100 * value:.4g}%)",
    interval=fraction_interval,
)
"""Fractions with their percentage (``0.001 (0.1%)``): ``pml-tcm report``."""


def level_text(confidence: float | None) -> str:
    """``"95% "`` for a confidence of 0.95, ``""`` for ``None``."""
    return "" if confidence is None else f"{100 * confidence:.4g}% "


def interval_suffix(
    interval: tuple[float, float] | Any | None, style: RateStyle, confidence: float | None
) -> str:
    """`` (95% interval ...)`` after a value, or ``""`` without a (finite) interval."""
    if interval is None:
        return ""
    lo, hi = (float(v) for v in interval)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return ""
    return f" ({style.interval(lo, hi, level_text(confidence))})"


def rate_lines(report: CalibrationReport, style: RateStyle) -> list[str]:
    """The threshold and its target, the pooled FAR/FRR (with their intervals), the
    per-class worst, spread and percentiles, and, with groups, the per-group worst, best
    and worst-to-best ratio: one line each."""
    kind, value = report.target
    level = report.confidence
    lines = [
        f"threshold {report.threshold:.6g} for target {kind.upper()} {style.target(value)}",
        f"pooled: FAR {style.rate(report.far)}{interval_suffix(report.far_interval, style, level)}"
        f"  FRR {style.rate(report.frr)}{interval_suffix(report.frr_interval, style, level)}",
    ]
    for name, worst_class, worst, spread, percentiles in (
        (
            "FAR",
            report.worst_far_class,
            report.worst_far,
            report.far_spread,
            report.far_percentiles,
        ),
        (
            "FRR",
            report.worst_frr_class,
            report.worst_frr,
            report.frr_spread,
            report.frr_percentiles,
        ),
    ):
        if worst_class is None:
            lines.append(f"per class {name}: no class has such pairs")
            continue
        shown = "  ".join(f"p{p} {style.quantile(v)}" for p, v in percentiles.items())
        lines.append(
            f"per class {name}: worst {style.rate(worst)} (class {worst_class}), "
            f"spread {style.rate(spread)}; {shown}"
        )
    rates = report.groups
    if rates is not None:
        for name, worst_group, worst, best, ratio in (
            ("FAR", rates.worst_far_group, rates.worst_far, rates.best_far, rates.far_ratio),
            ("FRR", rates.worst_frr_group, rates.worst_frr, rates.best_frr, rates.frr_ratio),
        ):
            if worst_group is None:
                lines.append(f"per group {name}: no group has such pairs")
                continue
            lines.append(
                f"per group {name}: worst {style.rate(worst)} (group {worst_group}), best "
                f"{style.rate(best)}, worst/best {ratio:.3g}"
            )
    return lines

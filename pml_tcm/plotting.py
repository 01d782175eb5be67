"""Figures of OPIS results and calibrated thresholds (matplotlib is an optional extra):
:func:`plot_utility_curves` (utility vs threshold per class) and
:func:`plot_group_rates` (per-group FAR and FRR at one threshold)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ._rate_text import fraction_and_percent, level_text
from .functional.opis import OPISResult

if TYPE_CHECKING:
    from .calibration import CalibrationReport

INSTALL_HINT = "pip install 'pml-tcm[examples]' (from a checkout: pip install '.[examples]')"
"""How to get matplotlib, the figures' one optional dependency (the ``examples`` extra;
``plot`` holds matplotlib alone)."""


def _pyplot_free_figure(caller: str = "plot_utility_curves"):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"{caller} needs matplotlib: {INSTALL_HINT}") from error
    return Figure


def plot_utility_curves(
    result: OPISResult,
    ax: Any = None,
    *,
    class_alpha: float = 0.35,
    class_linewidth: float = 0.8,
    pooled_linewidth: float = 2.5,
    title: str | None = None,
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    max_legend_classes: int = 10,
    legend: bool | None = None,
    threshold: float | None = None,
    threshold_label: str | None = None,
    highlight: Sequence[int | float] | None = None,
) -> Any:
    """Every class's utility ``U_c`` over the calibration range, with ``U_all`` on top.

    Classes without a positive pair (``result.excluded``: OPIS leaves them out, their
    utility is 0 everywhere) are not drawn.

    The figure is built without pyplot (safe under the Agg backend and in threads);
    nothing is shown.

    Args:
        result: an :class:`~pml_tcm.functional.opis.OPISResult`.
        ax: a matplotlib Axes to draw on, or ``None`` for a new figure.
        class_alpha: opacity of the per-class lines.
        class_linewidth: width of the per-class lines.
        pooled_linewidth: width of the bold pooled line.
        title: axes title (default: OPIS and ε-OPIS values).
        class_names: display names, indexed (or keyed) by class label; default
            ``"class <label>"``.
        max_legend_classes: up to this many classes, each class gets its own colour
            (matplotlib's ``tab10``/``tab20``) and a legend; beyond it every class line
            is the same faint blue, as in the paper's figure.
        legend: draw a legend; default: when the classes have their own colours.
        threshold: mark this threshold (e.g. the one calibrated for a target FAR) with a
            dashed vertical line; the x-range is widened to show it.
        threshold_label: the mark's legend label (default ``"threshold <value>"``).
        highlight: labels of classes to single out (e.g. the worst ones), in order. With
            more than ``max_legend_classes`` classes these get their own colours and
            legend entries and every other class is drawn as a faint band (its min-max
            and its middle 50 % at each threshold) instead of a line each; with fewer,
            they are drawn thicker.

    The y-range is fitted to the curves (with a small margin, inside [0, 1]).

    Returns:
        The matplotlib ``Figure`` holding the axes. The axes hold one line per drawn
        class (labelled with its name) and then the pooled line (label ``"pooled"``);
        with the band, the lines are the highlighted classes alone.

    Raises:
        ImportError: matplotlib is not installed.
    """
    if ax is None:
        figure_class = _pyplot_free_figure()
        figure = figure_class(figsize=(6.4, 4.2))
        ax = figure.add_subplot()
    else:
        _pyplot_free_figure()
        figure = ax.figure
    thresholds = result.thresholds.numpy()
    kept = ~result.excluded
    labels = result.classes[kept].tolist()
    curves = result.class_utility[kept].numpy()
    distinct = len(labels) <= max_legend_classes
    chosen = [label for label in (highlight or ()) if label in set(labels)]
    if chosen and not distinct:
        _draw_band(ax, thresholds, curves, [label not in chosen for label in labels])
        colours = _class_colours(len(chosen) + 1)[1:]  # the first, blue, is the band's
        for colour, label in zip(colours, chosen):
            ax.plot(
                thresholds,
                curves[labels.index(label)],
                color=colour,
                linewidth=max(class_linewidth, 1.4),
                label=_class_name(label, class_names),
                zorder=2.5,
            )
    else:
        palette = _class_colours(len(labels)) if distinct else ["tab:blue"] * len(labels)
        for label, colour, curve in zip(labels, palette, curves):
            ax.plot(
                thresholds,
                curve,
                color=colour,
                alpha=class_alpha if not distinct else max(class_alpha, 0.8),
                linewidth=class_linewidth * (2.0 if label in chosen else 1.0),
                label=_class_name(label, class_names),
            )
    ax.plot(
        thresholds,
        result.pooled_utility.numpy(),
        color="black",
        linewidth=pooled_linewidth,
        label="pooled",
        zorder=3,
    )
    ax.set_xlabel("similarity threshold" if result.higher_is_closer else "distance threshold")
    ax.set_ylabel(f"utility (F{result.beta:g})")
    low, high = result.calibration_range
    if threshold is not None:
        ax.axvline(
            threshold,
            color="0.3",
            linestyle="--",
            linewidth=1.2,
            label=threshold_label if threshold_label is not None else f"threshold {threshold:.4g}",
            zorder=2,
        )
        low, high = min(low, threshold), max(high, threshold)
    if high > low:
        margin = 0.02 * (high - low) if threshold is not None else 0.0
        ax.set_xlim(low - margin, high + margin)
    ax.set_ylim(*utility_range([result]))
    ax.set_title(
        title if title is not None else f"OPIS {result.opis:.3g}, ε-OPIS {result.eps_opis:.3g}"
    )
    show_legend = (distinct or bool(chosen)) if legend is None else legend
    if show_legend:
        ax.legend(fontsize="small", loc="best")
    return figure


def utility_range(results: Sequence[OPISResult], margin: float = 0.06) -> tuple[float, float]:
    """A y-range holding every class and pooled utility of ``results``, with ``margin``
    of its height added on both sides, clipped to [0, 1]. Classes without a positive pair
    (``excluded``) are left out, as in the figure."""
    values = [
        curve.flatten()
        for result in results
        for curve in (result.class_utility[~result.excluded], result.pooled_utility)
        if curve.numel()
    ]
    if not values:
        return 0.0, 1.0
    joined = torch.cat(values)
    low, high = float(joined.min()), float(joined.max())
    pad = margin * (high - low) if high > low else 0.05
    return max(0.0, low - pad), min(1.0, high + pad)


def _draw_band(ax: Any, thresholds: Any, curves: Any, rest: list[bool]) -> None:
    """The classes in ``rest`` as a faint min-max band with their middle 50 % darker."""
    import numpy as np

    others = curves[np.asarray(rest, dtype=bool)]
    if not len(others):
        return
    low, q25, q75, high = np.quantile(others, [0.0, 0.25, 0.75, 1.0], axis=0)
    ax.fill_between(
        thresholds,
        low,
        high,
        color="tab:blue",
        alpha=0.18,
        linewidth=0,
        label=f"other {len(others)} classes: range",
    )
    ax.fill_between(
        thresholds,
        q25,
        q75,
        color="tab:blue",
        alpha=0.35,
        linewidth=0,
        label="other classes: middle 50%",
    )


def _class_colours(num_classes: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if num_classes <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(num_classes)]


def _class_name(label: int, class_names: Mapping[int, str] | Sequence[str] | None) -> str:
    if class_names is None:
        return f"class {label}"
    try:
        return str(class_names[label])
    except (KeyError, IndexError):
        return f"class {label}"


def plot_group_rates(
    report: CalibrationReport,
    axes: Sequence[Any] | None = None,
    *,
    label_worst: int = 5,
    max_labelled: int = 20,
    group_names: Mapping[Any, str] | None = None,
    title: str | None = None,
) -> Any:
    """Each group's FAR and FRR at the report's threshold, with their intervals.

    Two panels, FAR on top and FRR below. In each the groups that have such pairs are
    sorted by the rate, worst on the left, one point a group with its bootstrap interval
    as an error bar (when the report has intervals); the pooled rate is a black line
    (its interval a grey band). Up to ``max_labelled`` groups every group is named on
    the x-axis; beyond it the axis is the rank, the ``label_worst`` worst groups are red
    and named in the legend (so 200 groups stay readable). The right axis reads the rate
    in percent.

    Args:
        report: a :class:`~pml_tcm.calibration.CalibrationReport` with groups
            (:func:`~pml_tcm.calibrate_threshold` with ``groups=``).
        axes: two matplotlib Axes (FAR, FRR) to draw on, or ``None`` for a new figure.
        label_worst: with more than ``max_labelled`` groups, how many of the worst are
            named and coloured.
        max_labelled: up to this many groups every group is named.
        group_names: display names keyed by group id; default ``"group <id>"``.
        title: the figure's title (default: the threshold and its target).

    Returns:
        The matplotlib ``Figure``. Each panel holds one point per group with such pairs
        (``ax.lines[0]`` the points, in the drawn order), the pooled line (label
        ``"pooled ..."``).

    Raises:
        ValueError: ``report`` has no groups.
        ImportError: matplotlib is not installed.
    """
    rates = report.groups
    if rates is None:
        raise ValueError(
            "plot_group_rates: the report has no groups (calibrate_threshold(..., groups=...))"
        )
    if axes is None:
        figure = _pyplot_free_figure("plot_group_rates")(figsize=(8.4, 6.4), layout="constrained")
        axes = figure.subplots(2, 1)
    else:
        _pyplot_free_figure("plot_group_rates")
        if len(axes) != 2:
            raise ValueError(f"plot_group_rates: axes must be two Axes, got {len(axes)}")
        figure = axes[0].figure
    level = level_text(report.confidence)
    for ax, name, values, valid, intervals, pooled, pooled_interval, ratio in (
        (
            axes[0],
            "FAR",
            rates.far,
            rates.has_negatives,
            rates.far_interval,
            report.far,
            report.far_interval,
            rates.far_ratio,
        ),
        (
            axes[1],
            "FRR",
            rates.frr,
            rates.has_positives,
            rates.frr_interval,
            report.frr,
            report.frr_interval,
            rates.frr_ratio,
        ),
    ):
        _draw_group_panel(
            ax,
            name,
            rates.groups,
            values,
            valid,
            intervals,
            pooled,
            pooled_interval,
            ratio,
            level,
            label_worst=label_worst,
            max_labelled=max_labelled,
            group_names=group_names,
        )
    kind, target = report.target
    if title is None:
        title = (
            f"Per-group FAR and FRR at the threshold {report.threshold:.4g} (target "
            f"{kind.upper()} {fraction_and_percent(target)})"
            + (f"; bars: {level}bootstrap intervals" if report.confidence is not None else "")
        )
    figure.suptitle(title, fontsize=9)
    return figure


def _draw_group_panel(
    ax: Any,
    name: str,
    groups: torch.Tensor,
    values: torch.Tensor,
    valid: torch.Tensor,
    intervals: torch.Tensor | None,
    pooled: float,
    pooled_interval: tuple[float, float] | None,
    ratio: float,
    level: str,
    *,
    label_worst: int,
    max_labelled: int,
    group_names: Mapping[Any, str] | None,
) -> None:
    """One panel of :func:`plot_group_rates`: the groups with such pairs, worst first."""
    import numpy as np

    kept = valid.nonzero().squeeze(1)
    rate = values[kept].numpy()
    order = np.argsort(-rate, kind="stable")
    rate = rate[order]
    labels = [groups[int(kept[i])].item() for i in order]
    x = np.arange(len(rate))
    many = len(rate) > max_labelled
    small = len(rate) > 60
    ax.plot(
        x,
        rate,
        linestyle="none",
        marker="o",
        markersize=2.5 if small else 5,
        color="tab:blue",
        label=f"group {name}" + (f" ({level}interval)" if intervals is not None else ""),
        zorder=3,
    )
    if intervals is not None and len(rate):
        bounds = intervals[kept].numpy()[order]
        lower = np.clip(rate - bounds[:, 0], 0, None)
        upper = np.clip(bounds[:, 1] - rate, 0, None)
        ax.errorbar(
            x,
            rate,
            yerr=np.nan_to_num(np.stack([lower, upper])),
            fmt="none",
            ecolor="0.55",
            elinewidth=0.6 if small else 1.0,
            capsize=0 if small else 3,
            zorder=2,
        )
    if many and len(rate):
        import textwrap

        worst = min(label_worst, len(rate))
        names = ", ".join(_group_name(label, group_names) for label in labels[:worst])
        ax.plot(
            x[:worst],
            rate[:worst],
            linestyle="none",
            marker="o",
            markersize=4 if small else 6,
            color="tab:red",
            label=textwrap.fill(f"worst {worst}, left to right: {names}", 44),
            zorder=4,
        )
    if pooled_interval is not None:
        ax.axhspan(
            *pooled_interval,
            color="0.85",
            zorder=0,
            linewidth=0,
            label=f"pooled {name}: {level}interval",
        )
    ax.axhline(
        pooled,
        color="black",
        linewidth=1.2,
        label=f"pooled {name} {fraction_and_percent(pooled)}",
        zorder=1,
    )
    if many:
        ax.set_xlabel(f"{len(rate)} groups, sorted by {name} (rank; worst on the left)")
    else:
        ax.set_xticks(x, [_group_name(label, group_names) for label in labels])
        if len(rate) > 6:
            ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_xlabel(f"groups, sorted by {name} (worst on the left)")
    if len(rate):
        ax.set_xlim(-0.6 if not many else -0.02 * len(rate), len(rate) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"{name} (fraction)")
    secondary = ax.secondary_yaxis("right", functions=(lambda v: 100 * v, lambda v: v / 100))
    secondary.set_ylabel("%")
    shown = "unbounded" if ratio == float("inf") else f"{ratio:.3g}x"
    ax.set_title(f"{name} per group: worst/best {shown}", fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.85, edgecolor="none")


def _group_name(group: Any, group_names: Mapping[Any, str] | None) -> str:
    if group_names is not None and group in group_names:
        return str(group_names[group])
    return f"group {group}"

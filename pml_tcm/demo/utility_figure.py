"""Per-class utility vs threshold on the unseen classes: baseline beside +TCM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..functional.opis import OPISResult
from ..plotting import plot_utility_curves, utility_range
from .class_colours import class_colour
from .extras import import_optional

CAPTION = (
    "Per-class utility (F1) vs similarity threshold on the unseen classes, over each "
    "model's calibration range; black: all classes pooled.\nLower OPIS is better: the "
    "class curves stay closer to the pooled one, so one threshold suits every class."
)


def utility_caption(far_range: tuple[float, float], target_far: float | None = None) -> str:
    """The caption of :func:`utility_comparison_figure` for an OPIS ``far_range`` and
    the ``target_far`` of the marked threshold."""
    low, high = far_range
    marked = "" if target_far is None else f" Dashed: the threshold for FAR {target_far:g}."
    return (
        "Per-class utility (F1) vs similarity threshold on the unseen classes, over each "
        f"model's calibration range (FAR {high:g} to {low:g}); black: all classes pooled.\n"
        "Lower OPIS is better: the class curves stay closer to the pooled one, so one "
        f"threshold suits every class.{marked}"
    )


def utility_comparison_figure(
    panels: Sequence[tuple[str, OPISResult]],
    thresholds: Sequence[float] | None = None,
    threshold_label: str = "calibrated threshold",
    class_names: Mapping[int, str] | Sequence[str] | None = None,
    caption: str = CAPTION,
):
    """One :func:`pml_tcm.plotting.plot_utility_curves` panel per ``(title, result)``,
    side by side on shared axes so that they compare by eye.

    Both axes are shared: x spans every panel's calibration range (and marked
    threshold), y is fitted to every panel's curves. Up to ten classes, each class has
    the colour :func:`pml_tcm.demo.class_colours.class_colour` gives its label, in every
    panel and in the circle figure alike. The spread of the class curves
    ``U_c(t)`` around the pooled ``U_all(t)`` over the calibration range is what OPIS
    measures; each title gives OPIS and ε-OPIS, the caption says what is plotted and
    which direction is better.

    Args:
        panels: ``(title, result)`` pairs, e.g. baseline and +TCM.
        thresholds: one threshold per panel to mark (e.g. calibrated for a target FAR).
        threshold_label: legend label of the marks; the value is appended.
        class_names: display names indexed by label.
        caption: the line(s) above the panels.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ImportError: matplotlib is not installed (the ``examples`` extra).
    """
    Figure = import_optional("matplotlib.figure", "the utility figure").Figure
    if thresholds is not None and len(thresholds) != len(panels):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(panels)} panels")
    figure = Figure(figsize=(5.2 * len(panels) + 1.6, 4.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False, sharex=True, sharey=True)[0]
    lows, highs = [], []
    class_lines = {}  # label -> its line in the first panel that has it
    for index, (axis, (title, result)) in enumerate(zip(axes, panels, strict=True)):
        threshold = None if thresholds is None else float(thresholds[index])
        plot_utility_curves(
            result,
            ax=axis,
            class_alpha=0.8,
            class_linewidth=1.2,
            title=f"{title}\nOPIS {result.opis:.3g}   ε-OPIS {result.eps_opis:.3g}",
            class_names=class_names,
            legend=False,
            threshold=threshold,
            threshold_label=None if threshold is None else f"{threshold_label} {threshold:.4f}",
        )
        labels = result.classes.tolist()
        if len(labels) <= 10:  # plot_utility_curves gives them distinct colours: the demo's
            for line, label in zip(axis.get_lines(), labels):
                line.set_color(class_colour(label))
                class_lines.setdefault(label, line)
        low, high = result.calibration_range
        lows += [low] + ([threshold] if threshold is not None else [])
        highs += [high] + ([threshold] if threshold is not None else [])
        if index:
            axis.set_ylabel("")
        if threshold is not None:
            axis.legend(
                handles=[axis.get_lines()[-1]], loc="upper right", fontsize=8, framealpha=0.9
            )
    low, high = min(lows), max(highs)
    margin = 0.02 * (high - low) if high > low else 0.01
    axes[0].set_xlim(low - margin, high + margin)
    axes[0].set_ylim(*utility_range([result for _, result in panels]))
    # One legend for the classes of every panel, outside the panels.
    pooled = next(line for line in axes[0].get_lines() if line.get_label() == "pooled")
    if class_lines:
        handles = [class_lines[label] for label in sorted(class_lines)] + [pooled]
        names = [line.get_label() for line in handles]
    else:  # many classes share one colour: one entry for them all
        handles, names = [axes[0].get_lines()[0], pooled], ["each class", "pooled"]
    figure.legend(
        handles=handles,
        labels=names,
        loc="outside right center",
        fontsize=8,
        frameon=False,
        title="class",
        title_fontsize=8,
    )
    figure.suptitle(caption, fontsize=9)
    return figure

"""Per-class utility vs threshold on the unseen classes: baseline beside +TCM."""

from __future__ import annotations

from collections.abc import Sequence

from .functional.opis import OPISResult


def utility_comparison_figure(
    panels: Sequence[tuple[str, OPISResult]], class_names: Sequence[str] | None = None
):
    """One panel per ``(title, OPIS result)``: ``U_c(t)`` of every class and the pooled
    ``U_all(t)`` over the calibration range, on a shared utility axis.

    The spread of the class curves around the pooled one is what OPIS measures; the
    panel title gives OPIS and ε-OPIS.

    Args:
        panels: ``(title, result)`` pairs, e.g. baseline and +TCM.
        class_names: names indexed by label, for the legend.

    Returns:
        A matplotlib ``Figure``.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)
    colours = colormaps["tab10"]
    for axis, (title, result) in zip(axes[0], panels, strict=True):
        thresholds = result.thresholds.cpu().numpy()
        for index, label in enumerate(result.classes.tolist()):
            name = class_names[label] if class_names is not None else str(label)
            axis.plot(
                thresholds,
                result.class_utility[index].cpu().numpy(),
                color=colours(label % 10),
                linewidth=1.2,
                label=name,
            )
        axis.plot(
            thresholds,
            result.pooled_utility.cpu().numpy(),
            color="black",
            linewidth=2.2,
            linestyle="--",
            label="all classes",
        )
        unit = "similarity" if result.higher_is_closer else "distance"
        axis.set_xlabel(f"threshold ({unit}), calibration range")
        axis.set_title(f"{title}\nOPIS {result.opis:.2e}, ε-OPIS {result.eps_opis:.2e}")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"utility (F{result.beta:g})")
    axes[0][-1].legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure

"""Per-class utility vs threshold on the unseen classes: baseline beside +TCM."""

from __future__ import annotations

from collections.abc import Sequence

from .functional.opis import OPISResult
from .plotting import plot_utility_curves


def utility_comparison_figure(panels: Sequence[tuple[str, OPISResult]]):
    """One :func:`pml_tcm.plotting.plot_utility_curves` panel per ``(title, result)``,
    side by side on a shared utility axis.

    The spread of the class curves ``U_c(t)`` around the pooled ``U_all(t)`` over the
    calibration range is what OPIS measures; each title gives OPIS and ε-OPIS.

    Args:
        panels: ``(title, result)`` pairs, e.g. baseline and +TCM.

    Returns:
        A matplotlib ``Figure``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(panels), 4.2))
    axes = figure.subplots(1, len(panels), squeeze=False, sharey=True)
    for axis, (title, result) in zip(axes[0], panels, strict=True):
        plot_utility_curves(
            result,
            ax=axis,
            class_alpha=0.6,
            class_linewidth=1.0,
            title=f"{title}\nOPIS {result.opis:.3g}, ε-OPIS {result.eps_opis:.3g}",
            legend=False,
        )
    axes[0][-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure

"""plot_utility_curves: one line per class plus the pooled line, no pyplot needed."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pml_tcm import plot_utility_curves  # noqa: E402
from pml_tcm.functional.opis import opis  # noqa: E402


def test_one_line_per_class_and_bold_pooled_line_on_top():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 5, generator=gen), torch.randint(0, 6, (80,), generator=gen)
    result = opis(x, y, num_thresholds=30)
    figure = plot_utility_curves(result)
    assert isinstance(figure, Figure)
    lines = figure.axes[0].get_lines()
    assert len(lines) == len(torch.unique(y)) + 1
    assert lines[-1].get_label() == "pooled"
    assert lines[-1].get_linewidth() > lines[0].get_linewidth()
    np.testing.assert_array_equal(lines[-1].get_ydata(), result.pooled_utility.numpy())
    np.testing.assert_array_equal(lines[0].get_xdata(), result.thresholds.numpy())
    figure.savefig(__import__("io").BytesIO(), format="png")


def test_draws_on_given_axes():
    x, y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    figure = Figure()
    ax = figure.add_subplot()
    assert plot_utility_curves(opis(x, y, num_thresholds=10), ax=ax) is figure
    assert len(ax.get_lines()) == len(torch.unique(y)) + 1


def test_few_classes_get_distinct_colours_names_and_a_legend():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 4, generator=gen), torch.randint(0, 4, (60,), generator=gen)
    names = {label: f"name-{label}" for label in range(4)}
    figure = plot_utility_curves(opis(x, y, num_thresholds=10), class_names=names)
    ax = figure.axes[0]
    class_lines = ax.get_lines()[:-1]
    assert [line.get_label() for line in class_lines] == [
        f"name-{label}" for label in sorted(set(y.tolist()))
    ]
    assert len({line.get_color() for line in class_lines}) == len(class_lines)
    assert ax.get_legend() is not None
    many = plot_utility_curves(opis(x, y, num_thresholds=10), max_legend_classes=2)
    assert many.axes[0].get_legend() is None
    assert len({line.get_color() for line in many.axes[0].get_lines()[:-1]}) == 1

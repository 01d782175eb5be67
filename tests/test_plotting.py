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


def _result(seed: int, shift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(120) % 5
    x = torch.randn(120, 6, generator=gen) + 1.5 * torch.nn.functional.one_hot(y, 6) + shift
    return opis(x, y, far_range=(1e-2, 1e-1), num_thresholds=40)


def _all_curves(result) -> np.ndarray:
    return np.concatenate([result.class_utility.numpy().ravel(), result.pooled_utility.numpy()])


def test_y_range_fits_the_curves_and_the_threshold_is_marked():
    result = _result(0)
    threshold = float(result.calibration_range[1])
    figure = plot_utility_curves(result, threshold=threshold, threshold_label="shipped")
    ax = figure.axes[0]
    low, high = ax.get_ylim()
    values = _all_curves(result)
    span = values.max() - values.min()
    assert low <= values.min() and high >= values.max()
    assert high - low <= 1.2 * span + 1e-12  # fitted, not the fixed 0..1
    marks = [line for line in ax.get_lines() if line.get_label() == "shipped"]
    assert len(marks) == 1 and set(marks[0].get_xdata()) == {threshold}
    assert ax.get_xlim()[0] <= threshold <= ax.get_xlim()[1]


def _drawn(figure):
    """Lay the figure out as savefig does and return the renderer for measuring it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _inside(inner, outer) -> bool:
    return (
        inner.x0 >= outer.x0 - 1
        and inner.y0 >= outer.y0 - 1
        and inner.x1 <= outer.x1 + 1
        and inner.y1 <= outer.y1 + 1
    )


def test_comparison_panels_share_axes_and_nothing_is_clipped():
    from pml_tcm.demo.utility_figure import utility_caption, utility_comparison_figure

    first, second = _result(0), _result(1, shift=0.4)
    thresholds = [float(r.calibration_range[1]) for r in (first, second)]
    figure = utility_comparison_figure(
        [("baseline, a long title", first), ("with TCM, a long title", second)],
        thresholds,
        caption=utility_caption((1e-2, 1e-1), 1e-2),
    )
    left, right = figure.axes
    assert left.get_xlim() == right.get_xlim() and left.get_ylim() == right.get_ylim()
    low, high = left.get_xlim()
    for result in (first, second):
        assert low <= result.calibration_range[0] and result.calibration_range[1] <= high
    values = np.concatenate([_all_curves(first), _all_curves(second)])
    assert left.get_ylim()[0] <= values.min() and left.get_ylim()[1] >= values.max()
    assert left.get_ylim()[1] < values.max() + 0.2 * (values.max() - values.min()) + 1e-9
    assert "Lower OPIS is better" in figure.get_suptitle()
    assert "FAR 0.01" in figure.get_suptitle()
    renderer = _drawn(figure)
    page = figure.bbox
    for ax in (left, right):
        assert _inside(ax.title.get_window_extent(renderer), page)
    legend = figure.legends[0]
    assert _inside(legend.get_window_extent(renderer), page)
    assert not legend.get_window_extent(renderer).overlaps(right.get_window_extent(renderer))


def test_circle_panels_have_one_size_and_limits_and_the_legend_is_outside():
    from pml_tcm.demo.embedding_circle import embedding_circle_figure

    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(5, 10), 20)
    tight = rng.randn(100, 2) * 0.1 + [1.0, 0.0]
    spread = rng.randn(100, 2)
    figure = embedding_circle_figure(
        [
            ("ArcFace 2-D\nOPIS 1e-4", tight, labels),
            ("ArcFace 2-D + TCM\nOPIS 2e-4", spread, labels),
        ]
    )
    renderer = _drawn(figure)
    left, right = figure.axes
    assert left.get_xlim() == right.get_xlim() == left.get_ylim() == right.get_ylim()
    left_box, right_box = left.get_window_extent(renderer), right.get_window_extent(renderer)
    assert abs(left_box.width - right_box.width) < 1 and abs(left_box.height - right_box.height) < 1
    for ax in (left, right):
        assert _inside(ax.title.get_window_extent(renderer), figure.bbox)
        assert ax.get_legend() is None
    legend = figure.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(left_box) and not legend.overlaps(right_box)
    assert "own ring" in figure.get_suptitle()

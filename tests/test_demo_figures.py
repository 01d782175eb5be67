"""The demo's figures give a class one colour everywhere: every panel, every figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from pml_tcm.demo.embedding_circle import embedding_circle_figure  # noqa: E402
from pml_tcm.demo.utility_figure import utility_comparison_figure  # noqa: E402
from pml_tcm.functional.opis import opis  # noqa: E402

NAMES = [f"digit {label}" for label in range(10)]


def _opis_result(seed: int, classes: list[int]):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor(classes).repeat(30)
    x = (
        torch.randn(len(labels), 8, generator=gen)
        + 2.0 * torch.nn.functional.one_hot(labels, 10)[:, :8].float()
    )
    return opis(x, labels, far_range=(1e-2, 1e-1), num_thresholds=20)


def _line_colours(figure) -> dict[str, set[tuple[float, ...]]]:
    colours: dict[str, set[tuple[float, ...]]] = {}
    for axis in figure.axes:
        for line in axis.get_lines():
            if line.get_label().startswith("digit"):
                colours.setdefault(line.get_label(), set()).add(to_rgba(line.get_color()))
    return colours


def _scatter_colours(figure) -> dict[str, set[tuple[float, ...]]]:
    colours: dict[str, set[tuple[float, ...]]] = {}
    for axis in figure.axes:
        for points in axis.collections:
            rgba = tuple(points.get_facecolor()[0][:3])
            colours.setdefault(points.get_label(), set()).add(rgba)
    return colours


def test_a_class_has_one_colour_in_every_panel_and_figure():
    # the right panel lacks class 6: a colour by position would shift classes 7-9
    utility = utility_comparison_figure(
        [("baseline", _opis_result(0, [5, 6, 7, 8, 9])), ("TCM", _opis_result(1, [5, 7, 8, 9]))],
        class_names=NAMES,
    )
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(5, 10), 10)
    circle = embedding_circle_figure(
        [("baseline", rng.randn(50, 2), labels), ("TCM", rng.randn(50, 2), labels)], NAMES
    )
    lines, points = _line_colours(utility), _scatter_colours(circle)
    assert sorted(lines) == sorted(points) == [f"digit {label}" for label in range(5, 10)]
    for name in lines:
        assert len(lines[name]) == 1, name  # the same in both utility panels
        assert len(points[name]) == 1, name  # the same in both circle panels
        (line_rgba,) = lines[name]
        (point_rgb,) = points[name]
        assert np.allclose(line_rgba[:3], point_rgb), name  # and across the two figures
    assert len({colours.pop() for colours in lines.values()}) == 5  # distinct classes


def test_the_utility_legend_lists_every_class_of_every_panel_once():
    utility = utility_comparison_figure(
        [("baseline", _opis_result(0, [5, 7, 8])), ("TCM", _opis_result(1, [5, 6, 9]))],
        class_names=NAMES,
    )
    legend = utility.legends[0]
    shown = [text.get_text() for text in legend.get_texts()]
    assert shown == [f"digit {label}" for label in range(5, 10)] + ["pooled"]

"""The report reads itself: OPIS on the pooled utility's scale, rates as fraction and
percent, warnings, the worst classes highlighted, excluded classes left out."""

from __future__ import annotations

import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _opis_reference import naive_opis  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from pml_tcm.cli import main  # noqa: E402
from pml_tcm.report import render  # noqa: E402
from pml_tcm.report.compute import compute_report  # noqa: E402


def _clustered(classes: int, per_class: int, noise: float, seed: int = 0, dim: int = 8):
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(classes), per_class)
    spread = noise * (0.5 + rng.rand(classes))  # classes of uneven difficulty
    centres = rng.randn(classes, dim)
    x = centres[labels] + spread[labels, None] * rng.randn(labels.size, dim)
    return x.astype(np.float32), labels


def _naive(embeddings, labels, **kwargs):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = (unit @ unit.T).astype(np.float64)
    return sims, naive_opis(sims, labels, labels, 0, **kwargs)


def _pair_rates(sims, labels, threshold):
    """Brute-force pooled FAR and FRR at ``threshold`` (a pair matches at >=)."""
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    accepted = sims >= threshold
    far = accepted[~same].mean()
    frr = 1 - accepted[same & off_diagonal].mean()
    return float(far), float(frr)


def _mean(curve, lo, hi, grid):
    return float(np.trapezoid(curve, grid) / (hi - lo)) if hi > lo else float(np.mean(curve))


def test_opis_is_read_on_the_scale_of_the_pooled_utility():
    x, y = _clustered(6, 30, 0.9)
    sims, naive = _naive(x, y)
    report = compute_report(x, y, target_far=1e-2)
    reading = render.read(report)
    mean_pooled = _mean(naive["pooled"], naive["lo"], naive["hi"], naive["grid"])
    assert reading.typical_gap == pytest.approx(math.sqrt(naive["opis"]), rel=1e-3)
    assert reading.mean_pooled_utility == pytest.approx(mean_pooled, rel=1e-3)
    assert reading.eps_gap == pytest.approx(math.sqrt(naive["eps_opis"]), rel=1e-3)
    printed = " ".join(render.text(report, 3).split())  # the terminal's lines joined
    assert f"Its root, {math.sqrt(naive['opis']):.3g}, is the typical per-class gap" in printed
    assert f"averages {mean_pooled:.3g}" in printed
    assert f"{100 * math.sqrt(naive['opis']) / mean_pooled:.3g}% off it" in printed


def test_rates_are_fractions_with_their_percentage_and_a_high_frr_is_flagged(tmp_path, capsys):
    x, y = _clustered(6, 30, 0.9)
    np.save(tmp_path / "emb.npy", x)
    np.save(tmp_path / "labels.npy", y)
    args = ["report", str(tmp_path / "emb.npy"), str(tmp_path / "labels.npy")]
    assert main(args + ["--out", str(tmp_path / "out"), "--target-far", "0.001"]) == 0
    printed = capsys.readouterr().out
    sims, _ = _naive(x, y)
    document = json.loads((tmp_path / "out" / "report.json").read_text())
    threshold = document["calibration"]["threshold"]  # at full precision
    far, frr = _pair_rates(sims, y, threshold)
    assert "for target FAR 0.001 (0.1%)" in printed
    # each rate may be followed by its interval: "(95% interval lo .. hi (lo% .. hi%))"
    pooled = re.search(r"pooled: FAR (\S+) \((\S+)%\).*?  FRR (\S+) \((\S+)%\)", printed)
    shown_far, far_percent, shown_frr, frr_percent = map(float, pooled.groups())
    # float32 scores: a pair or two tied with the threshold may fall either way
    negatives = (y[:, None] != y[None, :]).sum()
    positives = (y[:, None] == y[None, :]).sum() - len(y)
    assert shown_far == pytest.approx(far, abs=2.5 / negatives, rel=1e-3)
    assert shown_frr == pytest.approx(frr, abs=2.5 / positives, rel=1e-3)
    assert far_percent == pytest.approx(100 * shown_far, rel=1e-3)
    assert frr_percent == pytest.approx(100 * shown_frr, rel=1e-3)
    frr = shown_frr
    assert frr > 0.5
    warning = f"warning: the pooled FRR at the calibrated threshold is {frr:.4g} ({100 * frr:.4g}%)"
    assert warning in " ".join(printed.split())
    assert "> **Warning:** the pooled FRR" in (tmp_path / "out" / "report.md").read_text()


def test_separable_classes_get_no_warning():
    x, y = _clustered(6, 30, 0.05)
    report = compute_report(x, y, target_far=1e-2)
    sims, _ = _naive(x, y)
    assert _pair_rates(sims, y, report.calibration.threshold)[1] < 0.5
    assert render.read(report).warnings == []


def test_a_far_range_that_collapses_to_one_threshold_is_flagged():
    x, y = _clustered(6, 30, 0.9)
    _, naive = _naive(x, y, far_range=(0.01, 0.01))
    assert naive["lo"] == naive["hi"]
    report = compute_report(x, y, far_range=(0.01, 0.01), target_far=1e-2)
    assert not any("FAR range" in w for w in render.read(compute_report(x, y)).warnings)
    (warning,) = [w for w in render.read(report).warnings if "FAR range" in w]
    assert "collapses to the single threshold" in warning and "--far-range" in warning


def _with_singletons():
    x, y = _clustered(5, 24, 0.3)
    rng = np.random.RandomState(3)
    lonely = rng.randn(6, x.shape[1]).astype(np.float32)
    return np.concatenate([x, lonely]), np.concatenate([y, 100 + np.arange(6)])


def test_excluded_classes_are_never_among_the_worst_nor_in_the_figure():
    x, y = _with_singletons()
    _, naive = _naive(x, y)
    classes = np.unique(y)
    real = [c for c in classes if (y == c).sum() > 1]
    expected = sorted(real, key=lambda c: naive["means"][list(classes).index(c)])
    report = compute_report(x, y, target_far=1e-2)
    worst = report.worst_classes(10)
    assert [row[0] for row in worst] == expected  # 5 rows, no singleton among them
    printed = " ".join(render.text(report, 10).split())
    assert "6 class(es) have no positive pair" in printed
    figure = render.figure(report, 10, 1e-2)
    labels = [line.get_label() for line in figure.axes[0].get_lines()]
    assert not any(f"class {100 + i}" in label for label in labels for i in range(6))
    assert len([label for label in labels if label.startswith("class ")]) == 5
    # the y-range is fitted to the real classes: no flat zero line pulls it to 0
    real_curves = naive["curves"][[list(classes).index(c) for c in real]]
    assert real_curves.min() > 0.2  # the data are made so
    assert figure.axes[0].get_ylim()[0] > 0
    assert figure.axes[0].get_ylim()[0] <= min(real_curves.min(), naive["pooled"].min())


def test_many_classes_show_the_worst_named_over_a_faint_band(tmp_path):
    x, y = _clustered(60, 8, 0.8, dim=16)
    _, naive = _naive(x, y)
    expected = list(np.argsort(naive["means"], kind="stable")[:5])
    report = compute_report(x, y, target_far=1e-2)
    figure = render.figure(report, 5, 1e-2)
    axes = figure.axes[0]
    named = [line.get_label() for line in axes.get_lines()]
    assert named[:5] == [f"class {c} (worst {rank})" for rank, c in enumerate(expected, 1)]
    assert named[5] == "pooled" and named[6].startswith("threshold for FAR 0.01 (1%)")
    bands = [c for c in axes.collections if isinstance(c, PolyCollection)]
    assert [band.get_label() for band in bands] == [
        "other 55 classes: range",
        "other classes: middle 50%",
    ]
    figure.savefig(tmp_path / "many.png")


def test_few_classes_each_get_a_line_and_the_worst_are_named():
    x, y = _clustered(5, 24, 0.9)
    _, naive = _naive(x, y)
    order = list(np.argsort(naive["means"], kind="stable"))
    report = compute_report(x, y, target_far=1e-2)
    figure = render.figure(report, 2, 1e-2)
    lines = figure.axes[0].get_lines()
    labels = [line.get_label() for line in lines[:5]]
    assert labels == [
        f"class {c} (worst {order.index(c) + 1})" if order.index(c) < 2 else f"class {c}"
        for c in range(5)
    ]
    widths = {line.get_label(): line.get_linewidth() for line in lines[:5]}
    assert widths[f"class {order[0]} (worst 1)"] > widths[f"class {order[4]}"]
    assert len({line.get_color() for line in lines[:5]}) == 5

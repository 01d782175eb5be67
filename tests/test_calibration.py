"""calibrate_threshold against a naive per-class FAR/FRR reference in numpy."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance

from pml_tcm import CalibrationReport, calibrate_threshold


def problem(seed=0, n=150, classes=9):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def naive_pairs(distance, x, y, r, ry, self_pairs, chunk_size):
    blocks = [distance(x[s : s + chunk_size], r) for s in range(0, len(x), chunk_size)]
    close = torch.cat(blocks).double().numpy()
    if not distance.is_inverted:
        close = -close
    valid = np.ones(close.shape, dtype=bool)
    if self_pairs:
        valid[np.arange(len(x)), np.arange(len(x))] = False
    same = y.numpy()[:, None] == ry.numpy()[None, :]
    return close, same & valid, ~same & valid


def naive_rates(close, pos, neg, y, t):
    labels = y.numpy()
    far, frr = {}, {}
    for c in np.unique(labels):
        rows = (labels == c)[:, None]
        n_neg, n_pos = (neg & rows).sum(), (pos & rows).sum()
        if n_neg:
            far[c] = ((close >= t) & neg & rows).sum() / n_neg
        if n_pos:
            frr[c] = ((close < t) & pos & rows).sum() / n_pos
    return far, frr


@pytest.mark.parametrize("distance", [CosineSimilarity(), LpDistance()])
@pytest.mark.parametrize("target", [("far", 0.01), ("far", 0.2), ("frr", 0.1), ("frr", 0.0)])
def test_matches_naive_reference(distance, target):
    x, y = problem()
    kind, value = target
    report = calibrate_threshold(
        x, y, distance=distance, chunk_size=32, **{f"target_{kind}": value}
    )
    close, pos, neg = naive_pairs(distance, x, y, x, y, True, 32)
    if kind == "far":
        negatives = np.sort(close[neg])[::-1]
        k = max(1, math.ceil(Fraction(repr(value)) * negatives.size))
        t = negatives[k - 1]
    else:
        positives = np.sort(close[pos])
        t = positives[math.floor(Fraction(repr(value)) * positives.size)]
    assert report.threshold == (t if distance.is_inverted else -t)  # bit-equal
    far, frr = naive_rates(close, pos, neg, y, t)
    classes = report.classes.tolist()
    for i, c in enumerate(classes):
        assert float(report.class_far[i]) == pytest.approx(far[c], abs=1e-12)
        assert float(report.class_frr[i]) == pytest.approx(frr[c], abs=1e-12)
    assert report.far == pytest.approx(((close >= t) & neg).sum() / neg.sum(), abs=1e-12)
    assert report.frr == pytest.approx(((close < t) & pos).sum() / pos.sum(), abs=1e-12)
    if kind == "far":
        assert report.far >= value
    else:
        assert report.frr <= value
    worst = max(far, key=lambda c: far[c])
    assert report.worst_far == pytest.approx(far[worst], abs=1e-12)
    assert report.far_spread == pytest.approx(max(far.values()) - min(far.values()), abs=1e-12)
    assert report.frr_percentiles[50] == pytest.approx(np.percentile(list(frr.values()), 50))
    text = str(report)
    assert "threshold" in text and "worst" in text and kind.upper() in text


def test_separate_reference_and_classes_without_positives():
    x, y = problem(1)
    queries, query_labels = x[:50], y[:50].clone()
    query_labels[0] = 99  # absent from the reference set
    report = calibrate_threshold(queries, query_labels, x[50:], y[50:], target_far=0.05)
    assert isinstance(report, CalibrationReport)
    index = report.classes.tolist().index(99)
    assert not bool(report.has_positives[index])
    assert float(report.class_frr[index]) == 0.0
    close, pos, neg = naive_pairs(
        CosineSimilarity(), queries, query_labels, x[50:], y[50:], False, 4096
    )
    far, frr = naive_rates(close, pos, neg, query_labels, report.threshold)
    assert report.worst_frr == pytest.approx(max(frr.values()), abs=1e-12)
    assert all(math.isfinite(v) for v in report.frr_percentiles.values())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(), "target_far"),
        (dict(target_far=0.1, target_frr=0.1), "target_far"),
        (dict(target_far=0.0), "target_far"),
        (dict(target_far=1.5), "target_far"),
        (dict(target_frr=1.0), "target_frr"),
        (dict(target_frr=-0.1), "target_frr"),
        (dict(target_far=0.1, distance="cos"), "distance"),
    ],
)
def test_bad_settings(kwargs, name):
    x, y = problem()
    with pytest.raises(ValueError, match=name):
        calibrate_threshold(x, y, **kwargs)


def test_bad_inputs():
    x, y = problem()
    bad = x.clone()
    bad[2, 2] = float("inf")
    with pytest.raises(ValueError, match="embeddings"):
        calibrate_threshold(bad, y, target_far=0.1)
    with pytest.raises(ValueError, match="labels"):
        calibrate_threshold(x, y[:-1], target_far=0.1)
    with pytest.raises(ValueError, match="embeddings"):
        calibrate_threshold(x[:0], y[:0], target_far=0.1)
    with pytest.raises(ValueError, match="reference_labels"):
        calibrate_threshold(x, y, x, target_far=0.1)
    with pytest.raises(ValueError, match="target_far"):
        calibrate_threshold(x, torch.zeros_like(y), target_far=0.1)  # no negative pair
    with pytest.raises(ValueError, match="target_frr"):
        calibrate_threshold(x[:5], torch.arange(5), target_frr=0.1)  # no positive pair


@pytest.mark.parametrize(
    "to_labels",
    [
        lambda y: y + 2**62,  # consecutive: one value as float32
        lambda y: (y - 2**61).to(torch.int64),
        lambda y: (y * 7 - 20).to(torch.int8),
        lambda y: y.double() * 0.5 - 1.3,  # non-integral
        lambda y: (y % 2).bool(),
    ],
)
def test_labels_of_any_size_and_dtype(to_labels):
    x, y = problem(2)
    labels = to_labels(y)
    queries, query_labels, reference, reference_labels = x[:60], labels[:60], x[60:], labels[60:]
    report = calibrate_threshold(
        queries, query_labels, reference, reference_labels, target_far=0.05
    )
    close, pos, neg = naive_pairs(
        CosineSimilarity(), queries, query_labels, reference, reference_labels, False, 4096
    )
    negatives = np.sort(close[neg])[::-1]
    assert report.threshold == negatives[max(1, math.ceil(0.05 * negatives.size)) - 1]
    far, frr = naive_rates(close, pos, neg, query_labels, report.threshold)
    assert report.classes.tolist() == sorted(far)  # the labels as given, ascending
    for i, c in enumerate(report.classes.tolist()):
        assert float(report.class_far[i]) == pytest.approx(far[c], abs=1e-12)
        assert float(report.class_frr[i]) == pytest.approx(frr[c], abs=1e-12)
    assert report.worst_far_class == max(far, key=lambda c: far[c])
    assert str(report.worst_far_class) in report.summary()


def test_nan_labels_are_refused_and_label_rows_are_classes():
    x, y = problem()
    nan = y.double()
    nan[4] = float("nan")
    with pytest.raises(ValueError, match="labels.*NaN"):
        calibrate_threshold(x, nan, target_far=0.1)
    with pytest.raises(ValueError, match="reference_labels.*NaN"):
        calibrate_threshold(x, y, x, nan, target_far=0.1)
    # (N, K) label rows are classes, as in pml's calculator: the same report as the ids
    rows = calibrate_threshold(x, torch.stack([y, 7 * y], dim=1), target_far=0.1)
    plain = calibrate_threshold(x, y, target_far=0.1)
    assert rows.threshold == plain.threshold
    assert torch.equal(rows.class_frr, plain.class_frr)
    assert rows.worst_frr_class == (plain.worst_frr_class, 7 * plain.worst_frr_class)
    with pytest.raises(ValueError, match="labels must be 1-D"):
        calibrate_threshold(x, torch.stack([y, y], dim=1)[:, :, None], target_far=0.1)


def test_summary_prints_the_target_as_given():
    # (summary() once printed target_frr=0.9999999 as "target FRR 1")
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(200, 8, generator=gen)
    y = torch.arange(200) % 5
    summary = calibrate_threshold(x, y, target_frr=0.9999999).summary()
    assert "for target FRR 0.9999999" in summary.splitlines()[0]
    summary = calibrate_threshold(x, y, target_far=1e-3).summary()
    assert summary.splitlines()[0].endswith("for target FAR 0.001")

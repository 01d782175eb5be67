"""The streamed engine where class balance is extreme: large classes, one huge class,
target FRR by radix selection, many classes. References are float64 numpy written here."""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import LpDistance

from pml_tcm import calibrate_threshold
from pml_tcm.functional import cosine_similarity_scores, opis, streaming
from pml_tcm.functional.calibration import _key_value, sortable_keys
from pml_tcm.functional.opis import OPISState


def imbalanced(n=300, d=8, seed=0, big=0.9):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.where(
        torch.rand(n, generator=gen) < big, 0, torch.randint(1, 6, (n,), generator=gen)
    )
    centres = torch.randn(6, d, generator=gen)
    return centres[labels] + 1.2 * torch.randn(n, d, generator=gen), labels


def naive_frr_threshold(closeness: np.ndarray, labels: np.ndarray, target_frr: float) -> float:
    n = len(labels)
    positive = (labels[:, None] == labels[None, :]) & ~np.eye(n, dtype=bool)
    values = np.sort(closeness[positive])
    k = math.floor(Fraction(repr(target_frr)) * values.size) + 1
    return float(values[k - 1]) if k <= values.size else math.inf


@pytest.mark.parametrize("large", [4, 256, 10**9])
@pytest.mark.parametrize("target_frr", [0.0, 0.013, 0.5, 0.97])
def test_target_frr_is_exact_on_imbalanced_data(large, target_frr):
    x, y = imbalanced()
    closeness = cosine_similarity_scores(x, x).double().numpy()
    with mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", large):
        report = calibrate_threshold(x, y, target_frr=target_frr, chunk_size=37)
    assert report.threshold == naive_frr_threshold(closeness, y.numpy(), target_frr)
    n = len(y)
    positive = (y[:, None] == y[None, :]) & ~torch.eye(n, dtype=torch.bool)
    rejected = (torch.from_numpy(closeness) < report.threshold) & positive
    assert report.frr == float(rejected.sum()) / float(positive.sum())


def test_target_frr_with_a_distance_and_float64():
    x, y = imbalanced(n=120, seed=2, big=0.6)
    x = x.double()
    distance = LpDistance(normalize_embeddings=False)
    report = calibrate_threshold(x, y, target_frr=0.2, distance=distance)
    d = torch.cdist(x, x).numpy()
    # closeness is minus the distance: the k-th smallest closeness is the k-th largest
    # distance among positives
    assert report.threshold == -naive_frr_threshold(-d, y.numpy(), 0.2)


def test_sortable_keys_order_like_the_floats_and_invert():
    for dtype in (torch.float32, torch.float64):
        values = torch.tensor(
            [-math.inf, -1.0, -1e-40, -0.0, 0.0, 1e-45, 0.5, 1.0, 3e38, math.inf], dtype=dtype
        )
        keys = sortable_keys(values)
        assert torch.all(keys[1:] > keys[:-1])
        assert [_key_value(int(k), dtype) for k in keys] == values.tolist()


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_large_classes_give_the_small_class_result(chunk_size):
    x, y = imbalanced(n=400, seed=5)
    with mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", 10**9):
        small = opis(x, y, chunk_size=chunk_size, num_thresholds=200)
    large = opis(x, y, chunk_size=chunk_size, num_thresholds=200)  # class 0 is large
    assert large.calibration_range == small.calibration_range
    assert large.opis == pytest.approx(small.opis, rel=1e-12)
    assert large.eps_opis == pytest.approx(small.eps_opis, rel=1e-12)
    assert torch.equal(large.state.positive_histogram, small.state.positive_histogram)
    assert torch.equal(large.state.negative_histogram, small.state.negative_histogram)


def test_states_add_in_int64():
    counts = torch.full((1, 2), 2**31 - 1, dtype=torch.int32)
    totals = torch.ones(1, dtype=torch.int32)
    state = OPISState(counts, counts.clone(), totals, totals)
    total = state + state
    assert total.positive_histogram.dtype == torch.int64
    assert int(total.positive_histogram[0, 0]) == 2 * (2**31 - 1)


def test_many_classes_are_evaluated_in_blocks(monkeypatch):
    opis_module = sys.modules["pml_tcm.functional.opis"]  # (the package exports the function)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(300, 6, generator=gen)
    y = torch.randint(0, 90, (300,), generator=gen)
    whole = opis(x, y, num_thresholds=50)
    monkeypatch.setattr(opis_module, "CLASS_BLOCK_ELEMENTS", 50 * 7)  # blocks of 7 classes
    blocked = opis(x, y, num_thresholds=50)
    assert blocked.opis == pytest.approx(whole.opis, rel=1e-12)
    assert blocked.eps_opis == pytest.approx(whole.eps_opis, rel=1e-12)
    assert torch.equal(blocked.mean_class_utility, whole.mean_class_utility)
    assert torch.equal(blocked.class_utility, whole.class_utility)


@pytest.mark.parametrize("large", [4, 10**9])
@pytest.mark.parametrize("target_far", [1e-3, 5e-3, 0.05])  # in, inside and below the range
@pytest.mark.parametrize("retain_limit", [0, 1 << 27])
def test_one_pass_evaluation_equals_opis_and_calibration(large, target_far, retain_limit):
    from pml_tcm.functional.opis import evaluate_sets
    from pml_tcm.functional.prepare import prepare_sets

    x, y = imbalanced(n=260, seed=11, big=0.5)
    with mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", large):
        together = evaluate_sets(
            prepare_sets(x, y), target_far=target_far, retain_limit=retain_limit
        )
        alone = opis(x, y)
        report = calibrate_threshold(x, y, target_far=target_far)
    assert together.opis.opis == alone.opis
    assert together.opis.eps_opis == alone.eps_opis
    assert together.threshold == report.threshold
    errors = together.errors
    false_accepts, false_rejects, negatives, positives = errors.per(
        errors.classes, together.classes.shape[0]
    )
    assert torch.equal(false_accepts.double() / negatives, report.class_far)
    assert torch.equal(false_rejects.double() / positives, report.class_frr)


def test_report_overwrite_normalises_in_place_with_the_same_numbers():
    from pml_tcm.report.compute import compute_report

    x, y = imbalanced(n=200, seed=13, big=0.4)
    array = x.numpy().copy()
    kept = compute_report(array.copy(), y.numpy())
    overwritten = compute_report(array, y.numpy(), overwrite=True)
    assert overwritten.metrics == kept.metrics
    assert overwritten.calibration.threshold == kept.calibration.threshold
    norms = np.linalg.norm(array.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)  # the caller's array, normalised


def test_retrieval_on_unit_rows_skips_the_copy_with_the_same_metrics():
    from pml_tcm.functional import retrieval_metrics
    from pml_tcm.functional.normalize import unit_rows

    x, y = imbalanced(n=150, seed=14, big=0.3)
    rows = unit_rows(x)
    assert retrieval_metrics(rows, y, rows_are_unit=True) == retrieval_metrics(rows, y)


def test_report_streams_its_rows_without_a_sorted_copy():
    # the report sorts its own normalised rows by class (then group) in place, so the
    # streams use them as they are; the numbers do not depend on the rows' order
    from pml_tcm.report.compute import compute_report, permute_rows_

    x, y = imbalanced(n=240, seed=17, big=0.4)
    groups = torch.arange(240) % 3
    order = torch.randperm(240, generator=torch.Generator().manual_seed(2))
    copies = []
    original = streaming.PairStream._sorted_rows

    def spy(self, rows, row_order):
        out = original(self, rows, row_order)
        copies.append(out.data_ptr() != rows.data_ptr())
        return out

    with mock.patch.object(streaming.PairStream, "_sorted_rows", spy):
        first = compute_report(x.numpy(), y.numpy(), groups=groups.numpy(), bootstrap=50)
    assert copies and not any(copies)
    shuffled = compute_report(
        x[order].numpy(), y[order].numpy(), groups=groups[order].numpy(), bootstrap=50
    )
    assert shuffled.metrics == pytest.approx(first.metrics, rel=1e-6)
    assert shuffled.calibration.threshold == first.calibration.threshold
    assert torch.equal(shuffled.calibration.groups.far, first.calibration.groups.far)
    # the in-place permutation against numpy's indexing
    rows = torch.randn(50, 3)
    perm = torch.randperm(50)
    expected = rows[perm].clone()
    assert torch.equal(permute_rows_(rows, perm), expected)


def naive_curves_metrics(positive, negative, totals, grid, beta, epsilon):
    """OPIS, ε-OPIS and the classes' mean utilities, class by class and point by point in
    float64 (trapezoid by hand; classes without a positive left out)."""
    grid = [float(g) for g in grid]
    width = grid[-1] - grid[0]

    def utility(tp, fp, p):
        denominator = (1 + beta**2) * tp + beta**2 * (p - tp) + fp
        return (1 + beta**2) * tp / denominator if denominator > 0 else 0.0

    def mean(values):
        area = sum((b - a) * (u + v) / 2 for a, b, u, v in zip(grid, grid[1:], values, values[1:]))
        return area / width

    def curve(pos, neg, p):
        return [utility(sum(pos[i:]), sum(neg[i:]), p) for i in range(len(grid))]

    pooled = curve(positive.sum(0).tolist(), negative.sum(0).tolist(), int(totals.sum()))
    included = [c for c in range(len(totals)) if totals[c] > 0]
    curves = {
        c: curve(positive[c].tolist(), negative[c].tolist(), int(totals[c])) for c in included
    }
    means = {c: mean(curves[c]) for c in included}
    opis_value = sum(mean([(u - v) ** 2 for u, v in zip(curves[c], pooled)]) for c in included)
    opis_value /= len(included)
    order = sorted(included, key=lambda c: means[c])
    worst = max(1, math.ceil(epsilon * len(included)))
    worst_mean = [sum(curves[c][i] for c in order[:worst]) / worst for i in range(len(grid))]
    rest = order[worst:]
    rest_mean = [sum(curves[c][i] for c in rest) / len(rest) for i in range(len(grid))]
    eps_value = mean([(u - v) ** 2 for u, v in zip(worst_mean, rest_mean)])
    return opis_value, eps_value, means


@pytest.mark.parametrize("block_classes", [1, 3, 1000])
@pytest.mark.parametrize("beta", [0.3, 1.0, 2.0])
def test_curves_metrics_equal_a_naive_computation(monkeypatch, block_classes, beta):
    # classes without a positive (some with negatives), one without any pair, blocks of
    # classes: OPIS, ε-OPIS and the mean utilities against the class-by-class reference
    from pml_tcm.functional.opis import opis_compute, threshold_grid

    opis_module = sys.modules["pml_tcm.functional.opis"]
    grid_size, num_classes = 12, 23
    gen = torch.Generator().manual_seed(5)
    positive = torch.randint(0, 4, (num_classes, grid_size), generator=gen)
    negative = torch.randint(0, 6, (num_classes, grid_size), generator=gen)
    positive[[2, 7, 19]] = 0  # excluded classes (7: no pair at all)
    negative[7] = 0
    below = torch.randint(0, 3, (num_classes,), generator=gen)  # positives under the grid
    totals = positive.sum(1) + below * (positive.sum(1) > 0)
    state = OPISState(positive, negative, totals, negative.sum(1))
    grid = threshold_grid(0.1, 0.7, grid_size)
    monkeypatch.setattr(opis_module, "CLASS_BLOCK_ELEMENTS", grid_size * block_classes)

    result = opis_compute(state, torch.arange(num_classes), grid, beta=beta, epsilon=0.2)
    expected_opis, expected_eps, means = naive_curves_metrics(
        positive, negative, totals, grid, beta, 0.2
    )
    assert result.opis == pytest.approx(expected_opis, rel=1e-12)
    assert result.eps_opis == pytest.approx(expected_eps, rel=1e-12)
    for c, value in means.items():
        assert float(result.mean_class_utility[c]) == pytest.approx(value, rel=1e-12, abs=1e-15)
    assert bool(result.excluded[[2, 7, 19]].all()) and int(result.excluded.sum()) == 3


def test_curve_functions_stay_importable_from_the_opis_module():
    from pml_tcm.functional import utility

    opis_module = sys.modules["pml_tcm.functional.opis"]  # (the package exports the function)

    assert opis_module.f_beta is utility.f_beta and opis_module.grid_mean is utility.grid_mean
    # F-β's zero denominator (no pair, no positive) is 0, not NaN
    zero = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(utility.f_beta(zero, zero, zero, 1.0), torch.zeros(3, dtype=torch.float64))

"""One input preparation: every evaluation entry point takes the same inputs the same way.

Each case here was a separate behaviour per entry point before (numpy refused by one,
zero rows scored as 0 by another, half precision scored in half, ties above 1, ...).
References are naive: float64 full matrices written here, or pml's own numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_tcm import OPISAccuracyCalculator, calibrate_threshold
from pml_tcm.functional import cosine_similarity_scores, opis, retrieval_metrics
from pml_tcm.functional.far_search import FarSearchError


def problem(n=90, d=6, classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def naive_far_threshold(x, y, far):
    """k-th largest negative cosine in float64, k = max(1, ceil(far * n_neg))."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    s = (u @ u.T).clamp(-1, 1)
    neg = y[:, None] != y[None, :]
    values = torch.sort(s[neg], descending=True).values
    k = max(1, int(np.ceil(far * values.numel() - 1e-9)))
    return float(values[k - 1])


def test_numpy_inputs_are_accepted_everywhere_with_the_tensor_result():
    x, y = problem()
    report = calibrate_threshold(x.numpy(), y.numpy(), target_far=0.05)
    assert report.threshold == calibrate_threshold(x, y, target_far=0.05).threshold
    assert opis(x.numpy(), y.numpy()).opis == opis(x, y).opis
    calculator = OPISAccuracyCalculator(include=("opis", "precision_at_1"))
    assert calculator.get_accuracy(x.numpy(), y.numpy()) == calculator.get_accuracy(x, y)


@pytest.mark.parametrize("entry", ["opis", "calibrate", "calculator", "retrieval"])
def test_zero_norm_rows_are_refused_naming_the_row(entry):
    x, y = problem()
    x[17] = 0
    with pytest.raises(ValueError, match="zero-norm row.*17"):
        if entry == "opis":
            opis(x, y)
        elif entry == "calibrate":
            calibrate_threshold(x, y, target_far=0.05)
        elif entry == "calculator":
            OPISAccuracyCalculator(include=("opis",)).get_accuracy(x, y)
        else:
            retrieval_metrics(x, y)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_scored_in_float32(dtype):
    x, y = problem(n=200, d=16, classes=6)
    half = x.to(dtype)
    widened = half.float()
    assert opis(half, y).opis == opis(widened, y).opis
    assert opis(half, y).eps_opis == opis(widened, y).eps_opis
    got = calibrate_threshold(half, y, target_far=1e-2).threshold
    assert got == calibrate_threshold(widened, y, target_far=1e-2).threshold
    assert got == pytest.approx(naive_far_threshold(widened, y, 1e-2), abs=1e-6)


def test_inputs_that_require_grad_are_evaluated_without_grad():
    x, y = problem()
    leaf = x.clone().requires_grad_(True)
    assert opis(leaf, y).opis == opis(x, y).opis
    assert calibrate_threshold(leaf, y, target_far=0.05).threshold == (
        calibrate_threshold(x, y, target_far=0.05).threshold
    )
    assert leaf.grad is None


@pytest.mark.parametrize(
    "query, message",
    [
        (torch.randn(30), "query must be 2-D"),
        (torch.randn(30, 4, 2), "query must be 2-D"),
        (torch.randn(0, 4), "query is empty"),
    ],
)
def test_calculator_bad_shapes_are_named(query, message):
    labels = torch.zeros(query.shape[0], dtype=torch.int64)
    with pytest.raises(ValueError, match=message):
        OPISAccuracyCalculator(include=("opis", "precision_at_1")).get_accuracy(query, labels)


def _includes_problem():
    x, y = problem(n=80, d=6, classes=4, seed=3)
    queries, query_labels = x[:30], y[:30]
    return queries, query_labels, x, y


@pytest.mark.parametrize("entry", ["opis", "calibrate", "calculator"])
def test_ref_includes_query_is_verified_row_for_row(entry):
    queries, query_labels, references, reference_labels = _includes_problem()
    shifted = torch.cat([references[5:], references[:5]])  # long enough, wrong rows
    shifted_labels = torch.cat([reference_labels[5:], reference_labels[:5]])
    with pytest.raises(ValueError, match="ref_includes_query.*differs"):
        if entry == "opis":
            opis(queries, query_labels, shifted, shifted_labels, ref_includes_query=True)
        elif entry == "calibrate":
            calibrate_threshold(
                queries,
                query_labels,
                shifted,
                shifted_labels,
                target_far=0.05,
                ref_includes_query=True,
            )
        else:
            OPISAccuracyCalculator(include=("opis",)).get_accuracy(
                queries, query_labels, shifted, shifted_labels, ref_includes_query=True
            )
    relabelled = reference_labels.clone()
    relabelled[3] = reference_labels[3] + 1
    with pytest.raises(ValueError, match="reference_labels.*row 3 differs"):
        opis(queries, query_labels, references, relabelled, ref_includes_query=True)


def _duplicated_rows():
    # unit rows whose self-cosine rounds above 1 in float32, each row three times under
    # different labels: the top negatives are ties at (about) 1
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 16, generator=gen)
    return base.repeat(3, 1), torch.arange(120) % 7


def test_ties_at_one_are_clamped_and_independent_of_chunking():
    x, y = _duplicated_rows()
    thresholds = {
        c: calibrate_threshold(x, y, target_far=0.01, chunk_size=c).threshold
        for c in (1, 2, 5, None)
    }
    assert set(thresholds.values()) == {1.0}
    results = [opis(x, y, chunk_size=c) for c in (1, 2, 5, None)]
    assert len({(r.opis, r.eps_opis, r.calibration_range) for r in results}) == 1
    assert results[0].calibration_range[1] <= 1.0


def test_a_tiny_explicit_range_is_counted_exactly():
    x, y = problem(n=40, d=4, classes=3)
    x = torch.randint(-2, 3, x.shape, generator=torch.Generator().manual_seed(1)).float()
    x[(x == 0).all(dim=1), 0] = 1
    # many scores sit at or next to 0: right on a range [0, 1e-40] (denormal edges)
    result = opis(x, y, calibration_range=(0.0, 1e-40), num_thresholds=3)
    s = cosine_similarity_scores(x, x).double()

    def up(value):  # the smallest float32 >= value
        f = np.float32(value)
        return float(f if float(f) >= value else np.nextafter(f, np.float32(1)))

    edges = [up(g) for g in (0.0, 5e-41, 1e-40)]
    eye = torch.eye(len(y), dtype=torch.bool)
    pos = (y[:, None] == y[None, :]) & ~eye
    for c in range(3):
        rows = (y == c)[:, None]
        at_or_above = [int(((s >= g) & pos & rows).sum()) for g in edges]
        counted = result.state.positive_histogram[c].flip(0).cumsum(0).flip(0).tolist()
        assert counted == at_or_above


def test_the_far_search_raises_where_it_stops(monkeypatch):
    import pml_tcm.functional.far_search as far_search

    monkeypatch.setattr(far_search, "MAX_PASSES", 1)
    x, y = problem(n=60)
    with pytest.raises(FarSearchError, match="passes"):
        opis(x, y, collect_limit=1, retain_limit=0)


def test_direct_metric_calls_compute_on_their_own_inputs():
    calculator = OPISAccuracyCalculator(include=("opis", "eps_opis"))
    a, ya = problem(seed=1)
    b, yb = problem(seed=2)
    calculator.get_accuracy(a, ya)
    kwargs = dict(
        query=b,
        query_labels=yb.float(),
        reference=b,
        reference_labels=yb.float(),
        ref_includes_query=True,
    )
    assert calculator.calculate_opis(**kwargs) == opis(b, yb).opis
    assert calculator.calculate_eps_opis(**kwargs) == opis(b, yb).eps_opis


def test_per_class_lists_align_with_pml():
    x, y = problem(n=60, classes=5, seed=4)
    # five singleton classes (no positive pair): excluded from OPIS, lone for pml
    y = torch.cat([y, torch.arange(10, 15)])
    x = torch.cat([x, torch.randn(5, x.shape[1])])
    ours = OPISAccuracyCalculator(include=("opis", "precision_at_1"), return_per_class=True)
    got = ours.get_accuracy(x, y)
    theirs = AccuracyCalculator(include=("precision_at_1",), return_per_class=True)
    expected = theirs.get_accuracy(x, y)
    assert got["precision_at_1"] == expected["precision_at_1"]
    assert len(got["opis"]) == len(expected["precision_at_1"]) == 5
    result = opis(x, y)
    included = torch.unique(y)[:5]
    assert torch.equal(result.classes[~result.excluded], included)
    assert got["opis"] == result.mean_class_utility[~result.excluded].tolist()

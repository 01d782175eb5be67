"""OPISAccuracyCalculator inside pml: metrics, tester, no k-NN, distances, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis
from pytorch_metric_learning import testers
from pytorch_metric_learning.distances import CosineSimilarity, LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_tcm import OPISAccuracyCalculator

CPU = torch.device("cpu")


def data(seed=0, n=120, classes=8, dim=6):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def closeness(distance, queries, references, chunk_size):
    blocks = [
        distance(queries[s : s + chunk_size], references)
        for s in range(0, len(queries), chunk_size)
    ]
    scores = torch.cat(blocks).double().numpy()
    return scores if distance.is_inverted else -scores


def test_adds_opis_to_pml_metrics():
    x, y = data()
    calc = OPISAccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis"),
        num_thresholds=100,
        device=CPU,
    )
    got = calc.get_accuracy(x, y)
    plain = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"), device=CPU
    ).get_accuracy(x, y)
    assert got["precision_at_1"] == plain["precision_at_1"]
    assert got["mean_average_precision_at_r"] == plain["mean_average_precision_at_r"]
    expected = naive_opis(
        closeness(CosineSimilarity(), x, x, len(x)), y.numpy(), y.numpy(), 0, num_thresholds=100
    )
    assert isinstance(got["opis"], float) and isinstance(got["eps_opis"], float)
    assert got["opis"] == pytest.approx(expected["opis"], abs=1e-9)
    assert got["eps_opis"] == pytest.approx(expected["eps_opis"], abs=1e-9)


def test_opis_alone_runs_no_knn():
    class NoKNN:
        def __call__(self, *args, **kwargs):
            raise AssertionError("k-NN must not run for OPIS alone")

    x, y = data()
    calc = OPISAccuracyCalculator(include=("opis",), knn_func=NoKNN(), device=CPU)
    assert set(calc.get_accuracy(x, y)) == {"opis"}
    calc = OPISAccuracyCalculator(include=("opis", "eps_opis"), knn_func=NoKNN(), device=CPU)
    assert set(calc.get_accuracy(x, y)) == {"opis", "eps_opis"}


@pytest.mark.parametrize("ref_includes_query", [False, True])
def test_lp_distance_and_separate_references(ref_includes_query):
    x, y = data(1)
    q, qy = x[:40], y[:40]
    r, ry = (x, y) if ref_includes_query else (x[40:], y[40:])
    distance = LpDistance()
    calc = OPISAccuracyCalculator(
        include=("opis", "eps_opis"),
        distance=distance,
        num_thresholds=64,
        chunk_size=16,
        device=CPU,
    )
    got = calc.get_accuracy(q, qy, r, ry, ref_includes_query)
    expected = naive_opis(
        closeness(distance, q, r, 16),
        qy.numpy(),
        ry.numpy(),
        0 if ref_includes_query else None,
        num_thresholds=64,
    )
    assert got["opis"] == pytest.approx(expected["opis"], abs=1e-9)
    assert got["eps_opis"] == pytest.approx(expected["eps_opis"], abs=1e-9)
    lo, hi = calc.last_result.calibration_range
    assert (lo, hi) == (-expected["hi"], -expected["lo"])  # distances, bit-equal
    assert lo <= hi


def test_explicit_calibration_range_in_distance_units():
    x, y = data(2)
    distance = LpDistance()
    calc = OPISAccuracyCalculator(
        include=("opis",), distance=distance, calibration_range=(0.8, 1.3), device=CPU
    )
    got = calc.get_accuracy(x, y)
    expected = naive_opis(
        closeness(distance, x, x, len(x)),
        y.numpy(),
        y.numpy(),
        0,
        calibration_range=(-1.3, -0.8),
    )
    assert got["opis"] == pytest.approx(expected["opis"], abs=1e-9)
    assert calc.last_result.calibration_range == (0.8, 1.3)


def test_return_per_class_gives_mean_utility_per_label():
    x, y = data(3)
    calc = OPISAccuracyCalculator(
        include=("opis", "eps_opis"), return_per_class=True, num_thresholds=50, device=CPU
    )
    got = calc.get_accuracy(x, y)
    expected = naive_opis(
        closeness(CosineSimilarity(), x, x, len(x)), y.numpy(), y.numpy(), 0, num_thresholds=50
    )
    assert len(got["opis"]) == len(torch.unique(y))
    np.testing.assert_allclose(got["opis"], expected["means"], atol=1e-9)
    assert isinstance(got["eps_opis"], float)


def test_global_embedding_space_tester():
    x, y = data(4, n=200, classes=10, dim=8)
    dataset = torch.utils.data.TensorDataset(x, y)
    calc = OPISAccuracyCalculator(
        include=("precision_at_1", "opis", "eps_opis"), num_thresholds=100, device=CPU
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calc, dataloader_num_workers=0, data_device=CPU, batch_size=64
    )
    accuracies = tester.test({"val": dataset}, 0, torch.nn.Identity())["val"]
    for key in ("precision_at_1_level0", "opis_level0", "eps_opis_level0"):
        assert isinstance(accuracies[key], float)
    direct = OPISAccuracyCalculator(include=("opis",), num_thresholds=100, device=CPU)
    normalized = torch.nn.functional.normalize(x)  # the tester normalises the embeddings
    assert accuracies["opis_level0"] == pytest.approx(
        direct.get_accuracy(normalized, y)["opis"], abs=1e-9
    )


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(far_range=(0.0, 0.1)), "far_range"),
        (dict(far_range=(0.3, 0.1)), "far_range"),
        (dict(calibration_range=(1.0, 0.0)), "calibration_range"),
        (dict(num_thresholds=1), "num_thresholds"),
        (dict(epsilon=1.5), "epsilon"),
        (dict(beta=0), "beta"),
        (dict(distance="cosine"), "distance"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(shard_queries="yes"), "shard_queries"),
        (dict(include=("opis",), label_comparison_fn=lambda a, b: a == b), "label_comparison_fn"),
    ],
)
def test_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        OPISAccuracyCalculator(**kwargs)


def test_bad_inputs():
    x, y = data()
    calc = OPISAccuracyCalculator(include=("opis",), device=CPU)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="query"):
        calc.get_accuracy(bad, y)
    with pytest.raises(ValueError, match="reference"):
        calc.get_accuracy(x, y, bad, y)
    with pytest.raises(ValueError, match="query_labels"):
        calc.get_accuracy(x, torch.where(y == 1, float("nan"), y + 0.5))
    with pytest.raises(ValueError):
        calc.get_accuracy(x, y[:-1])
    with pytest.raises(ValueError, match="shard_queries"):
        OPISAccuracyCalculator(include=("opis",), shard_queries=True, device=CPU).get_accuracy(x, y)

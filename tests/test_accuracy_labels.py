"""Labels of any size and dtype, and custom label comparisons, in OPISAccuracyCalculator.

The references are independent of pml_tcm: pml's plain AccuracyCalculator on the same
data relabelled 0..C-1 by the test (where float32 holds the labels exactly), and the
naive numpy OPIS, which compares the original labels by value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_tcm import OPISAccuracyCalculator
from pml_tcm.functional.labels import dense_class_ids

CPU = torch.device("cpu")
PML_METRICS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)
ALL = PML_METRICS + ("opis", "eps_opis")


def data(seed=0, n=160, classes=7, dim=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=gen), torch.randint(0, classes, (n,), generator=gen)


def cosine(x, r):
    x, r = x.double().numpy(), r.double().numpy()
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    r = r / np.linalg.norm(r, axis=1, keepdims=True)
    return x @ r.T


def relabel(y, dtype):
    """Increasing, injective map of the small ids ``y`` to labels of ``dtype`` that pml's
    float32 cast cannot hold apart (or cannot take, for non-integral floats)."""
    num = int(y.max()) + 1
    if dtype == torch.bool:
        return y.bool() if num <= 2 else None
    if dtype.is_floating_point:
        values = torch.arange(num, dtype=torch.float64) * 0.25 - 1.1  # non-integral
    elif dtype == torch.uint8:
        values = torch.arange(num) * 37
    else:
        info = torch.iinfo(dtype)
        values = torch.linspace(info.min, info.max, num, dtype=torch.float64)
        values = torch.tensor([int(v) for v in values.tolist()][:-1] + [info.max])
        if dtype == torch.int64:  # neighbours that collide as float32
            values = torch.arange(num, dtype=torch.int64) - 3 + 2**62
    return values.to(dtype)[y]


def pml_plain(x, y, r=None, ry=None, ref_includes_query=False, **kwargs):
    calc = AccuracyCalculator(include=PML_METRICS, device=CPU, **kwargs)
    return calc.get_accuracy(x, y, r, ry, ref_includes_query)


def assert_metrics_equal(got, expected):
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.bool,
    ],
)
@pytest.mark.parametrize("return_per_class", [False, True])
def test_every_metric_gives_the_values_of_dense_ids(dtype, return_per_class):
    x, y = data(classes=2 if dtype == torch.bool else 7)
    labels = relabel(y, dtype)
    calc = OPISAccuracyCalculator(
        include=ALL, num_thresholds=64, return_per_class=return_per_class, device=CPU
    )
    got = calc.get_accuracy(x, labels)
    assert_metrics_equal(got, pml_plain(x, y, return_per_class=return_per_class))
    expected = naive_opis(cosine(x, x), labels.numpy(), labels.numpy(), 0, num_thresholds=64)
    if return_per_class:
        np.testing.assert_allclose(got["opis"], expected["means"], atol=1e-9)
    else:
        assert got["opis"] == pytest.approx(expected["opis"], abs=1e-9)
    assert got["eps_opis"] == pytest.approx(expected["eps_opis"], abs=1e-9)
    assert torch.equal(calc.last_result.classes, torch.unique(labels).cpu())


def test_return_per_class_keeps_pml_order_of_classes():
    # Labels whose order differs from the generator's ids: pml lists classes in ascending
    # label order; the reference gets dense ids from numpy's sorted unique values.
    x, y = data(8, n=150, classes=6)
    values = np.array([2**62 + 1, -(2**40), 7, 2**62, -3, 2**53 + 1], dtype=np.int64)
    labels = values[y.numpy()]
    _, dense = np.unique(labels, return_inverse=True)
    calc = OPISAccuracyCalculator(include=ALL, num_thresholds=32, return_per_class=True, device=CPU)
    got = calc.get_accuracy(x, torch.from_numpy(labels))
    assert_metrics_equal(got, pml_plain(x, torch.from_numpy(dense), return_per_class=True))
    naive = naive_opis(cosine(x, x), labels, labels, 0, num_thresholds=32)
    np.testing.assert_allclose(got["opis"], naive["means"], atol=1e-9)
    assert calc.last_result.classes.tolist() == sorted(values.tolist())


def test_labels_beyond_float32_do_not_collide():
    # Consecutive integers from 2^62 on are one float32 value: pml alone sees one class.
    x, y = data(1, n=300, classes=10)
    big = y + 2**62
    assert pml_plain(x, big)["precision_at_1"] == 1.0  # the collision, as pml reports it
    calc = OPISAccuracyCalculator(include=ALL, device=CPU)
    got = calc.get_accuracy(x, big)
    assert_metrics_equal(got, pml_plain(x, y))
    assert got["precision_at_1"] < 0.3
    expected = naive_opis(cosine(x, x), big.numpy(), big.numpy(), 0)
    assert got["opis"] == pytest.approx(expected["opis"], abs=1e-9)
    assert got["eps_opis"] == pytest.approx(expected["eps_opis"], abs=1e-9)
    assert calc.last_result.classes.tolist() == sorted(set(big.tolist()))


def test_separate_reference_set_of_another_dtype_and_numpy_uint64():
    x, y = data(2, n=200, classes=9)
    q, qy, r, ry = x[:80], y[:80], x[80:], y[80:]
    ry = ry.clone()
    ry[ry == 4] = 8  # a query class without references, a reference class without queries
    expected = pml_plain(q, qy, r, ry)
    calc = OPISAccuracyCalculator(include=ALL, num_thresholds=32, device=CPU)
    got = calc.get_accuracy(q, (qy - 50).to(torch.int16), r, ry - 50)  # int16 vs int64
    assert_metrics_equal(got, expected)
    huge = np.uint64(2**63) + np.arange(9, dtype=np.uint64) * np.uint64(3)
    got = calc.get_accuracy(q.numpy(), huge[qy.numpy()], r.numpy(), huge[ry.numpy()])
    assert_metrics_equal(got, expected)
    naive = naive_opis(cosine(q, r), qy.numpy(), ry.numpy(), None, num_thresholds=32)
    assert got["opis"] == pytest.approx(naive["opis"], abs=1e-9)


def test_ref_includes_query_with_large_labels():
    x, y = data(3, n=120, classes=6)
    extra_x, extra_y = data(4, n=40, classes=6)
    r, ry = torch.cat([x, extra_x]), torch.cat([y, extra_y])
    calc = OPISAccuracyCalculator(include=ALL, num_thresholds=32, device=CPU)
    got = calc.get_accuracy(x, y - 2**61, r, ry - 2**61, True)  # collide as float32
    assert_metrics_equal(got, pml_plain(x, y, r, ry, True))
    naive = naive_opis(cosine(x, r), y.numpy(), ry.numpy(), 0, num_thresholds=32)
    assert got["opis"] == pytest.approx(naive["opis"], abs=1e-9)


def test_two_dimensional_labels_are_compared_by_row():
    x, y = data(5, n=150, classes=8)
    # y -> (y // 4, y % 4) keeps the order (rows compare lexicographically): the rows'
    # dense ids are y itself.
    rows = torch.stack([y // 4, y % 4], dim=1)
    expected = pml_plain(x, y, return_per_class=True)
    calc = OPISAccuracyCalculator(include=ALL, num_thresholds=32, return_per_class=True, device=CPU)
    got = calc.get_accuracy(x, rows * 2**50)
    assert_metrics_equal(got, expected)
    naive = naive_opis(cosine(x, x), y.numpy(), y.numpy(), 0, num_thresholds=32)
    np.testing.assert_allclose(got["opis"], naive["means"], atol=1e-9)


def test_custom_comparison_leaves_opis_out_unless_requested():
    x, y = data(6)
    rows = torch.stack([y, y % 3], dim=1)

    def same_first(a, b):
        return a[..., 0] == b[..., 0]

    kwargs = dict(exclude=("NMI", "AMI"), label_comparison_fn=same_first, device=CPU)
    calc = OPISAccuracyCalculator(**kwargs)
    assert not {"opis", "eps_opis"} & set(calc.get_curr_metrics())
    got = calc.get_accuracy(x, rows)
    expected = AccuracyCalculator(**kwargs).get_accuracy(x, rows)
    assert set(got) == set(expected)
    assert_metrics_equal(got, expected)
    for include in [("opis",), ("precision_at_1", "eps_opis")]:
        with pytest.raises(ValueError, match="label_comparison_fn"):
            OPISAccuracyCalculator(include=include, **kwargs)
        with pytest.raises(ValueError, match="label_comparison_fn"):
            calc.get_accuracy(x, rows, include=include)
    # Excluding them by name is accepted as well.
    calc = OPISAccuracyCalculator(
        exclude=("NMI", "AMI", "opis"), label_comparison_fn=same_first, device=CPU
    )
    assert set(calc.get_accuracy(x, rows)) == set(expected)


def test_custom_comparison_on_float_labels_matches_pml():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(60, 4, generator=gen)
    labels = torch.rand(60, generator=gen, dtype=torch.float64) * 5

    def close(a, b):
        return torch.abs(a - b) < 1

    kwargs = dict(exclude=("NMI", "AMI"), label_comparison_fn=close, device=CPU)
    got = OPISAccuracyCalculator(**kwargs).get_accuracy(x, labels)
    assert_metrics_equal(got, AccuracyCalculator(**kwargs).get_accuracy(x, labels))


def test_bad_labels():
    x, y = data()
    calc = OPISAccuracyCalculator(include=("precision_at_1", "opis"), device=CPU)
    nan = y.double()
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="query_labels.*NaN"):
        calc.get_accuracy(x, nan)
    with pytest.raises(ValueError, match="reference_labels.*NaN"):
        calc.get_accuracy(x, y, x, nan)
    with pytest.raises(ValueError, match="query_labels"):
        calc.get_accuracy(x, y.tolist())
    with pytest.raises(ValueError, match="query_labels"):
        calc.get_accuracy(x, np.array(["a"] * len(y), dtype=object))
    with pytest.raises(ValueError, match="uint64"):
        calc.get_accuracy(x, torch.from_numpy(y.numpy().astype(np.uint64)), x, y)
    with pytest.raises(ValueError):
        calc.get_accuracy(x, y[:-1])


@pytest.mark.parametrize(
    "sets",
    [
        [torch.tensor([5, -3, 2**62, 5])],
        [torch.tensor([0.5, -1.25, 0.5]), torch.tensor([7, 0])],
        [torch.tensor([True, False]), torch.tensor([3], dtype=torch.int8)],
        [torch.tensor([[1, 2], [0, 9], [1, 2]]), torch.tensor([[0, 9]])],
    ],
)
def test_dense_class_ids_against_sorted_distinct_values(sets):
    ids, classes = dense_class_ids(sets, [f"set{i}" for i in range(len(sets))])
    values = [tuple(v) if isinstance(v, list) else v for s in sets for v in s.tolist()]
    distinct = sorted(set(values))
    expected = [distinct.index(v) for v in values]
    assert torch.cat(ids).tolist() == expected
    assert all(i.dtype == torch.int64 for i in ids)
    assert [tuple(c) if isinstance(c, list) else c for c in classes.tolist()] == distinct

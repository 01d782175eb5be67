"""Threshold consistency across groups of queries, and bootstrap intervals.

Every number is checked against a naive float64 computation over the full pair matrix
written here (or against the class results, which have their own naive tests).
"""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis
from pytorch_metric_learning import testers

from pml_tcm import GroupedEmbeddingSpaceTester, OPISAccuracyCalculator, calibrate_threshold
from pml_tcm.functional import bootstrap, opis, streaming


def clustered(num_classes=8, per_class=30, num_groups=4, dim=8, seed=0, spread=None):
    """Clustered classes; each query in a random group; a group's own noise level."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    groups = torch.randint(0, num_groups, (labels.numel(),), generator=gen)
    centres = torch.randn(num_classes, dim, generator=gen) * 2
    noise = torch.ones(num_groups) if spread is None else torch.tensor(spread)
    x = centres[labels] + noise[groups, None] * torch.randn(labels.numel(), dim, generator=gen)
    return x.double(), labels, groups


def cosine(queries, references):
    q = queries / queries.norm(dim=1, keepdim=True)
    r = references / references.norm(dim=1, keepdim=True)
    return (q @ r.T).clamp(-1, 1).numpy()


def naive_rates(closeness, labels, reference_labels, self_offset, units, threshold):
    """Per unit ``(FAR, FRR, false accepts, false rejects, negatives, positives)``."""
    n, m = closeness.shape
    valid = np.ones((n, m), dtype=bool)
    if self_offset is not None:
        valid[np.arange(n), np.arange(n) + self_offset] = False
    same = labels[:, None] == reference_labels[None, :]
    accepted = closeness >= threshold
    rows = {}
    for unit in np.unique(units):
        mine = (units == unit)[:, None] & valid
        pos, neg = mine & same, mine & ~same
        fa, fr = int((neg & accepted).sum()), int((pos & ~accepted).sum())
        rows[unit] = (fa / max(1, neg.sum()), fr / max(1, pos.sum()), fa, fr, neg.sum(), pos.sum())
    return rows


# ---------------------------------------------------------------- group OPIS


def test_groups_equal_to_labels_give_the_class_results():
    x, y, _ = clustered(seed=1)
    by_class = opis(x, y)
    by_group = opis(x, y, groups=y.numpy())  # NumPy groups are accepted
    assert by_group.by == "group" and by_class.by == "class"
    assert torch.equal(by_group.classes, by_class.classes)
    assert by_group.opis == by_class.opis
    assert by_group.eps_opis == by_class.eps_opis
    assert torch.equal(by_group.class_utility, by_class.class_utility)


@pytest.mark.parametrize("large", [4, 10**9])  # the large-class slabs split by group, or not
@pytest.mark.parametrize("separate", [False, True])
def test_group_opis_matches_naive_reference(large, separate):
    x, y, g = clustered(num_classes=5, per_class=24, num_groups=3, seed=2, spread=[0.5, 1, 2])
    references = reference_labels = None
    if separate:
        xr, yr, _ = clustered(num_classes=6, per_class=10, seed=3)
        references, reference_labels = xr, yr
    with mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", large):
        result = opis(x, y, references, reference_labels, groups=g * 3 + 100, chunk_size=17)
    ref = x if references is None else references
    ref_labels = y if reference_labels is None else reference_labels
    expected = naive_opis(
        cosine(x, ref),
        y.numpy(),
        ref_labels.numpy(),
        None if separate else 0,
        query_units=g.numpy(),
    )
    assert result.classes.tolist() == [100, 103, 106]
    np.testing.assert_allclose(result.class_utility.numpy(), expected["curves"], atol=1e-9)
    assert result.opis == pytest.approx(expected["opis"], abs=1e-12)
    assert result.eps_opis == pytest.approx(expected["eps_opis"], abs=1e-12)
    assert result.opis > 0


def test_a_noisier_group_raises_group_opis():
    x, y, g = clustered(per_class=40, seed=4)
    even = opis(x, y, groups=g).opis
    x2, y2, g2 = clustered(per_class=40, seed=4, spread=[1, 1, 1, 3])
    assert opis(x2, y2, groups=g2).opis > 5 * even


def test_group_without_positive_pairs_is_excluded():
    x, y, g = clustered(num_classes=4, per_class=10, seed=5)
    x = torch.cat([x, torch.randn(1, x.shape[1], dtype=x.dtype)])
    y = torch.cat([y, torch.tensor([99])])  # a singleton class ...
    g = torch.cat([g, torch.tensor([7])])  # ... alone in its group
    result = opis(x, y, groups=g)
    expected = naive_opis(cosine(x, x), y.numpy(), y.numpy(), 0, query_units=g.numpy())
    assert result.excluded.tolist() == [False] * 4 + [True]
    assert result.opis == pytest.approx(expected["opis"], abs=1e-12)


# ---------------------------------------------------------------- per-group rates


@pytest.mark.parametrize("target", [{"target_far": 0.02}, {"target_frr": 0.1}])
@pytest.mark.parametrize("large", [4, 10**9])
def test_group_rates_match_naive_reference(target, large):
    x, y, g = clustered(
        num_classes=6, per_class=25, num_groups=5, seed=6, spread=[0.6, 1, 1, 1.5, 2]
    )
    with mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", large):
        report = calibrate_threshold(x, y, groups=g, chunk_size=13, **target)
    rows = naive_rates(cosine(x, x), y.numpy(), y.numpy(), 0, g.numpy(), report.threshold)
    rates = report.groups
    assert rates.groups.tolist() == sorted(rows)
    for i, unit in enumerate(sorted(rows)):
        far, frr, fa, fr, neg, pos = rows[unit]
        assert rates.far[i].item() == pytest.approx(far, abs=1e-15)
        assert rates.frr[i].item() == pytest.approx(frr, abs=1e-15)
        assert (rates.false_accepts[i], rates.false_rejects[i]) == (fa, fr)
        assert (rates.negatives[i], rates.positives[i]) == (neg, pos)
    fars = [rows[u][0] for u in sorted(rows)]
    frrs = [rows[u][1] for u in sorted(rows)]
    assert rates.worst_far_group == sorted(rows)[int(np.argmax(fars))]
    assert rates.worst_far == max(fars) and rates.best_far == min(fars)
    assert rates.far_ratio == pytest.approx(max(fars) / min(fars))
    assert rates.worst_frr == max(frrs) and rates.frr_ratio == pytest.approx(max(frrs) / min(frrs))
    # the class side of the same report is unchanged by groups
    plain = calibrate_threshold(x, y, **target)
    assert plain.threshold == report.threshold
    assert torch.equal(plain.class_far, report.class_far)
    assert "per group FAR: worst" in report.summary()


def test_group_ratio_is_infinite_when_the_best_group_has_no_error():
    # group 0: classes 0 and 1 on orthogonal axes; group 1: classes 2 and 3 nearly alike
    gen = torch.Generator().manual_seed(7)
    centres = torch.eye(4, 8, dtype=torch.float64)
    centres[3] = centres[2] + 0.05 * centres[3]
    y = torch.arange(4).repeat_interleave(20)
    g = (y >= 2).long()
    x = centres[y] + 0.02 * torch.randn(80, 8, generator=gen, dtype=torch.float64)
    report = calibrate_threshold(x, y, groups=g, target_far=0.05)
    assert report.groups.best_far == 0.0 and report.groups.worst_far > 0
    assert report.groups.far_ratio == math.inf


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_with_every_unit_drawn_once_is_the_point_estimate():
    x, y, _ = clustered(num_classes=12, per_class=15, seed=8)
    point = opis(x, y)

    def once(num, replicates, generator):
        return torch.ones(replicates, num, dtype=torch.int64)

    with mock.patch.object(bootstrap, "_draw_counts", once):
        replicated = opis(x, y, bootstrap=3)
    assert replicated.opis_interval == pytest.approx((point.opis,) * 2, rel=1e-9)
    assert replicated.eps_opis_interval == pytest.approx((point.eps_opis,) * 2, rel=1e-9)


def test_bootstrap_replicates_match_a_naive_resample():
    # the algebra of a replicate (pooled curve of the drawn units, weighted means) against
    # a direct recomputation of OPIS on the duplicated classes' counts
    x, y, _ = clustered(num_classes=6, per_class=12, seed=9)
    point = opis(x, y, num_thresholds=50)
    draws = torch.tensor([[0, 0, 3, 4, 4, 5], [1, 2, 2, 2, 5, 5]])
    weights = torch.stack([torch.bincount(d, minlength=6) for d in draws])
    with mock.patch.object(bootstrap, "_draw_counts", lambda n, b, g: weights[:b]):
        values, eps_values = bootstrap.opis_replicates(
            point.state, point.thresholds, beta=1.0, epsilon=0.1, replicates=2, seed=0
        )
    state = point.state
    grid = point.thresholds.numpy()
    for b, drawn in enumerate(draws.tolist()):
        tp = state.positive_histogram[drawn].double().flip(-1).cumsum(-1).flip(-1).numpy()
        fp = state.negative_histogram[drawn].double().flip(-1).cumsum(-1).flip(-1).numpy()
        pos = state.positives[drawn].double().numpy()[:, None]

        def f1(tp, fp, pos):
            den = 2 * tp + (pos - tp) + fp
            return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0)

        curves = f1(tp, fp, pos)
        pooled = f1(tp.sum(0), fp.sum(0), pos.sum())
        width = grid[-1] - grid[0]
        spreads = [np.trapezoid((c - pooled) ** 2, grid) / width for c in curves]
        assert values[b].item() == pytest.approx(np.mean(spreads), rel=1e-9)
        means = [np.trapezoid(c, grid) / width for c in curves]
        order = sorted(range(6), key=lambda i: (means[i], drawn[i]))
        gap = curves[order[:1]].mean(0) - curves[order[1:]].mean(0)
        assert eps_values[b].item() == pytest.approx(np.trapezoid(gap**2, grid) / width, rel=1e-9)


def test_opis_interval_brackets_the_point_is_reproducible_and_shrinks_with_more_classes():
    widths = []
    for num_classes in (10, 80):
        x, y, _ = clustered(num_classes=num_classes, per_class=12, seed=10)
        result = opis(x, y, bootstrap=400, seed=3)
        lo, hi = result.opis_interval
        assert lo <= result.opis <= hi
        lo_eps, hi_eps = result.eps_opis_interval
        assert lo_eps <= result.eps_opis <= hi_eps
        assert result.confidence == 0.95
        widths.append((hi - lo) / result.opis)
        again = opis(x, y, bootstrap=400, seed=3)
        assert again.opis_interval == result.opis_interval
        assert opis(x, y, bootstrap=400, seed=4).opis_interval != result.opis_interval
    assert widths[1] < 0.6 * widths[0]


def test_no_bootstrap_no_intervals():
    x, y, g = clustered(seed=11)
    assert opis(x, y).opis_interval is None
    report = calibrate_threshold(x, y, target_far=0.01, groups=g)
    assert report.far_interval is None and report.groups.far_interval is None


def test_rate_intervals_bracket_the_point_and_agree_with_a_naive_bootstrap():
    x, y, g = clustered(num_classes=10, per_class=40, num_groups=3, seed=12, spread=[0.7, 1, 1.4])
    report = calibrate_threshold(x, y, target_far=0.01, groups=g, bootstrap=2000, seed=1)
    rates = report.groups
    for i in range(3):
        lo, hi = rates.far_interval[i].tolist()
        assert lo <= rates.far[i].item() <= hi
        lo, hi = rates.frr_interval[i].tolist()
        assert lo <= rates.frr[i].item() <= hi
    assert report.far_interval[0] <= report.far <= report.far_interval[1]
    # a naive stratified bootstrap with numpy's own generator: same width within noise
    closeness = cosine(x, x)
    same = (y[:, None] == y[None, :]).numpy()
    np.fill_diagonal(same, False)
    accepted = closeness >= report.threshold
    valid = ~np.eye(len(y), dtype=bool)
    fa = (accepted & ~same & valid).sum(1)
    neg = (~same & valid).sum(1)
    rng = np.random.default_rng(0)
    for i in range(3):
        rows = np.flatnonzero(g.numpy() == i)
        picks = rng.integers(0, len(rows), (2000, len(rows)))
        values = fa[rows][picks].sum(1) / neg[rows][picks].sum(1)
        lo, hi = np.quantile(values, [0.025, 0.975])
        ours = rates.far_interval[i].tolist()
        assert (ours[1] - ours[0]) == pytest.approx(hi - lo, rel=0.15)


def test_rate_intervals_do_not_depend_on_the_order_of_the_queries():
    x, y, g = clustered(num_classes=6, per_class=20, seed=13)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    a = calibrate_threshold(x, y, target_far=0.01, groups=g, bootstrap=300)
    b = calibrate_threshold(x[order], y[order], target_far=0.01, groups=g[order], bootstrap=300)
    assert a.far_interval == b.far_interval
    assert torch.equal(a.groups.frr_interval, b.groups.frr_interval)
    assert torch.equal(a.class_far_interval, b.class_far_interval)


# ---------------------------------------------------------------- the pml side


def test_calculator_groups_give_group_opis_and_refuse_per_class_lists():
    x, y, g = clustered(seed=14)
    calculator = OPISAccuracyCalculator(include=("opis", "eps_opis", "neg_opis"), bootstrap=100)
    metrics = calculator.get_accuracy(x, y, groups=g)
    expected = opis(x, y, groups=g, bootstrap=100)
    assert metrics["opis"] == expected.opis and metrics["neg_opis"] == -expected.opis
    assert metrics["eps_opis"] == expected.eps_opis
    assert calculator.last_result.opis_interval == expected.opis_interval
    assert calculator.get_accuracy(x, y)["opis"] == opis(x, y).opis
    per_class = OPISAccuracyCalculator(include=("opis",), return_per_class=True)
    with pytest.raises(ValueError, match="groups: return_per_class"):
        per_class.get_accuracy(x, y, groups=g)


def test_grouped_tester_passes_the_group_column():
    x, y, g = clustered(seed=15)
    dataset = torch.utils.data.TensorDataset(x.float(), torch.stack([y, g], dim=1))
    calculator = OPISAccuracyCalculator(include=("opis", "precision_at_1"), k="max_bin_count")
    tester = GroupedEmbeddingSpaceTester(
        accuracy_calculator=calculator, dataloader_num_workers=0, batch_size=64
    )
    accuracies = tester.test({"val": dataset}, 0, torch.nn.Identity())
    assert accuracies["val"]["opis_level0"] == pytest.approx(
        opis(x.float(), y, groups=g).opis, rel=1e-6
    )
    plain = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=calculator, dataloader_num_workers=0, batch_size=64
    )
    class_level = plain.test(
        {"val": torch.utils.data.TensorDataset(x.float(), y)}, 0, torch.nn.Identity()
    )
    assert accuracies["val"]["precision_at_1_level0"] == class_level["val"]["precision_at_1_level0"]
    with pytest.raises(ValueError, match="accuracy_calculator"):
        GroupedEmbeddingSpaceTester(accuracy_calculator=None)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "groups, message",
    [
        (torch.zeros(5), "groups has 5 entries"),
        (torch.full((240,), math.nan), "groups contains NaN"),
        (torch.zeros(240), "at least two groups"),
        (torch.zeros(240, 2), "groups must be 1-D"),
        ([0, 1] * 120, "groups must be a torch.Tensor or a NumPy array"),
        (np.array(["north", "south"] * 120), "groups must hold numbers.*return_inverse"),
    ],
)
def test_bad_groups_name_the_argument(groups, message):
    x, y, _ = clustered(seed=16)
    for call in (
        lambda: opis(x, y, groups=groups),
        lambda: calibrate_threshold(x, y, target_far=0.01, groups=groups),
        lambda: OPISAccuracyCalculator(include=("opis",)).get_accuracy(x, y, groups=groups),
    ):
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bootstrap": 1}, "at least 2"),
        ({"bootstrap": -3}, "bootstrap must be a non-negative integer"),
        ({"bootstrap": 2.5}, "bootstrap must be a non-negative integer"),
        ({"bootstrap": True}, "bootstrap must be a non-negative integer"),
        ({"confidence": 1.0}, "confidence must lie in"),
        ({"confidence": 0}, "confidence must lie in"),
        ({"confidence": "high"}, "confidence must be a number"),
        ({"seed": 1.5}, "seed must be an integer"),
    ],
)
def test_bad_bootstrap_settings_name_the_argument(kwargs, message):
    x, y, _ = clustered(seed=17)
    with pytest.raises(ValueError, match=message):
        opis(x, y, **kwargs)
    with pytest.raises(ValueError, match=message):
        calibrate_threshold(x, y, target_far=0.01, **kwargs)
    with pytest.raises(ValueError, match=message):
        OPISAccuracyCalculator(**kwargs)

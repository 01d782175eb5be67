"""OPIS / ε-OPIS against a naive float64 full-matrix reference written in the tests."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pml_tcm.functional import streaming
from pml_tcm.functional.opis import (
    OPISState,
    cosine_similarity_scores,
    opis,
    opis_compute,
    opis_update,
    threshold_grid,
)
from pml_tcm.functional.streaming import PairStream


def euclidean(queries, references):
    # the direct (not matmul-based) distance: each entry is exact whatever the block's
    # shape or row order, so the streamed engine (which sorts the sets by class) and the
    # reference see the same numbers
    return torch.cdist(queries, references, compute_mode="donot_use_mm_for_euclid_dist")


def position_free_products(queries, references, out=None, clamp=True):
    """``queries @ references.T`` clamped to [-1, 1] (left to the caller with
    ``clamp=False``, as ``streaming.unit_products``), each entry a sum over the dimensions
    in one fixed order (a multiply and an add per term, no BLAS): the same value wherever
    the pair lies in a block. A BLAS may round a product by its place in the call (MKL on
    an AMD EPYC: float64 always, float32 with 2 threads), and the engine sorts the sets by
    class, so with it a pair's last bit can differ between the engine and the reference."""
    total = queries[:, None, 0] * references[None, :, 0]
    for k in range(1, queries.shape[1]):
        total = total + queries[:, None, k] * references[None, :, k]
    total = total.clamp_(-1.0, 1.0) if clamp else total
    return total if out is None else out.copy_(total)


def chunked_closeness(score_fn, higher_is_closer, queries, references, chunk_size):
    """The score matrix computed block by block exactly as the streamed code does."""
    blocks = [
        score_fn(queries[s : s + chunk_size], references)
        for s in range(0, queries.shape[0], chunk_size)
    ]
    scores = torch.cat(blocks).double().numpy()
    return scores if higher_is_closer else -scores


@st.composite
def problems(draw):
    num_queries = draw(st.integers(1, 24))
    dim = draw(st.integers(1, 4))
    num_classes = draw(st.integers(1, 6))
    integer_values = draw(st.booleans())  # small integers give many exact ties
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)

    def embeddings(n):
        if integer_values:
            rows = torch.randint(-2, 3, (n, dim), generator=gen).double()
            rows[(rows == 0).all(dim=1), 0] = 1.0  # zero-norm rows are refused
            return rows
        return torch.randn(n, dim, generator=gen, dtype=torch.float64)

    queries = embeddings(num_queries)
    query_labels = torch.randint(0, num_classes, (num_queries,), generator=gen)
    mode = draw(st.sampled_from(["self", "separate", "includes"]))
    if mode == "self":
        references = reference_labels = None
    else:
        extra = draw(st.integers(1 if mode == "separate" else 0, 20))
        more = embeddings(extra)
        more_labels = torch.randint(0, num_classes + 1, (extra,), generator=gen)
        if mode == "separate":
            references, reference_labels = more, more_labels
        else:
            references = torch.cat([queries, more])
            reference_labels = torch.cat([query_labels, more_labels])
    return dict(
        queries=queries,
        query_labels=query_labels,
        references=references,
        reference_labels=reference_labels,
        ref_includes_query=mode == "includes",
        distance=draw(st.sampled_from(["cosine", "euclidean"])),
        chunk_size=draw(st.integers(1, num_queries)),
        explicit=draw(st.booleans()),
        far_range=draw(st.sampled_from([(1e-3, 1e-2), (0.05, 0.3), (0.2, 0.2), (0.5, 1.0)])),
        num_thresholds=draw(st.integers(2, 40)),
        beta=draw(st.sampled_from([0.5, 1.0, 2.0])),
        epsilon=draw(st.sampled_from([0.1, 0.3, 0.5, 0.9])),
        collect_limit=draw(st.sampled_from([1, 3, 50, 1 << 24])),
        retain_limit=draw(st.sampled_from([0, 1 << 24])),
        groups=draw(group_ids(num_queries, gen)),
    )


@st.composite
def group_ids(draw, num_queries, gen):
    """None (rows are classes), a few groups, or one group per query (many unit runs)."""
    kind = draw(st.sampled_from(["none", "none", "few", "each"]))
    if kind == "none" or num_queries < 2:
        return None
    if kind == "each":
        return torch.arange(num_queries).flip(0) * 7
    groups = torch.randint(0, draw(st.integers(2, 4)), (num_queries,), generator=gen)
    groups[:2] = torch.tensor([0, 1])  # at least two groups
    return groups


def check_against_naive(p):
    higher = p["distance"] == "cosine"
    score_fn = cosine_similarity_scores if higher else euclidean
    queries = p["queries"]
    references = p["references"] if p["references"] is not None else queries
    ref_labels = p["reference_labels"] if p["references"] is not None else p["query_labels"]
    self_offset = 0 if (p["references"] is None or p["ref_includes_query"]) else None
    closeness = chunked_closeness(score_fn, higher, queries, references, p["chunk_size"])
    calibration_range = None
    if p["explicit"]:
        lo, hi = sorted(np.quantile(closeness, [0.3, 0.9]).tolist())
        calibration_range = (lo, hi) if higher else (-hi, -lo)
    expected = naive_opis(
        closeness,
        p["query_labels"].numpy(),
        ref_labels.numpy(),
        self_offset,
        calibration_range=None if calibration_range is None else (lo, hi),
        far_range=p["far_range"],
        num_thresholds=p["num_thresholds"],
        beta=p["beta"],
        epsilon=p["epsilon"],
        query_units=None if p.get("groups") is None else p["groups"].numpy(),
    )
    result = opis(
        queries,
        p["query_labels"],
        p["references"],
        p["reference_labels"],
        ref_includes_query=p["ref_includes_query"],
        calibration_range=calibration_range,
        far_range=p["far_range"],
        num_thresholds=p["num_thresholds"],
        beta=p["beta"],
        epsilon=p["epsilon"],
        score_fn=score_fn,
        higher_is_closer=higher,
        chunk_size=p["chunk_size"],
        collect_limit=p["collect_limit"],
        retain_limit=p["retain_limit"],
        groups=p.get("groups"),
    )
    assert result.by == ("class" if p.get("groups") is None else "group")
    expected_range = (expected["lo"], expected["hi"])
    if not higher:
        expected_range = (-expected["hi"], -expected["lo"])
    if calibration_range is None:
        assert result.calibration_range == expected_range  # bit-equal
    else:
        assert result.calibration_range == pytest.approx(expected_range, abs=1e-12)
    curves, pooled = expected["curves"], expected["pooled"]
    if not higher:
        curves, pooled = curves[:, ::-1], pooled[::-1]
    np.testing.assert_allclose(result.class_utility.numpy(), curves, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.pooled_utility.numpy(), pooled, rtol=0, atol=1e-9)
    np.testing.assert_allclose(result.mean_class_utility.numpy(), expected["means"], atol=1e-9)
    assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
    assert result.eps_opis == pytest.approx(expected["eps_opis"], abs=1e-9)
    assert math.isfinite(result.opis) and math.isfinite(result.eps_opis)


# both engines: gathering the pairs above the floor (the CPU's default) and the sync-free
# dense counting (the default off the CPU), forced here on the CPU
ENGINES = pytest.mark.parametrize("sync_free", [False, True], ids=["gather", "sync_free"])


@ENGINES
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_naive_reference(sync_free, p):
    # the cosine entries from position_free_products on both sides: this tests the counting
    # (the BLAS path is compared with the reference on fixed examples below)
    with (
        mock.patch.object(streaming, "SYNC_FREE", sync_free),
        mock.patch.object(streaming, "unit_products", position_free_products),
    ):
        check_against_naive(p)


@ENGINES
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from([1, 2, 4]))
def test_matches_naive_reference_with_large_classes(sync_free, p, large):
    # classes with at least `large` references take the large-class path: their own
    # columns histogrammed in place after the main pass, the others' columns negative-only
    with (
        mock.patch.object(streaming, "LARGE_CLASS_REFERENCES", large),
        mock.patch.object(streaming, "SYNC_FREE", sync_free),
        mock.patch.object(streaming, "unit_products", position_free_products),
    ):
        check_against_naive(p)


@pytest.mark.parametrize("mode", ["self", "separate", "includes"])
def test_both_ways_of_finding_positives_match_naive(mode, monkeypatch):
    # with few classes more pairs share a label than pass the floor, and the positives are
    # looked up among the pairs that pass; with many classes they are gathered by position
    calls = {"_is_positive": 0, "_same_label_positions": 0}
    for name in calls:
        original = getattr(PairStream, name)

        def spy(self, *args, _original=original, _name=name):
            calls[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(PairStream, name, spy)
    gen = torch.Generator().manual_seed(21)
    for classes in (2, 60):
        queries = torch.randn(200, 8, generator=gen)
        labels = torch.randint(0, classes, (200,), generator=gen)
        more = torch.randn(80, 8, generator=gen)
        more_labels = torch.randint(0, classes, (80,), generator=gen)
        references, reference_labels = {
            "self": (None, None),
            "separate": (more, more_labels),
            "includes": (torch.cat([queries, more]), torch.cat([labels, more_labels])),
        }[mode]
        check_against_naive(
            dict(
                queries=queries,
                query_labels=labels,
                references=references,
                reference_labels=reference_labels,
                ref_includes_query=mode == "includes",
                distance="cosine",
                chunk_size=64,
                explicit=False,
                far_range=(1e-3, 1e-2),
                num_thresholds=50,
                beta=1.0,
                epsilon=0.1,
                collect_limit=1 << 24,
                retain_limit=0,
            )
        )
    assert calls["_is_positive"] > 0 and calls["_same_label_positions"] > 0


@ENGINES
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_float32_far_thresholds_bit_equal_with_1000_thresholds(distance, sync_free, monkeypatch):
    monkeypatch.setattr(streaming, "SYNC_FREE", sync_free)
    gen = torch.Generator().manual_seed(3)
    queries = torch.randn(400, 16, generator=gen)
    labels = torch.randint(0, 40, (400,), generator=gen)
    higher = distance == "cosine"
    score_fn = cosine_similarity_scores if higher else euclidean
    closeness = chunked_closeness(score_fn, higher, queries, queries, 64)
    expected = naive_opis(closeness, labels.numpy(), labels.numpy(), 0)
    # a small collect_limit forces the guide + bracket path (and the fallback when missed)
    for collect_limit in (1 << 24, 1000, 10):
        result = opis(
            queries,
            labels,
            score_fn=score_fn,
            higher_is_closer=higher,
            chunk_size=64,
            collect_limit=collect_limit,
        )
        lo, hi = expected["lo"], expected["hi"]
        assert result.calibration_range == ((lo, hi) if higher else (-hi, -lo))
        assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
        assert result.eps_opis == pytest.approx(expected["eps_opis"], abs=1e-9)


def integer_problem(seed=0, n=60):
    # integer embeddings and a plain dot product: every score is exact whatever the chunking
    gen = torch.Generator().manual_seed(seed)
    queries = torch.randint(-3, 4, (n, 5), generator=gen).float()
    labels = torch.randint(0, 7, (n,), generator=gen)
    return queries, labels


def dot(queries, references):
    return queries @ references.T


@pytest.mark.parametrize("explicit", [False, True])
def test_chunk_size_does_not_change_the_result(explicit):
    queries, labels = integer_problem()
    kwargs = dict(score_fn=dot, num_thresholds=100)
    if explicit:
        kwargs["calibration_range"] = (0.5, 9.5)
    results = [opis(queries, labels, chunk_size=c, **kwargs) for c in (1, 7, 60)]
    for other in results[1:]:
        assert other.calibration_range == results[0].calibration_range
        assert other.opis == results[0].opis
        assert other.eps_opis == results[0].eps_opis
        assert torch.equal(other.class_utility, results[0].class_utility)


def test_update_states_add_up_over_query_blocks():
    queries, labels = integer_problem(1)
    classes = torch.unique(labels)
    grid = threshold_grid(-2.0, 8.0, 30)
    whole = opis_update(
        queries, labels, queries, labels, classes, grid, self_offset=0, score_fn=dot
    )
    first = opis_update(
        queries[:25], labels[:25], queries, labels, classes, grid, self_offset=0, score_fn=dot
    )
    second = opis_update(
        queries[25:], labels[25:], queries, labels, classes, grid, self_offset=25, score_fn=dot
    )
    merged = first + second
    for name in ("positive_histogram", "negative_histogram", "positives", "negatives"):
        assert torch.equal(getattr(merged, name), getattr(whole, name))
    assert isinstance(merged, OPISState)
    a = opis_compute(merged, classes, grid)
    b = opis(queries, labels, score_fn=dot, calibration_range=(-2.0, 8.0), num_thresholds=30)
    assert a.opis == b.opis and a.eps_opis == b.eps_opis


def clustered(spreads, per_class=60, dim=32, seed=0):
    # class c sits around the unit vector e_c: every class is as far from the others
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(max(dim, len(spreads)))[: len(spreads)]
    points, labels = [], []
    for c, spread in enumerate(spreads):
        noise = torch.randn(per_class, centres.shape[1], generator=gen)
        points.append(centres[c] + spread * noise)
        labels.append(torch.full((per_class,), c))
    return torch.cat(points), torch.cat(labels)


def test_equally_tight_classes_have_near_zero_opis_and_a_spread_class_raises_it():
    even = opis(*clustered([0.1] * 10))
    uneven = opis(*clustered([0.1] * 9 + [0.3]))
    wider = opis(*clustered([0.1] * 9 + [0.4]))
    assert even.opis < 1e-4 and even.eps_opis < 1e-4
    assert uneven.opis > 100 * even.opis
    assert uneven.eps_opis > 100 * even.eps_opis
    assert wider.opis > uneven.opis and wider.eps_opis > uneven.eps_opis
    # the spread class is the worst one
    assert int(uneven.mean_class_utility.argmin()) == 9


def test_single_class_gives_zero():
    queries = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(20, dtype=torch.int64)
    result = opis(queries, labels)
    assert result.opis == 0.0 and result.eps_opis == 0.0
    assert all(math.isfinite(x) for x in result.calibration_range)
    result = opis(queries, labels, calibration_range=(0.0, 0.5))
    assert result.opis == 0.0 and result.eps_opis == 0.0


def test_single_sample_has_no_pair_and_gives_zero():
    result = opis(torch.ones(1, 3), torch.zeros(1, dtype=torch.int64))
    assert result.opis == 0.0 and result.eps_opis == 0.0
    assert result.calibration_range == (0.0, 0.0)


def test_class_without_positives_is_excluded_and_reported():
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(30, 4, generator=gen)
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 9 + [3])  # 3 is a singleton
    result = opis(queries, labels, num_thresholds=50)
    assert result.excluded.tolist() == [False, False, False, True]
    assert float(result.mean_class_utility[3]) == 0.0
    closeness = chunked_closeness(cosine_similarity_scores, True, queries, queries, 30)
    expected = naive_opis(closeness, labels.numpy(), labels.numpy(), 0, num_thresholds=50)
    assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
    # a query class absent from a separate reference set is excluded the same way
    refs, ref_labels = queries[:20], labels[:20]
    result = opis(queries[20:], labels[20:], refs, ref_labels, num_thresholds=50)
    assert result.excluded.all()
    assert result.opis == 0.0 and result.eps_opis == 0.0


def test_epsilon_split_uses_the_decimal_value():
    # 0.1 * 30 is 3.0000000000000004 in binary; the worst set must hold 3 classes
    queries, labels = clustered([0.1 + 0.02 * i for i in range(30)], per_class=4)
    result = opis(queries, labels, epsilon=0.1, num_thresholds=20)
    means = result.mean_class_utility
    order = torch.sort(means, stable=True).indices
    grid = result.thresholds
    worst = result.class_utility[order[:3]].mean(0)
    rest = result.class_utility[order[3:]].mean(0)
    width = float(grid[-1] - grid[0])
    expected = float(torch.trapezoid((worst - rest) ** 2, grid)) / width
    assert result.eps_opis == pytest.approx(expected, abs=1e-12)


BAD_SETTINGS = [
    (dict(far_range=(0.0, 0.1)), "far_range"),
    (dict(far_range=(0.1, 1.5)), "far_range"),
    (dict(far_range=(0.2, 0.1)), "far_range"),
    (dict(far_range=(float("nan"), 0.1)), "far_range"),
    (dict(calibration_range=(0.5, 0.1)), "calibration_range"),
    (dict(calibration_range=(0.1, float("inf"))), "calibration_range"),
    (dict(num_thresholds=1), "num_thresholds"),
    (dict(num_thresholds=2.5), "num_thresholds"),
    (dict(epsilon=0.0), "epsilon"),
    (dict(epsilon=1.0), "epsilon"),
    (dict(beta=0.0), "beta"),
    (dict(beta=-1.0), "beta"),
    (dict(beta=float("nan")), "beta"),
]


@pytest.mark.parametrize("kwargs,name", BAD_SETTINGS)
def test_bad_settings_name_the_argument(kwargs, name):
    queries, labels = integer_problem()
    with pytest.raises(ValueError, match=name):
        opis(queries, labels, **kwargs)


def test_bad_inputs_name_the_argument():
    queries, labels = integer_problem()
    with pytest.raises(ValueError, match="queries"):
        opis(queries[:0], labels[:0])
    bad = queries.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="queries"):
        opis(bad, labels)
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="references"):
        opis(queries, labels, bad, labels)
    with pytest.raises(ValueError, match="query_labels"):
        opis(queries, labels[:-1])
    with pytest.raises(ValueError, match="reference_labels"):
        opis(queries, labels, queries, labels[:-1])
    with pytest.raises(ValueError, match="reference_labels"):
        opis(queries, labels, queries)
    with pytest.raises(ValueError, match="references"):
        opis(queries, labels, queries[:0], labels[:0])
    with pytest.raises(ValueError, match="embedding size"):
        opis(queries, labels, queries[:, :3], labels)
    # labels of any real dtype are compared by value (one input preparation)
    as_float = opis(queries, labels.float() + 0.5)
    assert as_float.opis == opis(queries, labels).opis
    assert torch.equal(as_float.classes, torch.unique(labels).double() + 0.5)
    with pytest.raises(ValueError, match="ref_includes_query"):
        opis(queries, labels, queries[:10], labels[:10], ref_includes_query=True)


def test_a_bracket_too_full_to_collect_costs_one_more_pass_not_two(monkeypatch):
    # the guide's bracket holds more negatives than collect_limit (as at large N): the
    # first pass also counts them between pivots, so the second pass collects the piece
    # holding the rank (the old search needed a pass to count the pieces, then one more)
    from pml_tcm.functional import far_search

    passes = []
    original = far_search._exact_pass

    def counted(*args, **kwargs):
        passes.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(far_search, "_exact_pass", counted)
    gen = torch.Generator().manual_seed(4)
    queries = torch.randn(400, 16, generator=gen)
    labels = torch.randint(0, 40, (400,), generator=gen)
    closeness = chunked_closeness(cosine_similarity_scores, True, queries, queries, 64)
    expected = naive_opis(closeness, labels.numpy(), labels.numpy(), 0)
    result = opis(queries, labels, chunk_size=64, collect_limit=500, retain_limit=0)
    assert result.calibration_range == (expected["lo"], expected["hi"])
    assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
    assert len(passes) == 2


@pytest.mark.parametrize("classes", [40, 2])  # small classes; large ones (slabs)
def test_a_later_pass_over_retained_pairs_scores_no_block(monkeypatch, classes):
    # the first pass retains every pair >= its floor (retain_limit): a second round of the
    # search whose floor is not lower (the bracket narrowed at pivots, as at N = 100 000)
    # is tallied from them, without scoring the pairs again; the negatives among them are
    # told apart by taking the positive and self pairs' scores out of the bracket's
    from pml_tcm.functional import far_search

    passes, rounds = [], []
    original_pass, original_reduce = far_search._exact_pass, far_search._PassTally.reduce

    def exact_pass(*args, **kwargs):
        passes.append(1)
        return original_pass(*args, **kwargs)

    def reduce(self, *args, **kwargs):
        rounds.append(1)
        return original_reduce(self, *args, **kwargs)

    monkeypatch.setattr(far_search, "_exact_pass", exact_pass)
    monkeypatch.setattr(far_search._PassTally, "reduce", reduce)
    gen = torch.Generator().manual_seed(4)
    queries = torch.randn(600, 16, generator=gen)
    labels = torch.randint(0, classes, (600,), generator=gen)
    queries[1] = queries[0]  # ties between pair kinds (self, positive, negative)
    queries[2] = queries[0]
    labels[2] = (labels[0] + 1) % classes
    with mock.patch.object(streaming, "unit_products", position_free_products):
        closeness = chunked_closeness(cosine_similarity_scores, True, queries, queries, 64)
        expected = naive_opis(closeness, labels.numpy(), labels.numpy(), 0)
        result = opis(queries, labels, chunk_size=64, collect_limit=500, retain_limit=1 << 24)
    assert result.calibration_range == (expected["lo"], expected["hi"])
    assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
    assert len(rounds) == 2  # the bracket was too full to collect in the first round
    assert len(passes) == 1  # the second round scored no pair


def test_multiset_difference_takes_out_one_copy_per_removed_score():
    from collections import Counter

    from pml_tcm.functional.far_search import _without

    gen = torch.Generator().manual_seed(8)
    values = torch.randint(0, 6, (200,), generator=gen).float() / 7  # many equal scores
    removed = values[torch.randperm(200, generator=gen)[:120]]
    expected = Counter(values.tolist()) - Counter(removed.tolist())
    got = _without(values, removed)
    assert Counter(got.tolist()) == expected
    assert torch.equal(got, got.sort().values)
    assert torch.equal(_without(values, values[:0]), values.sort().values)


def test_the_guide_scores_only_its_sample(monkeypatch):
    # the guide's histogram needs about GUIDE_BUDGET negatives: it scores the sampled rows
    # against that many references only (it scored those rows against every reference,
    # N² / 16 scores), every sampled value is a negative pair's score, the positive and
    # self pairs are NaN, and the search stays exact
    from pml_tcm.functional import far_search

    budget = 1 << 12
    monkeypatch.setattr(far_search, "GUIDE_BUDGET", budget)
    scored, samples = [], []
    original_sample = PairStream.negative_sample

    def counted_products(queries, references, out=None, clamp=True):
        scored.append(queries.shape[0] * references.shape[0])
        return position_free_products(queries, references, out=out, clamp=clamp)

    def sample(self, rows, *args, **kwargs):
        scored.clear()
        values = original_sample(self, rows, *args, **kwargs)
        samples.append((rows, values, sum(scored)))
        return values

    monkeypatch.setattr(PairStream, "negative_sample", sample)
    gen = torch.Generator().manual_seed(7)
    queries = torch.randn(2048, 16, generator=gen)
    labels = torch.randint(0, 3, (2048,), generator=gen)
    with mock.patch.object(streaming, "unit_products", counted_products):
        closeness = chunked_closeness(cosine_similarity_scores, True, queries, queries, 256)
        expected = naive_opis(closeness, labels.numpy(), labels.numpy(), 0)
        result = opis(queries, labels, chunk_size=256, collect_limit=1000)
    assert result.calibration_range == (expected["lo"], expected["hi"])
    assert result.opis == pytest.approx(expected["opis"], abs=1e-9)
    ((rows, values, products),) = samples
    assert rows.numel() == 2048 // 16
    assert budget <= values.numel() <= budget + 64 and products == values.numel()
    # the stream holds the rows sorted by label: its rows' scores are the sorted closeness
    order = torch.argsort(labels, stable=True)
    sorted_closeness = torch.as_tensor(closeness)[order][:, order]
    sorted_labels = labels[order]
    row_scores = sorted_closeness[rows]
    negative = sorted_labels[rows][:, None] != sorted_labels[None, :]
    taken = ~torch.isnan(values)
    assert 0.5 < float(taken.float().mean()) < 0.85  # 3 classes: about 2/3 negative
    per_row = values.view(rows.numel() // 64, 64, -1)  # 64 rows share a draw of references
    for group, group_values in enumerate(per_row):
        scores = row_scores[group * 64 : (group + 1) * 64]
        for row in range(64):
            got = group_values[row][~torch.isnan(group_values[row])]
            allowed = scores[row][negative[group * 64 + row]]
            assert torch.isin(got, allowed).all()

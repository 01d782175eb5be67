"""Bounded-memory precision@1 and MAP@R: equal to pml's AccuracyCalculator, to a naive
float64 ranking (ties included), memory budget, bad input, and the report's skip note."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

import pml_tcm.report.compute as embedding_report
from pml_tcm.cli import main
from pml_tcm.functional import streaming
from pml_tcm.functional.retrieval import (
    RETRIEVAL_METRICS,
    SELF_SCORE,
    RetrievalMemoryError,
    _rank_keys,
    retrieval_metrics,
)
from pml_tcm.report import render

CPU = torch.device("cpu")
P1, MAP = RETRIEVAL_METRICS


def clustered(seed, sizes, dim=8, spread=1.5):
    """Rows around one centre per class; ``sizes[c]`` rows of class ``c``, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=gen)]
    centres = torch.randn(len(sizes), dim, generator=gen)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def unit64(x):
    x = x.double()
    return x / x.norm(dim=1, keepdim=True)


def pml_metrics(query, query_labels, reference=None, reference_labels=None, includes=False):
    """pml's own numbers (faiss k-NN on the L2-normalised rows, k = max bin count)."""
    calc = AccuracyCalculator(include=RETRIEVAL_METRICS, k="max_bin_count", device=CPU)
    ref = None if reference is None else unit64(reference).float()
    return calc.get_accuracy(unit64(query).float(), query_labels, ref, reference_labels, includes)


def min_gap(query, reference, self_offset):
    """Smallest difference between two scores of one query row (float64): far above
    float32 rounding, pml's faiss search and our float32 ranking see the same order."""
    scores = unit64(query) @ unit64(reference).T
    if self_offset is not None:
        scores[torch.arange(len(query)), torch.arange(len(query)) + self_offset] = -5
    ordered = scores.sort(dim=1).values
    return float((ordered[:, 1:] - ordered[:, :-1]).min())


def naive(query, query_labels, reference, reference_labels, self_offset):
    """pml's definitions on a float64 ranking written out per query; an irrelevant
    reference with the same score as a relevant one ranks first."""
    scores = (unit64(query) @ unit64(reference).T).tolist()
    hits, precisions = [], []
    for i, row in enumerate(scores):
        candidates = [j for j in range(len(row)) if self_offset is None or j != i + self_offset]
        relevant = {j for j in candidates if reference_labels[j] == query_labels[i]}
        r = len(relevant)
        if r == 0:
            continue
        ranked = sorted(candidates, key=lambda j: (-row[j], j in relevant))[:r]
        found, total = 0, 0.0
        for k, j in enumerate(ranked, start=1):
            if j in relevant:
                found += 1
                total += found / k
        hits.append(float(ranked[0] in relevant))
        precisions.append(total / r)
    if not hits:
        return {P1: math.nan, MAP: math.nan}
    return {P1: sum(hits) / len(hits), MAP: sum(precisions) / len(precisions)}


def assert_same(got, expected, tol=1e-12):
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=tol, nan_ok=True), name


# ----------------------------------------------------------------- against pml's numbers

PML_CASES = {
    # name: (seed, class sizes, reference class sizes or None, extra references with
    # ref_includes_query)
    "balanced": (5, [12, 12, 12, 12], None, 0),
    "two_classes": (1, [30, 25], None, 0),
    "unequal_with_singletons": (2, [20, 9, 3, 1, 1, 6], None, 0),
    "reference_set": (3, [10, 14, 6, 5], [9, 4, 12, 0, 3], 0),
    "reference_includes_queries": (4, [8, 11, 5], None, 15),
}


@pytest.mark.parametrize("name", PML_CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_equals_pml_accuracy_calculator(name, chunk_size):
    seed, sizes, ref_sizes, extra = PML_CASES[name]
    x, y = clustered(seed, sizes)
    if ref_sizes is not None:
        # class 3 has no reference: those queries have no positive and are left out
        ref, ref_y = clustered(seed + 100, ref_sizes)
        assert min_gap(x, ref, None) > 1e-6
        expected = pml_metrics(x, y, ref, ref_y)
        got = retrieval_metrics(x, y, ref, ref_y, chunk_size=chunk_size)
    elif extra:
        more, more_y = clustered(seed + 100, [extra // 3, extra - extra // 3])
        ref, ref_y = torch.cat([x, more]), torch.cat([y, more_y])
        assert min_gap(x, ref, 0) > 1e-6
        expected = pml_metrics(x, y, ref, ref_y, includes=True)
        got = retrieval_metrics(x, y, ref, ref_y, ref_includes_query=True, chunk_size=chunk_size)
    else:
        assert min_gap(x, x, 0) > 1e-6
        expected = pml_metrics(x, y)
        got = retrieval_metrics(x, y, chunk_size=chunk_size)
    assert_same(got, expected)


def test_no_query_with_a_positive_is_nan_like_pml():
    x, y = clustered(5, [1, 1, 1, 1])  # singletons against themselves
    expected = pml_metrics(x, y)
    assert all(math.isnan(v) for v in expected.values())
    assert_same(retrieval_metrics(x, y), expected)
    ref, ref_y = clustered(6, [4, 4])
    assert_same(retrieval_metrics(x, y + 2, ref, ref_y), {P1: math.nan, MAP: math.nan})


# ------------------------------------------------------------ against a naive float64 ranking


@pytest.fixture(params=["topk", "partition"])
def ranking_branch(request, monkeypatch):
    """Both ways of taking a row's R best keys: ``torch.topk`` (R <= TOPK_DEPTH) and
    NumPy's partition and sort."""
    from pml_tcm.functional import retrieval

    monkeypatch.setattr(retrieval, "TOPK_DEPTH", 1 << 30 if request.param == "topk" else 0)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [None, 5, 64])
def test_equals_naive_ranking_on_larger_sets(dtype, chunk_size, ranking_branch):
    x, y = clustered(7, [90, 60, 30, 12, 5, 2, 1], dim=16, spread=2.0)
    ref, ref_y = clustered(8, [50, 0, 40, 10, 3, 1, 9], dim=16, spread=2.0)
    self_expected = naive(x, y.tolist(), x, y.tolist(), 0)
    ref_expected = naive(x, y.tolist(), ref, ref_y.tolist(), None)
    tol = 1e-12 if dtype == torch.float64 else 1e-3  # float32: near-ties may swap
    assert_same(retrieval_metrics(x.to(dtype), y, chunk_size=chunk_size), self_expected, tol)
    got = retrieval_metrics(x.to(dtype), y, ref.to(dtype), ref_y, chunk_size=chunk_size)
    assert_same(got, ref_expected, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_ties_rank_the_irrelevant_reference_first(dtype, ranking_branch):
    # signed axis vectors: every score is exactly -1, 0 or 1, so most scores tie
    gen = torch.Generator().manual_seed(9)
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    x = axes[torch.randint(0, 6, (70,), generator=gen)] * 3.0
    y = torch.randint(0, 4, (70,), generator=gen)
    ref = axes[torch.randint(0, 6, (40,), generator=gen)]
    ref_y = torch.randint(0, 4, (40,), generator=gen)
    for chunk_size in (None, 3):
        got = retrieval_metrics(x.to(dtype), y, chunk_size=chunk_size)
        assert_same(got, naive(x, y.tolist(), x, y.tolist(), 0))
        got = retrieval_metrics(x.to(dtype), y, ref.to(dtype), ref_y, chunk_size=chunk_size)
        assert_same(got, naive(x, y.tolist(), ref, ref_y.tolist(), None))


@pytest.mark.parametrize(
    "to_labels",
    [
        lambda y: y + 2**62,  # distinct int64 labels that share one float32 value
        lambda y: torch.from_numpy(y.numpy().astype(np.uint64) + np.uint64(2**63)),
        lambda y: y * 0.5 - 0.25,  # non-integral floats
        lambda y: torch.stack([y % 2, y // 2], dim=1),  # label rows
    ],
)
def test_labels_of_any_dtype_compare_by_value(to_labels):
    x, y = clustered(14, [20, 15, 10, 5])
    ref, ref_y = clustered(15, [10, 10, 5, 5])
    assert_same(retrieval_metrics(x, to_labels(y)), naive(x, y.tolist(), x, y.tolist(), 0))
    got = retrieval_metrics(x, to_labels(y), ref, to_labels(ref_y))
    assert_same(got, naive(x, y.tolist(), ref, ref_y.tolist(), None))


def test_scale_and_grad_do_not_matter():
    x, y = clustered(10, [20, 15, 10])
    expected = naive(x, y.tolist(), x, y.tolist(), 0)
    assert_same(retrieval_metrics(x.double() * 1e200, y), expected)
    assert_same(retrieval_metrics(x.double().requires_grad_(), y), expected)


# ------------------------------------------------------------------------------ memory


def test_memory_budget_picks_chunks_or_refuses():
    x, y = clustered(11, [200, 100])
    expected = naive(x, y.tolist(), x, y.tolist(), 0)
    # 300 references: a float32 score row is 1200 bytes; one worker ranks with an integer
    # copy of the row, the relevance mask and about 21 bytes per rank (R up to 199)
    budget = functools.partial(retrieval_metrics, x, y, num_workers=1)
    assert_same(budget(max_bytes=40_000), expected, 1e-3)  # a few rows per chunk
    with pytest.raises(RetrievalMemoryError, match="over the budget"):
        budget(max_bytes=4000)
    # precision@1 alone ranks one key per query: it fits where MAP@R does not
    assert_same(budget(include=(P1,), max_bytes=4000), {P1: expected[P1]}, 1e-3)
    with pytest.raises(RetrievalMemoryError):
        budget(include=(P1,), max_bytes=2000)


def test_report_skips_what_does_not_fit_with_one_line(monkeypatch, tmp_path, capsys):
    x, y = clustered(12, [200, 100])
    embeddings, labels = x.numpy(), y.numpy().astype(np.int64)
    full = embedding_report.compute_report(embeddings, labels)
    assert full.notes == []
    assert_same(
        {k: full.metrics[k] for k in RETRIEVAL_METRICS},
        pml_metrics(x, y),
        1e-3,  # float32 near-ties
    )
    np.save(tmp_path / "emb.npy", embeddings)
    np.save(tmp_path / "labels.npy", labels)
    # the rows withheld from the OPIS pass's ranking: ranked by the budgeted pass (as on the
    # sync-free engine)
    monkeypatch.setattr(streaming.PairStream, "hand_over_rows", lambda *args: None)
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 50)
    for budget, skipped in ((4000, [MAP]), (2000, [P1, MAP])):
        small = functools.partial(
            embedding_report.retrieval_sums_of_sets, max_bytes=budget, num_workers=1
        )
        monkeypatch.setattr(embedding_report, "retrieval_sums_of_sets", small)
        report = embedding_report.compute_report(embeddings, labels)
        assert [k for k in RETRIEVAL_METRICS if math.isnan(report.metrics[k])] == skipped
        assert len(report.notes) == 1 and "skipped" in report.notes[0]
        assert "\n" not in report.notes[0]
        assert report.notes[0] in render.text(report, 3)
        assert report.metrics["opis"] == full.metrics["opis"]
        if skipped == [MAP]:
            assert report.metrics[P1] == full.metrics[P1]
        # the CLI's files carry the note; report.json has null for the skipped metrics
        out = tmp_path / f"out{budget}"
        assert (
            main(
                [
                    "report",
                    str(tmp_path / "emb.npy"),
                    str(tmp_path / "labels.npy"),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        assert report.notes[0] in capsys.readouterr().out
        assert f"- {report.notes[0]}" in (out / "report.md").read_text()
        document = json.loads((out / "report.json").read_text())
        assert document["notes"] == report.notes
        assert [k for k in RETRIEVAL_METRICS if document["metrics"][k] is None] == skipped


def test_rank_keys_sort_like_the_scores_descending():
    special = [0.0, -0.0, 1.0, -1.0, 1e-30, -1e-30, 0.5, -0.5, SELF_SCORE, 1.0 + 2**-20]
    for dtype in (np.float32, np.float64):
        scores = np.concatenate([special, np.random.default_rng(13).uniform(-1, 1, 200)]).astype(
            dtype
        )
        keys = _rank_keys(scores.copy()[None])[0]
        assert keys.dtype.itemsize == scores.dtype.itemsize and (keys & 1 == 1).all()
        # a < b as keys exactly when a > b as scores (0.0 == -0.0)
        assert np.array_equal(keys[:, None] < keys[None, :], scores[:, None] > scores[None, :])
        assert np.array_equal(keys[:, None] == keys[None, :], scores[:, None] == scores[None, :])


def naive_rows(scores, labels, positives, ref_labels):
    """Hits at 1 and summed AP@R of score rows, row by row in float64 (``R`` given per
    row, rows with ``R = 0`` skipped; irrelevant references first among equal scores)."""
    hits, total = 0, 0.0
    for row, label, r in zip(scores.tolist(), labels.tolist(), positives.tolist()):
        if r == 0:
            continue
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], ref_labels[j] == label))[:r]
        found = 0
        for k, j in enumerate(ranked, start=1):
            if ref_labels[j] == label:
                found += 1
                total += found / k / r
        hits += int(ref_labels[ranked[0]] == label)
    return hits, total


def recording_map(seen, function, items):
    """``map``, appending the items handed to it to ``seen`` (the ranker's tasks)."""
    items = list(items)
    seen.extend(items)
    return map(function, items)


@pytest.mark.parametrize("group", [1, 3, 8, 1000])
def test_row_ranker_ranks_rows_of_several_labels_in_one_task_as_alone(group, ranking_branch):
    from pml_tcm.functional.retrieval import RowRanker

    rng = np.random.default_rng(21)
    ref_labels = rng.integers(0, 12, 300)
    # rows sorted by label: pairs, singletons, one large class, and rows without a positive
    labels = np.sort(np.concatenate([np.arange(12).repeat(2), np.full(9, 3), [20, 20, 21]]))
    sizes = np.bincount(ref_labels, minlength=22)
    positives = sizes[labels]
    positives[labels == 5] = 1  # R = 1 rows (the min way), beside others of larger R
    scores = rng.choice(np.linspace(-1, 1, 41), size=(labels.size, 300)).astype(np.float32)
    expected = naive_rows(scores, labels, positives, ref_labels.tolist())
    ranker = RowRanker(ref_labels, int(positives.max()), group)
    tasks = []
    counting_map = functools.partial(recording_map, tasks)

    sums = ranker.rank(scores.copy(), labels, positives, counting_map)
    assert sums.queries == int(np.count_nonzero(positives))
    assert sums.hits == expected[0]
    assert sums.precision == pytest.approx(expected[1], rel=1e-12)
    # labels of few rows share a task up to `group` rows (before: one task a label)
    assert all(len(task[0]) <= group for task in tasks)
    ranked_labels = len(np.unique(labels[positives > 0]))
    if group == 1000 and ranking_branch == "topk":
        assert len(tasks) == 1 < ranked_labels


def test_pairs_of_labels_need_few_ranking_tasks():
    from pml_tcm.functional.retrieval import RowRanker

    labels = np.arange(100).repeat(2)  # 100 labels of two rows: R = 1 each
    scores = np.random.default_rng(3).uniform(-1, 1, (200, 200)).astype(np.float32)
    tasks = []
    counting_map = functools.partial(recording_map, tasks)

    ranker = RowRanker(labels, 1, 26)
    sums = ranker.rank(scores.copy(), labels, np.ones(200, dtype=np.int64), counting_map)
    assert len(tasks) <= 200 // 26 + 1
    expected = naive_rows(scores, labels, np.ones(200, dtype=np.int64), labels.tolist())
    assert (sums.hits, sums.precision) == (expected[0], pytest.approx(expected[1]))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"include": ("recall",)}, "include"),
        ({"include": ()}, "include"),
        ({"include": "precision_at_1"}, "include"),
        ({"max_bytes": 0}, "max_bytes"),
        ({"max_bytes": 2.5}, "max_bytes"),
        ({"max_bytes": True}, "max_bytes"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_workers": 0}, "num_workers"),
        ({"ref_labels": torch.zeros(30, dtype=torch.long)}, "ref_labels"),
        ({"ref_emb": torch.randn(30, 5), "ref_labels": torch.zeros(30).long()}, "embedding size"),
        ({"ref_emb": torch.randn(30, 4), "ref_labels": torch.zeros(29).long()}, "ref_labels"),
        (
            {
                "ref_emb": torch.randn(40, 4),
                "ref_labels": torch.zeros(40).long(),
                "ref_includes_query": True,
            },
            "ref_includes_query",
        ),
        (
            {
                "ref_emb": torch.randn(30, 4),
                "ref_labels": torch.zeros(30).long(),
                "ref_includes_query": 1,
            },
            "ref_includes_query",
        ),
    ],
)
def test_bad_settings_name_the_argument(kwargs, phrase):
    x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    with pytest.raises(ValueError, match=phrase):
        retrieval_metrics(x, y, **kwargs)


@pytest.mark.parametrize(
    "query, labels, phrase",
    [
        (torch.randn(30), torch.zeros(30).long(), "2-D"),
        (torch.randn(0, 4), torch.zeros(0).long(), "empty"),
        (torch.randn(30, 4), torch.full((30,), float("nan")), "NaN"),
        (torch.randn(30, 4), torch.zeros(30, dtype=torch.complex64), "real"),
        (torch.randn(30, 4), torch.zeros(29).long(), "query_labels"),
        (torch.full((30, 4), float("nan")), torch.zeros(30).long(), "NaN"),
        (torch.zeros(30, 4), torch.zeros(30).long(), "zero-norm"),
    ],
)
def test_bad_sets_name_the_argument(query, labels, phrase):
    with pytest.raises(ValueError, match=phrase):
        retrieval_metrics(query, labels)


def test_sets_are_prepared_as_for_opis():
    # one preparation for every evaluation entry point: NumPy, integers and half precision
    # scored in float32, inputs that require grad evaluated without it
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (40, 4), generator=gen)
    x[(x == 0).all(dim=1), 0] = 1
    y = torch.randint(0, 4, (40,), generator=gen)
    expected = retrieval_metrics(x.float(), y)
    assert retrieval_metrics(x, y) == expected
    assert retrieval_metrics(x.numpy(), y.numpy()) == expected
    assert retrieval_metrics(x.half(), y) == expected
    assert retrieval_metrics(x.float().requires_grad_(), y) == expected


@pytest.mark.parametrize(
    "irrelevant_ranks",
    [[], [1], [40], [1, 2, 3], [40, 39], [1, 20, 21, 40], list(range(1, 41)), [2, 5, 9, 17, 33]],
)
def test_average_precision_from_where_the_irrelevant_rank(irrelevant_ranks, ranking_branch):
    # R = 40 references of the query's label among 80; the irrelevant ones put at the given
    # ranks (1-based) among the 40 best, the relevant ones they push out ranked below
    from pml_tcm.functional.retrieval import RowRanker

    r, size = 40, 80
    ref_labels = np.array([0] * r + [1] * (size - r))
    order = np.empty(size, dtype=np.int64)  # order[k]: the reference at rank k + 1
    irrelevant = iter(range(r, size))
    relevant = iter(range(r))
    for k in range(size):
        order[k] = next(irrelevant) if k + 1 in irrelevant_ranks else next(relevant, -1)
        if order[k] == -1:
            order[k] = next(irrelevant)
    scores = np.empty((2, size), dtype=np.float32)
    scores[0, order] = np.linspace(0.9, -0.9, size)
    scores[1] = scores[0, ::-1]  # a second row: the reverse order
    labels = np.zeros(2, dtype=np.int64)
    positives = np.full(2, r)
    expected = naive_rows(scores, labels, positives, ref_labels.tolist())

    sums = RowRanker(ref_labels, r, 2).rank(scores.copy(), labels, positives)
    assert sums.hits == expected[0]
    assert sums.precision == pytest.approx(expected[1], rel=1e-12)
    # each row with its own R (the way of rows of several labels), one of them shorter
    from pml_tcm.functional.retrieval import _rank, harmonic_numbers

    own = np.array([r, r - 10])
    expected = naive_rows(scores, labels, own, ref_labels.tolist())
    relevant = np.tile(ref_labels == 0, (2, 1))
    hits, precision = _rank(scores.copy(), relevant, own, harmonic_numbers(r))
    assert hits == expected[0] and precision == pytest.approx(expected[1], rel=1e-12)

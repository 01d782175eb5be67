"""The report's R@1 and MAP@R: every query is ranked where the OPIS pass scores its whole
row (a small class's chunk in the main pass, a large class's with its positive slab),
from the pairs above the pass's floor alone when they number at least its R; rows it did
not rank (the sync-free engine's: all) take a ranking pass of their own; the numbers
equal a naive float64 ranking and pml's own."""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from pml_tcm.functional import opis, retrieval, streaming
from pml_tcm.functional.retrieval import RETRIEVAL_METRICS
from pml_tcm.report import compute
from pml_tcm.report.compute import compute_report

P1, MAP = RETRIEVAL_METRICS


def clustered(seed: int, sizes: list[int], dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    labels = labels[torch.randperm(len(labels), generator=gen)]
    centres = torch.randn(len(sizes), dim, generator=gen)
    rows = centres[labels] + 1.5 * torch.randn(len(labels), dim, generator=gen)
    return rows.numpy(), labels.numpy()


def naive_retrieval(queries, query_labels, references=None, reference_labels=None):
    """pml's precision@1 and MAP@R by a full float64 sort of every query's references
    (its own copy left out when the references are the queries)."""
    same = references is None
    references = queries if same else references
    reference_labels = query_labels if same else reference_labels
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    r = references / np.linalg.norm(references, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ r.astype(np.float64).T
    hits, precisions = [], []
    for i in range(len(q)):
        keep = np.arange(len(r)) != i if same else np.ones(len(r), dtype=bool)
        relevant = (reference_labels == query_labels[i])[keep]
        big_r = int(relevant.sum())
        if big_r == 0:
            continue  # pml leaves the query out
        ranked = relevant[np.argsort(-scores[i][keep], kind="stable")][:big_r]
        precision_at_k = np.cumsum(ranked) / np.arange(1, big_r + 1)
        hits.append(float(ranked[0]))
        precisions.append(float((precision_at_k * ranked).sum() / big_r))
    return {P1: float(np.mean(hits)), MAP: float(np.mean(precisions))}


def spy_on_ranking_pass(monkeypatch) -> list[int]:
    """The rows scored by the separate ranking pass (retrieval's own products)."""
    scored: list[int] = []
    original = retrieval._scores

    def spy(queries, refs, chunk, buffer):
        scored.extend(chunk.tolist())
        return original(queries, refs, chunk, buffer)

    monkeypatch.setattr(retrieval, "_scores", spy)
    return scored


def test_small_classes_are_ranked_in_the_pass_without_a_ranking_pass(monkeypatch):
    x, y = clustered(0, [7] * 40)  # every class small: each row scored whole in the pass
    scored = spy_on_ranking_pass(monkeypatch)
    report = compute_report(x, y, bootstrap=0)
    assert scored == []  # (the old report ranked every query in a second pass)
    expected = naive_retrieval(x, y)
    assert report.metrics[P1] == pytest.approx(expected[P1], abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(expected[MAP], abs=1e-12)


def test_large_classes_are_ranked_where_their_slab_is_counted(monkeypatch):
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 30)
    x, y = clustered(1, [45, 60, 5, 8, 3, 12, 9, 1])  # two large, six small (one singleton)
    scored = spy_on_ranking_pass(monkeypatch)
    report = compute_report(x, y, bootstrap=0)
    assert scored == []  # the large classes' chunks are scored whole with their slab
    expected = naive_retrieval(x, y)
    assert report.metrics[P1] == pytest.approx(expected[P1], abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(expected[MAP], abs=1e-12)
    # the slabs counted as column ranges of those whole rows: the OPIS of functional.opis
    # (a score's last bit may differ between the two products: see docs/concepts.md)
    plain = opis(torch.from_numpy(x), torch.from_numpy(y))
    assert report.metrics["opis"] == pytest.approx(plain.opis, rel=1e-3)
    assert report.metrics["eps_opis"] == pytest.approx(plain.eps_opis, rel=1e-3)


def test_rows_the_pass_did_not_rank_take_the_ranking_pass(monkeypatch):
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 30)
    # the large classes' whole rows withheld from the ranking: ranked by the pass after
    monkeypatch.setattr(streaming.PairStream, "hand_over_rows", lambda *args: None)
    x, y = clustered(1, [45, 60, 5, 8, 3, 12, 9, 1])
    scored = spy_on_ranking_pass(monkeypatch)
    report = compute_report(x, y, bootstrap=0)
    # the report's rows are its own, in class order: the large classes' rows are 0..104
    assert sorted(scored) == list(range(45 + 60))
    expected = naive_retrieval(x, y)
    assert report.metrics[P1] == pytest.approx(expected[P1], abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(expected[MAP], abs=1e-12)


def test_the_sync_free_engine_ranks_every_row_in_the_ranking_pass(monkeypatch):
    monkeypatch.setattr(streaming, "SYNC_FREE", True)  # the device engine, here on the CPU
    x, y = clustered(5, [7] * 20 + [40])
    scored = spy_on_ranking_pass(monkeypatch)
    report = compute_report(x, y, bootstrap=0)
    assert sorted(scored) == list(range(len(y)))
    expected = naive_retrieval(x, y)
    assert report.metrics[P1] == pytest.approx(expected[P1], abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(expected[MAP], abs=1e-12)


def test_separate_references_and_pml_agree(monkeypatch):
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 40)
    x, y = clustered(2, [30, 8, 8, 6, 8])
    ref, ref_y = clustered(3, [50, 9, 7, 10, 4, 6])  # class 5: no query; classes 0: large
    report = compute_report(x, y, ref, ref_y, bootstrap=0)
    expected = naive_retrieval(x, y, ref, ref_y)
    assert report.metrics[P1] == pytest.approx(expected[P1], abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(expected[MAP], abs=1e-12)
    calculator = AccuracyCalculator(include=RETRIEVAL_METRICS, k="max_bin_count")
    unit = lambda a: torch.nn.functional.normalize(torch.from_numpy(a), dim=1)  # noqa: E731
    pml = calculator.get_accuracy(unit(x), torch.from_numpy(y), unit(ref), torch.from_numpy(ref_y))
    assert report.metrics[P1] == pytest.approx(pml[P1], abs=1e-6)
    assert report.metrics[MAP] == pytest.approx(pml[MAP], abs=1e-6)


def test_when_the_rest_does_not_fit_map_at_r_is_skipped_for_all(monkeypatch):
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 30)
    monkeypatch.setattr(streaming.PairStream, "hand_over_rows", lambda *args: None)
    x, y = clustered(4, [40, 6, 6, 6])
    # a budget that holds the large class's R@1 ranking but not its MAP@R
    small = functools.partial(compute.retrieval_sums_of_sets, max_bytes=1000, num_workers=1)
    monkeypatch.setattr(compute, "retrieval_sums_of_sets", small)
    report = compute_report(x, y, bootstrap=0)
    assert np.isnan(report.metrics[MAP])
    assert len(report.notes) == 1 and "MAP@R skipped" in report.notes[0]
    # R@1 still covers every query: those ranked in the pass and the rest
    assert report.metrics[P1] == pytest.approx(naive_retrieval(x, y)[P1], abs=1e-12)


@contextlib.contextmanager
def threads(count):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tie_aware_naive(scores, relevant, depths):
    """Hits at 1 and summed AP@R of score rows (float64, row by row); among equal scores
    the irrelevant reference ranks first."""
    hits, total = 0, 0.0
    for row, rel, r in zip(scores.tolist(), relevant.tolist(), depths.tolist()):
        if r == 0:
            continue
        ranked = sorted(range(len(row)), key=lambda j: (-row[j], rel[j]))[:r]
        found = 0
        for k, j in enumerate(ranked, start=1):
            found += rel[j]
            total += rel[j] * found / k / r
        hits += rel[ranked[0]]
    return hits, total


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("only_the_best", [False, True])  # R = 1 everywhere: no sort
def test_ragged_rows_rank_as_a_naive_sort(dtype, only_the_best):
    rng = np.random.default_rng(8)
    sizes = np.array([5, 0, 1, 12, 7, 30])  # scores per row (row 1 has none)
    depths = np.array([1, 0, 1, 1, 1, 1]) if only_the_best else np.array([3, 0, 1, 12, 2, 9])
    rows = np.repeat(np.arange(sizes.size), sizes)
    scores = rng.choice(np.linspace(-1, 1, 9), size=rows.size).astype(dtype)  # many ties
    relevant = rng.random(rows.size) < 0.5
    dense = np.full((sizes.size, sizes.max()), -np.inf)
    dense_relevant = np.zeros(dense.shape, dtype=bool)
    for i in range(sizes.size):
        dense[i, : sizes[i]] = scores[rows == i]
        dense_relevant[i, : sizes[i]] = relevant[rows == i]
    harmonic = retrieval.harmonic_numbers(int(depths.max()))
    hits, precision = retrieval._rank_ragged(
        scores.copy(), rows, relevant, depths, sizes.size, harmonic
    )
    expected = tie_aware_naive(dense, dense_relevant, depths)
    assert hits == expected[0]
    assert precision == pytest.approx(expected[1], rel=1e-12)


@pytest.mark.parametrize("part", [retrieval.RAGGED_PART, 16])  # one worker, or parts
def test_rows_with_enough_pairs_above_the_floor_are_ranked_from_them(monkeypatch, part):
    monkeypatch.setattr(retrieval, "RAGGED_PART", part)
    # tight classes (their R best score above the pass's floor) and one wide class (its
    # rows' R best reach below it: ranked from the whole row); ties: test above
    gen = np.random.default_rng(11)
    tight, tight_y = clustered(6, [8] * 30)
    x = np.concatenate([tight, gen.standard_normal((50, 8)).astype(np.float32)])
    y = np.concatenate([tight_y, np.full(50, 30)])
    whole_rows: list[int] = []
    original = retrieval.RowRanker.rank

    def spy(self, scores, labels, positives, map_tasks=map):
        whole_rows.extend(labels.tolist())
        return original(self, scores, labels, positives, map_tasks)

    monkeypatch.setattr(retrieval.RowRanker, "rank", spy)
    # a guide and a floor at this size (by default so few negatives are all collected)
    small = functools.partial(compute.evaluate_sets, collect_limit=64)
    monkeypatch.setattr(compute, "evaluate_sets", small)
    with threads(2):
        report = compute_report(x, y, bootstrap=0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit.astype(np.float64) @ unit.astype(np.float64).T
    np.fill_diagonal(scores, -np.inf)  # the self pair ranks last (R < M - 1)
    relevant = y[:, None] == y[None, :]
    np.fill_diagonal(relevant, False)
    depths = relevant.sum(axis=1)
    hits, total = tie_aware_naive(scores, relevant, depths)
    counted = int(np.count_nonzero(depths))
    assert report.metrics[P1] == pytest.approx(hits / counted, abs=1e-12)
    assert report.metrics[MAP] == pytest.approx(total / counted, abs=1e-12)
    # the whole-row ranking saw the wide class's rows, not every row (before: all)
    assert whole_rows.count(30) == 50 and len(whole_rows) < len(y) - 50

"""Sharded OPIS over 2 gloo processes equals one process."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.distances import DotProductSimilarity

from pml_tcm.accuracy import OPISAccuracyCalculator
from pml_tcm.functional.opis import opis

WORLD = 2


def _problem():
    # integer embeddings + a plain dot product: scores are exact under any chunking
    gen = torch.Generator().manual_seed(5)
    queries = torch.randint(-3, 4, (90, 6), generator=gen).float()
    labels = torch.randint(0, 9, (90,), generator=gen)
    labels[labels == 8] = 7  # rank 1 only may hold some classes; fine either way
    return queries, labels


def _settings():
    return [
        dict(),
        dict(collect_limit=5, retain_limit=0),  # guide, fallback pivots, gathered candidates
        dict(calibration_range=(1.0, 12.0), num_thresholds=50),
    ]


def _summary(result):
    return (
        result.calibration_range,
        result.opis,
        result.eps_opis,
        result.class_utility.clone(),
        result.classes.clone(),
    )


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, labels = _problem()
    bounds = [0, 37, 90]  # uneven shards
    start, end = bounds[rank], bounds[rank + 1]
    out = []
    for kwargs in _settings():
        result = opis(
            queries[start:end],
            labels[start:end],
            queries,
            labels,
            ref_includes_query=True,
            query_offset=start,
            score_fn=lambda q, r: q @ r.T,
            chunk_size=7,
            distributed=True,
            **kwargs,
        )
        out.append(_summary(result))
    calculator = OPISAccuracyCalculator(
        include=("opis", "eps_opis"),
        distance=DotProductSimilarity(normalize_embeddings=False),
        device=torch.device("cpu"),
    )
    out.append(calculator.get_accuracy(queries, labels))
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    queries, labels = _problem()
    expected = [
        _summary(opis(queries, labels, score_fn=lambda q, r: q @ r.T, **kwargs))
        for kwargs in _settings()
    ]
    calculator = OPISAccuracyCalculator(
        include=("opis", "eps_opis"),
        distance=DotProductSimilarity(normalize_embeddings=False),
        device=torch.device("cpu"),
        shard_queries=False,
    )
    expected_metrics = calculator.get_accuracy(queries, labels)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for mine, theirs in zip(got[:-1], expected):
            assert mine[:3] == theirs[:3]
            assert torch.equal(mine[3], theirs[3])
            assert torch.equal(mine[4], theirs[4])
        assert got[-1] == expected_metrics


def _calibration_worker(rank, init_file, out_dir):
    from pml_tcm import calibrate_threshold

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    queries, labels = _problem()
    distance = DotProductSimilarity(normalize_embeddings=False)
    reports = [
        calibrate_threshold(
            queries, labels, target_far=0.05, distance=distance, chunk_size=7, shard_queries=True
        ),
        calibrate_threshold(
            queries, labels, target_frr=0.2, distance=distance, chunk_size=7, shard_queries="auto"
        ),
    ]
    torch.save(reports, f"{out_dir}/calibration{rank}.pt")
    dist.destroy_process_group()


def test_sharded_calibration_equals_one_process(tmp_path):
    from pml_tcm import calibrate_threshold

    mp.spawn(
        _calibration_worker,
        args=(str(tmp_path / "init"), str(tmp_path)),
        nprocs=WORLD,
        join=True,
    )
    queries, labels = _problem()
    distance = DotProductSimilarity(normalize_embeddings=False)
    expected = [
        calibrate_threshold(queries, labels, target_far=0.05, distance=distance),
        calibrate_threshold(queries, labels, target_frr=0.2, distance=distance),
    ]
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"calibration{rank}.pt", weights_only=False)
        for mine, theirs in zip(got, expected, strict=True):
            assert (mine.threshold, mine.far, mine.frr) == (
                theirs.threshold,
                theirs.far,
                theirs.frr,
            )
            assert torch.equal(mine.class_far, theirs.class_far)
            assert torch.equal(mine.class_frr, theirs.class_frr)
            assert torch.equal(mine.classes, theirs.classes)


def test_shard_queries_true_needs_a_process_group():
    import pytest

    from pml_tcm import calibrate_threshold

    queries, labels = _problem()
    with pytest.raises(ValueError, match="shard_queries"):
        calibrate_threshold(queries, labels, target_far=0.1, shard_queries=True)
    with pytest.raises(ValueError, match="shard_queries"):
        calibrate_threshold(queries, labels, target_far=0.1, shard_queries="yes")

"""Evaluation under a live torch.distributed group (gloo, 2 and 3 processes).

Distribution is opt-in: by default each rank evaluates exactly what it is given, also
while a group exists; ``shard_queries=True`` splits one set over the ranks and equals one
process; ranks that disagree get a clear error on every rank instead of a mix or a hang.
"""

from __future__ import annotations

import datetime
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pml_tcm import OPISAccuracyCalculator, calibrate_threshold


def _rank_data(rank: int, size: int = 60):
    gen = torch.Generator().manual_seed(100 + rank)
    embeddings = torch.randn(size + 7 * rank, 8, generator=gen)
    labels = torch.randint(0, 6, (size + 7 * rank,), generator=gen)
    return embeddings, labels


def _shared_data():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(101, 8, generator=gen), torch.randint(0, 7, (101,), generator=gen)


def _summary(metrics: dict, report) -> dict:
    return {
        "opis": metrics["opis"],
        "eps_opis": metrics["eps_opis"],
        "p1": metrics["precision_at_1"],
        "threshold": report.threshold,
        "far": report.far,
    }


def _single(embeddings, labels, **kwargs) -> dict:
    calculator = OPISAccuracyCalculator(include=("opis", "eps_opis", "precision_at_1"), **kwargs)
    metrics = calculator.get_accuracy(embeddings, labels)
    shard = kwargs.get("shard_queries", False)
    report = calibrate_threshold(embeddings, labels, target_far=0.05, shard_queries=shard)
    return _summary(metrics, report)


def _shared_groups():
    return torch.randint(0, 4, (101,), generator=torch.Generator().manual_seed(8)) * 10


def _grouped(embeddings, labels, groups, **kwargs) -> dict:
    """Group OPIS (calculator) and per-group rates (calibration), with intervals."""
    calculator = OPISAccuracyCalculator(include=("opis", "eps_opis"), bootstrap=200, **kwargs)
    metrics = calculator.get_accuracy(embeddings, labels, groups=groups)
    result = calculator.last_result
    shard = kwargs.get("shard_queries", False)
    report = calibrate_threshold(
        embeddings, labels, target_far=0.05, shard_queries=shard, groups=groups, bootstrap=200
    )
    rates = report.groups
    return {
        "opis": metrics["opis"],
        "eps_opis": metrics["eps_opis"],
        "opis_interval": list(result.opis_interval),
        "eps_opis_interval": list(result.eps_opis_interval),
        "threshold": report.threshold,
        "group_far": rates.far.tolist(),
        "group_frr": rates.frr.tolist(),
        "group_far_interval": rates.far_interval.tolist(),
        "group_frr_interval": rates.frr_interval.tolist(),
        "far_interval": list(report.far_interval),
        "frr_interval": list(report.frr_interval),
    }


def _worker(rank: int, world: int, init_file: str, out_dir: str, scenario: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=20),
    )
    torch.set_num_threads(1)
    out: dict = {}
    try:
        if scenario == "own_shard":  # the default: each rank its own validation data
            out = _single(*_rank_data(rank))
        elif scenario == "rank0_only":  # rank 0 evaluates, the others wait at a barrier
            if rank == 0:
                out = _single(*_rank_data(0))
            dist.barrier()
        elif scenario == "sharded":  # one set, split over the ranks
            out = _single(*_shared_data(), shard_queries=True)
        elif scenario == "sharded_groups":
            out = _grouped(*_shared_data(), _shared_groups(), shard_queries=True)
        elif scenario == "mismatch":  # sharding asked for, but each rank has other data
            try:
                _single(*_rank_data(rank), shard_queries=True)
                out = {"error": None}
            except ValueError as error:
                out = {"error": str(error)}
    finally:
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as handle:
            json.dump(out, handle)
        dist.destroy_process_group()


def _run(scenario: str, world: int, tmp_path) -> list[dict]:
    init_file = tmp_path / "init"
    mp.spawn(_worker, args=(world, str(init_file), str(tmp_path), scenario), nprocs=world)
    return [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_its_own_value_by_default(world, tmp_path):
    results = _run("own_shard", world, tmp_path)
    for rank, got in enumerate(results):
        assert got == _single(*_rank_data(rank))
    assert len({r["opis"] for r in results}) == world  # not one blended value


def test_rank_zero_alone_with_a_live_group(tmp_path):
    results = _run("rank0_only", 2, tmp_path)
    assert results[0] == _single(*_rank_data(0))
    assert results[1] == {}


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process_on_uneven_shards(world, tmp_path):
    results = _run("sharded", world, tmp_path)  # 101 queries: uneven shards
    expected = _single(*_shared_data())
    for got in results:
        assert got["opis"] == pytest.approx(expected["opis"], rel=1e-12, abs=1e-15)
        assert got["eps_opis"] == pytest.approx(expected["eps_opis"], rel=1e-12, abs=1e-15)
        assert got["threshold"] == expected["threshold"]
        assert got["far"] == expected["far"]


def test_ranks_that_disagree_all_get_an_error(tmp_path):
    results = _run("mismatch", 2, tmp_path)
    for got in results:
        assert got["error"] is not None and "shard_queries" in got["error"]


def test_sharded_groups_equal_one_process(tmp_path):
    results = _run("sharded_groups", 2, tmp_path)
    expected = _grouped(*_shared_data(), _shared_groups())
    for got in results:
        assert got["threshold"] == expected["threshold"]
        for key in ("group_far", "group_frr", "group_far_interval", "group_frr_interval"):
            assert got[key] == expected[key], key
        for key in ("far_interval", "frr_interval"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12), key
        for key in ("opis", "eps_opis"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-15), key
        for key in ("opis_interval", "eps_opis_interval"):
            assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-15), key

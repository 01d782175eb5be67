"""Query sharding over ``torch.distributed`` ranks (opt-in), shared by
OPISAccuracyCalculator and calibrate_threshold."""

from __future__ import annotations

import hashlib

import torch


def check_shard_queries(shard_queries: bool | str) -> None:
    """``shard_queries`` is ``True``, ``False`` or ``"auto"``."""
    if shard_queries not in (True, False, "auto"):
        raise ValueError(f"shard_queries must be True, False or 'auto', got {shard_queries!r}")


def query_shard(
    num_queries: int, shard_queries: bool | str, settings: tuple = ()
) -> tuple[int, int, bool]:
    """This rank's contiguous share ``[start, end)`` of the queries, and whether to sum
    counts over ranks.

    ``False`` never shards (the whole set, no communication); ``True`` requires an
    initialised group; ``"auto"`` shards when one with several ranks is initialised.
    Before sharding, the ranks agree: one all-gather of the number of queries and a
    digest of ``settings``; any difference is a ``ValueError`` on every rank (never a
    mix of different data, never a hang in a later collective of mismatched sizes).

    Raises:
        ValueError: ``shard_queries=True`` without an initialised process group, or
            ranks that disagree.
    """
    if shard_queries is False:
        return 0, num_queries, False
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if shard_queries is True and not initialised:
        raise ValueError("shard_queries=True needs an initialised torch.distributed group")
    if not initialised or torch.distributed.get_world_size() < 2:
        return 0, num_queries, False
    _agree(num_queries, settings)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return num_queries * rank // world, num_queries * (rank + 1) // world, True


def data_fingerprint(*tensors: torch.Tensor) -> tuple:
    """A cheap digest of the data every rank must hold alike (shapes and float64 sums)."""
    return tuple((tuple(t.shape), float(t.double().sum())) for t in tensors)


def _agree(num_queries: int, settings: tuple) -> None:
    """Every rank evaluates the same number of queries with the same settings."""
    import torch.distributed as dist

    digest = hashlib.sha256(repr(settings).encode()).digest()[:7]
    mine = torch.tensor([num_queries, int.from_bytes(digest, "little")], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    sizes = [int(t[0]) for t in everyone]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"shard_queries: the ranks hold different numbers of queries {sizes}; sharding "
            "splits one set that every rank holds whole (to evaluate each rank's own data, "
            "use shard_queries=False)"
        )
    if len({int(t[1]) for t in everyone}) > 1:
        raise ValueError(
            "shard_queries: the ranks evaluate different data or settings; sharding needs "
            "every rank to call with the same sets (to evaluate each rank's own data, use "
            "shard_queries=False)"
        )

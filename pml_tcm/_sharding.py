"""Query sharding over ``torch.distributed`` ranks, shared by OPISAccuracyCalculator and
calibrate_threshold."""

from __future__ import annotations

import torch


def check_shard_queries(shard_queries: bool | str) -> None:
    """``shard_queries`` is ``True``, ``False`` or ``"auto"``."""
    if shard_queries not in (True, False, "auto"):
        raise ValueError(f"shard_queries must be True, False or 'auto', got {shard_queries!r}")


def query_shard(num_queries: int, shard_queries: bool | str) -> tuple[int, int, bool]:
    """This rank's contiguous share ``[start, end)`` of the queries, and whether to sum
    counts over ranks.

    ``"auto"`` shards when a process group with several ranks is initialised, ``True``
    requires one, ``False`` never shards (the whole set, no communication).

    Raises:
        ValueError: ``shard_queries=True`` without an initialised process group.
    """
    if shard_queries is False:
        return 0, num_queries, False
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if shard_queries is True and not initialised:
        raise ValueError("shard_queries=True needs an initialised torch.distributed group")
    if not initialised or torch.distributed.get_world_size() < 2:
        return 0, num_queries, False
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    return num_queries * rank // world, num_queries * (rank + 1) // world, True

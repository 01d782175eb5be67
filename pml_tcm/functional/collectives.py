"""The ``torch.distributed`` collectives of the streamed OPIS and calibration code.

With ``distributed=True`` each rank passes its own query shard (and its offset in the
reference set when the reference includes the queries) and the full reference set; all
counts, brackets, pivot histograms and candidate values are combined with these
collectives, so every rank returns the result of one process. With
``distributed=False`` each of them returns its input untouched (no communication).
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_reduce(tensor: Tensor, *, distributed: bool, op: str = "sum") -> Tensor:
    """Reduce ``tensor`` over all ranks in place (``op``: ``"sum"``, ``"min"``, ``"max"``)."""
    if distributed:
        import torch.distributed as dist

        reduce_op = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=reduce_op[op])
    return tensor


def all_gather_values(values: Tensor, *, distributed: bool) -> Tensor:
    """Concatenate a 1-D tensor of any length over all ranks."""
    if not distributed:
        return values
    import torch.distributed as dist

    world = dist.get_world_size()
    length = torch.tensor([values.shape[0]], dtype=torch.int64, device=values.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = max(int(x) for x in lengths)
    padded = values.new_zeros(longest)
    padded[: values.shape[0]] = values
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(n)] for g, n in zip(gathered, lengths)])


def global_classes(query_labels: Tensor, *, distributed: bool) -> Tensor:
    """Sorted distinct query labels, over all ranks when ``distributed``."""
    return torch.unique(all_gather_values(torch.unique(query_labels), distributed=distributed))

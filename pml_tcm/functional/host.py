"""NumPy kernels for CPU tensors, spread over torch's number of threads.

On the CPU, the streamed pass's per-score steps are short loops over cache-sized tiles.
torch runs each as a parallel region of its own (and ``bincount`` serially); NumPy's loops
over the same tiles, one tile per worker thread (NumPy releases the GIL in them), did the
same work in about half the time here (2-core Xeon: the compare and ``nonzero`` of a
score block 0.6 vs 1.2 ns per score, the grid histogram 4 vs 9 ns per value). Same
operations, same results; the device paths keep torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

FILTER_TILE = 1 << 18
"""Scores compared at a time by one worker of :func:`positions_at_or_above`."""
HISTOGRAM_TILE = 1 << 16
"""Values bucketed at a time by one worker of :func:`bucket_histogram` (its int64 buckets
stay in a core's L2)."""

_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child inherits the pools but not their threads: work sent there would wait forever
os.register_at_fork(after_in_child=_POOLS.clear)
T = TypeVar("T")


def _map(work: Callable[[int], T], starts: range) -> Iterable[T]:
    """``work`` of each start, in order, on up to ``torch.get_num_threads()`` threads."""
    workers = min(torch.get_num_threads(), len(starts))
    if workers <= 1:
        return map(work, starts)
    if workers not in _POOLS:  # made on first use and kept
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="pml-tcm")
    return _POOLS[workers].map(work, starts)


def positions_at_or_above(block: Tensor, floor: float) -> Tensor:
    """Row-major positions of the entries of ``block`` (CPU, float32/float64, any shape,
    contiguous) that are ``>= floor`` (compared in the block's dtype; NaN never passes),
    ascending. ``(K,)`` int64."""
    data = block.reshape(-1).numpy()
    limit = data.dtype.type(floor)

    def find(start: int) -> np.ndarray:
        hits = np.flatnonzero(data[start : start + FILTER_TILE] >= limit)
        hits += start
        return hits

    parts = list(_map(find, range(0, data.shape[0], FILTER_TILE)))
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def bucket_histogram(values: Tensor, next_edges: Tensor, scale: float, shift: Tensor) -> Tensor:
    """How many ``values`` fall in each of ``G + 1`` buckets: the estimate
    ``⌊v · scale + shift⌋`` clamped to ``[0, G]``, moved up by one where ``v`` reaches
    ``next_edges`` at it (see ``counting._GridCounter.bucket_histogram``, whose exactness
    argument this relies on). ``values``: ``(n,)`` CPU float32/float64; ``next_edges``:
    ``(G + 1,)`` the same dtype. ``(G + 1,)`` int64."""
    data = values.contiguous().numpy()
    edges = next_edges.numpy()
    size = edges.shape[0] - 1
    step, offset = data.dtype.type(scale), data.dtype.type(float(shift))

    def count(start: int) -> np.ndarray:
        tile = data[start : start + HISTOGRAM_TILE]
        estimate = tile * step
        estimate += offset
        np.clip(estimate, 0, size, out=estimate)
        buckets = estimate.astype(np.int64)
        buckets += tile >= edges.take(buckets)
        return np.bincount(buckets, minlength=size + 1)

    total = np.zeros(size + 1, dtype=np.int64)
    for part in _map(count, range(0, data.shape[0], HISTOGRAM_TILE)):
        total += part
    return torch.from_numpy(total)

"""NumPy kernels for CPU tensors, spread over torch's number of threads.

On the CPU, the streamed pass's per-score steps are short loops over cache-sized tiles.
torch runs each as a parallel region of its own (and ``bincount`` serially); NumPy's loops
over the same tiles, one tile per worker thread (NumPy releases the GIL in them), did the
same work in about half the time here (2-core Xeon: the compare and ``nonzero`` of a
score block 0.6 vs 1.2 ns per score, the grid histogram 4 vs 9 ns per value). Same
operations, same results; the device paths keep torch.

The histogram counts with torch's ``bincount``, which releases the GIL (NumPy's holds it:
with it two threads were hardly faster than one); the tiles are large (each NumPy call
takes the GIL once) and each worker writes into scratch arrays of its own, kept between
calls. 2-core EPYC, 2 threads, histogram of 2^23 values: 3.1 ns a value as before, 2.5
with 2^18 tiles, 1.65 adding torch's ``bincount``, 1.3-1.5 adding the scratch arrays (1
thread: 2.3); the filter 0.6 -> 0.27-0.4 ns a score.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

FILTER_TILE = 1 << 20
"""Scores compared at a time by one worker of :func:`positions_at_or_above`."""
HISTOGRAM_TILE = 1 << 18
"""Values bucketed at a time by one worker of :func:`bucket_histogram` (fewer, larger
tiles: each NumPy call takes the GIL once)."""

_POOLS: dict[int, ThreadPoolExecutor] = {}
# a forked child inherits the pools but not their threads: work sent there would wait forever
os.register_at_fork(after_in_child=_POOLS.clear)
S = TypeVar("S")
T = TypeVar("T")
_SCRATCH = threading.local()


def _scratch(name: str, size: int, dtype: type) -> np.ndarray:
    """This thread's scratch array ``name`` of at least ``size`` elements of ``dtype``
    (kept between calls; its first ``size`` elements are returned)."""
    kept = getattr(_SCRATCH, name, None)
    if kept is None or kept.shape[0] < size or kept.dtype != dtype:
        kept = np.empty(size, dtype=dtype)
        setattr(_SCRATCH, name, kept)
    return kept[:size]


def map_on_threads(work: Callable[[S], T], items: Sequence[S]) -> Iterable[T]:
    """``work`` of each item, in order, on up to ``torch.get_num_threads()`` threads (a
    pool made on first use and kept)."""
    workers = min(torch.get_num_threads(), len(items))
    if workers <= 1:
        return map(work, items)
    if workers not in _POOLS:  # made on first use and kept
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="pml-tcm")
    return _POOLS[workers].map(work, items)


def positions_at_or_above(block: Tensor, floor: float, clamp: bool = False) -> Tensor:
    """Row-major positions of the entries of ``block`` (CPU, float32/float64, any shape,
    contiguous) that are ``>= floor`` (compared in the block's dtype; NaN never passes),
    ascending. ``(K,)`` int64. ``clamp``: the positions where ``block`` clamped to
    ``[-1, 1]`` is ``>= floor`` (``block`` is left as it is)."""
    data = block.reshape(-1).numpy()
    limit = data.dtype.type(floor)
    if clamp and limit <= -1.0:
        limit = data.dtype.type(-math.inf)  # every clamped score passes (NaN still fails)
    elif clamp and limit > 1.0:
        limit = data.dtype.type(math.nan)  # none does
    # (otherwise, for -1 < limit <= 1, clamping moves no score across the limit)

    def find(start: int) -> np.ndarray:
        tile = data[start : start + FILTER_TILE]
        size = tile.shape[0]
        passed = _scratch("passed", -(-size // 8) * 8, np.bool_)
        np.greater_equal(tile, limit, out=passed[:size])
        passed[size:] = False
        # nonzero over the mask read as 64-bit words, then over the few words with a hit
        # (NumPy's nonzero over the bytes costs 3x the compare, over the words more)
        words = passed.view(np.uint64)
        nonzero_words = _scratch("words", words.shape[0], np.bool_)
        np.not_equal(words, 0, out=nonzero_words)
        hit_words = np.flatnonzero(nonzero_words)
        if 4 * hit_words.size > words.shape[0]:  # dense: the words would not pay
            hits = np.flatnonzero(passed)
        else:
            within = np.flatnonzero(words[hit_words].view(np.bool_))
            hits = hit_words[within >> 3]
            hits <<= 3
            hits += within & 7
        hits += start
        return hits

    parts = list(map_on_threads(find, range(0, data.shape[0], FILTER_TILE)))
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])


def row_counts_at_or_above(block: Tensor, floor: float) -> Tensor:
    """How many entries of each row of ``block`` (CPU ``(rows, width)`` float32/float64,
    rows may be strided) are ``>= floor`` (compared in the block's dtype; NaN never
    passes). ``(rows,)`` int64."""
    if block.stride(-1) != 1:
        block = block.contiguous()
    data = block.numpy()
    limit = data.dtype.type(floor)
    rows = max(1, FILTER_TILE // max(1, data.shape[1]))

    def count(start: int) -> np.ndarray:
        tile = data[start : start + rows]
        passed = _scratch("passed", tile.size, np.bool_).reshape(tile.shape)
        np.greater_equal(tile, limit, out=passed)
        return np.count_nonzero(passed, axis=1)

    parts = list(map_on_threads(count, range(0, data.shape[0], rows)))
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64, copy=False))


def _tile_buckets(
    tile: np.ndarray, edges: np.ndarray, step: np.floating, offset: np.floating, out: np.ndarray
) -> np.ndarray:
    """Into ``out`` (int32 or int64, ``tile``'s shape): the estimate ``⌊v · step + offset⌋``
    clamped to ``[0, G]``, moved up by one where ``v`` reaches ``edges`` (the next edges,
    ``(G + 1,)``) at it. Scratch arrays of this thread hold the float temporaries."""
    size = edges.shape[0] - 1
    estimate = _scratch("estimate", tile.size, tile.dtype).reshape(tile.shape)
    above = _scratch("above", tile.size, np.bool_).reshape(tile.shape)
    np.multiply(tile, step, out=estimate)
    estimate += offset
    np.clip(estimate, 0, size, out=estimate)
    np.copyto(out, estimate, casting="unsafe")  # truncates: the estimates are >= 0
    # the next edge of each estimate (torch's gather takes int32 places as they are, where
    # NumPy's take converts them to int64 first; all are in [0, size])
    torch.index_select(
        torch.from_numpy(edges),
        0,
        torch.from_numpy(out.reshape(-1)),
        out=torch.from_numpy(estimate.reshape(-1)),
    )
    np.greater_equal(tile, estimate, out=above)
    out += above
    return out


def buckets(values: Tensor, next_edges: Tensor, scale: float, shift: Tensor) -> Tensor:
    """The bucket of each of ``values`` (1-D CPU float32/float64, never NaN), as
    :func:`bucket_histogram` finds it: ``(n,)`` int64 in ``[0, G]``."""
    data = values.contiguous().numpy()
    edges = next_edges.numpy()
    step, offset = data.dtype.type(scale), data.dtype.type(float(shift))
    out = np.empty(data.shape[0], dtype=np.int64)

    def place(start: int) -> None:
        end = start + HISTOGRAM_TILE
        _tile_buckets(data[start:end], edges, step, offset, out[start:end])

    for _ in map_on_threads(place, range(0, data.shape[0], HISTOGRAM_TILE)):
        pass
    return torch.from_numpy(out)


def _between_grid(tile: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int, int]:
    """``(values, below, above)``: the values of ``tile`` (1-D) between the first grid
    point and the last (a scratch copy), with how many lie below the first (bucket 0)
    and at or above the last (bucket ``G``), when at most half lie between; else
    ``(tile, 0, 0)``. With few classes most positive pairs lie on either side of the
    range: those need only be counted (bucketing takes seven passes over the values and a
    ``bincount``, which is slowest where many values share a bucket)."""
    size = edges.shape[0] - 1
    inside = _scratch("inside", tile.size, np.bool_)
    top = _scratch("top", tile.size, np.bool_)
    np.greater_equal(tile, edges[0], out=inside)
    np.greater_equal(tile, edges[size - 1], out=top)
    above = int(np.count_nonzero(top))
    np.greater(inside, top, out=inside)  # at or above the first point, below the last
    between = int(np.count_nonzero(inside))
    if 2 * between > tile.size:
        return tile, 0, 0
    # (flatnonzero and take: NumPy's compress holds the GIL longer, two threads hardly help)
    values = np.take(tile, np.flatnonzero(inside), out=_scratch("between", between, tile.dtype))
    return values, tile.size - between - above, above  # (NaN, never given, counts below)


def bucket_histogram(values: Tensor, next_edges: Tensor, scale: float, shift: Tensor) -> Tensor:
    """How many ``values`` fall in each of ``G + 1`` buckets: the estimate
    ``⌊v · scale + shift⌋`` clamped to ``[0, G]``, moved up by one where ``v`` reaches
    ``next_edges`` at it (see ``counting._GridCounter.bucket_histogram``, whose exactness
    argument this relies on). ``values``: ``(n,)`` or ``(rows, width)`` CPU
    float32/float64 (rows may be strided: a column range of a block); ``next_edges``:
    ``(G + 1,)`` the same dtype. ``(G + 1,)`` int64."""
    if values.dim() != 2 or values.is_contiguous() or values.stride(1) != 1:
        values = values.contiguous().view(1, -1)
    data = values.numpy()
    edges = next_edges.numpy()
    size = edges.shape[0] - 1
    step, offset = data.dtype.type(scale), data.dtype.type(float(shift))
    width = max(1, data.shape[1])
    # tiles of about HISTOGRAM_TILE values: pieces of one row, or whole rows
    row_step = max(1, HISTOGRAM_TILE // width)
    column_step = HISTOGRAM_TILE if row_step == 1 else width
    tiles = [
        (row, column)
        for row in range(0, data.shape[0], row_step)
        for column in range(0, data.shape[1], column_step)
    ]

    def count(corner: tuple[int, int]) -> Tensor:
        row, column = corner
        tile = data[row : row + row_step, column : column + column_step]
        below = above = 0
        if size >= 2 and tile.flags.c_contiguous:
            tile, below, above = _between_grid(tile.reshape(-1), edges)
        out = _scratch("buckets", tile.size, np.int32).reshape(tile.shape)
        _tile_buckets(tile, edges, step, offset, out)
        histogram = torch.bincount(torch.from_numpy(out.reshape(-1)), minlength=size + 1)
        histogram[0] += below
        histogram[size] += above
        return histogram

    total = torch.zeros(size + 1, dtype=torch.int64)
    for part in map_on_threads(count, tiles):
        total += part
    return total

"""The NumPy kernels of the CPU pass (``pml_tcm.functional.host``) against naive torch
references: the positions of the scores at or above a floor, the grid histogram and the
buckets with their exact edges; and a pool that survives ``fork``."""

from __future__ import annotations

import math
import multiprocessing
import sys

import pytest
import torch

from pml_tcm.functional import host
from pml_tcm.functional.counting import ceil_grid


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (3, 7), (37, host.FILTER_TILE // 16 + 3)])
@pytest.mark.parametrize("odd_tiles", [False, True])  # tiles of a size not a multiple of 8
def test_positions_at_or_above_are_the_naive_nonzero(dtype, shape, odd_tiles, monkeypatch):
    if odd_tiles:
        monkeypatch.setattr(host, "FILTER_TILE", 61 if shape[0] * shape[1] < 10**4 else 8189)
    gen = torch.Generator().manual_seed(sum(shape))
    block = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    if block.numel() > 4:
        flat = block.view(-1)
        flat[0], flat[1], flat[2], flat[3] = math.nan, math.inf, -math.inf, 0.75
        flat[-1] = 0.9995  # a hit in the last score of the last (partial) word
    # sparse (the 64-bit word path), dense (every score: the byte path) and none
    for floor in (0.75, 0.999, 0.9995, -math.inf, 2.0):
        expected = (block >= floor).reshape(-1).nonzero().squeeze(1)
        with _threads(2):
            assert torch.equal(host.positions_at_or_above(block, floor), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_positions_with_clamp_are_those_of_the_clamped_block(dtype, monkeypatch):
    monkeypatch.setattr(host, "FILTER_TILE", 64)  # many tiles
    gen = torch.Generator().manual_seed(3)
    block = (torch.rand(20, 33, generator=gen, dtype=torch.float64) * 2.2 - 1.1).to(dtype)
    block[0, :4] = torch.tensor([1.0, 1.0000001, -1.0000001, math.nan], dtype=torch.float64).to(
        dtype
    )
    for floor in (1.0, 1.00000005, 1.5, 0.3, -1.0, -1.00000005, -1.5, -math.inf):
        clamped = block.clamp(-1.0, 1.0)
        expected = (clamped >= floor).reshape(-1).nonzero().squeeze(1)
        work = block.clone()
        with _threads(2):
            assert torch.equal(host.positions_at_or_above(work, floor, clamp=True), expected)
        assert torch.allclose(work, block, rtol=0, atol=0, equal_nan=True)  # left as it is


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [5, 64, 1 << 20])  # a row per tile, some rows, all rows
def test_row_counts_at_or_above_are_the_naive_row_sums(dtype, tile, monkeypatch):
    monkeypatch.setattr(host, "FILTER_TILE", tile)
    gen = torch.Generator().manual_seed(7)
    block = torch.rand(19, 40, generator=gen, dtype=torch.float64).to(dtype)
    block[0, :4] = torch.tensor([math.nan, math.inf, -math.inf, 0.5], dtype=dtype)
    for view in (block, block[:, 6:33], block[:0], block[:, :0]):  # strided and empty too
        for floor in (0.5, 0.0, 2.0, -math.inf):
            expected = (view.to(torch.float64) >= floor).sum(dim=1)
            with _threads(2):
                assert torch.equal(host.row_counts_at_or_above(view, floor), expected)


def test_positions_use_every_thread_and_keep_the_order(monkeypatch):
    monkeypatch.setattr(host, "FILTER_TILE", 64)  # many tiles over the pool's threads
    gen = torch.Generator().manual_seed(1)
    block = torch.rand(50, 101, generator=gen)
    expected = (block >= 0.5).reshape(-1).nonzero().squeeze(1)
    with _threads(2):
        assert torch.equal(host.positions_at_or_above(block, 0.5), expected)


def _naive_histogram(values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bucket k: exactly k grid points <= value (float64 comparisons of the values with
    the grid rounded up to their dtype), by brute force."""
    edges = ceil_grid(grid, values.dtype).to(torch.float64)
    below = (values.to(torch.float64)[:, None] >= edges[None, :]).sum(1)
    return torch.bincount(below, minlength=grid.shape[0] + 1)


def _host_histogram(values: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """``host.bucket_histogram`` on the grid whose rounded-up points are ``edges``, with
    the estimate's scale and shift as the grid counter sets them."""
    lo_edge, hi_edge = float(edges[0]), float(edges[-1])
    scale = (edges.numel() - 1) / (hi_edge - lo_edge)
    shift = torch.tensor(0.75 - lo_edge * scale, dtype=edges.dtype)
    next_edges = torch.cat([edges, torch.tensor([math.nan], dtype=edges.dtype)])
    return host.bucket_histogram(values, next_edges, scale, shift)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bucket_histogram_counts_exactly_at_the_edges(dtype, monkeypatch):
    monkeypatch.setattr(host, "HISTOGRAM_TILE", 1000)
    lo, hi, size = 0.2, 0.28, 101
    grid = torch.linspace(lo, hi, size, dtype=torch.float64)
    edges = ceil_grid(grid, dtype)
    gen = torch.Generator().manual_seed(2)
    just_below = torch.nextafter(edges, torch.full_like(edges, -math.inf))
    values = torch.cat(
        [
            torch.rand(5000, generator=gen, dtype=torch.float64).to(dtype) * 0.2 + 0.15,
            edges,  # on a grid point: counted with it
            just_below,  # one step below: not
            torch.tensor([-1.0, 1.0, lo, hi], dtype=dtype),
        ]
    )
    with _threads(2):
        counted = _host_histogram(values, edges)
    assert torch.equal(counted, _naive_histogram(values, grid))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("inside", [0.0, 0.1, 0.5, 0.9])  # share of values inside the grid
def test_bucket_histogram_buckets_only_the_values_inside_the_grid(dtype, inside, monkeypatch):
    # with few classes most positive pairs lie below or above the range: those are only
    # counted (below the first grid point: bucket 0; from the last one: bucket G), the
    # values between are bucketed; a tile mostly inside is bucketed whole; exact either way
    monkeypatch.setattr(host, "HISTOGRAM_TILE", 4096)
    lo, hi, size = 0.2, 0.3, 201
    grid = torch.linspace(lo, hi, size, dtype=torch.float64)
    edges = ceil_grid(grid, dtype)
    gen = torch.Generator().manual_seed(3)
    count = 40_000
    between = torch.rand(count, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    outside = torch.rand(count, generator=gen, dtype=torch.float64) * 1.4 - 0.4
    outside = torch.where(outside >= lo, outside + (hi - lo), outside)  # [-0.4, 0.2) ∪ [0.3, 1.1)
    picked = torch.rand(count, generator=gen) < inside
    values = torch.where(picked, between, outside.clamp(max=1.0)).to(dtype)
    down = torch.full_like(edges, -math.inf)
    values[:8] = torch.tensor([-1.0, 1.0, -math.inf, math.inf, lo, hi, -0.0, 0.0], dtype=dtype)
    values[8 : 8 + size] = edges  # on a grid point: counted with it (the first and last too)
    values[8 + size : 8 + 2 * size] = torch.nextafter(edges, down)  # one step below: not
    bucketed = []
    tile_buckets = host._tile_buckets

    def counted(tile, *args):
        bucketed.append(tile.size)
        return tile_buckets(tile, *args)

    monkeypatch.setattr(host, "_tile_buckets", counted)
    with _threads(2):
        histogram = _host_histogram(values, edges)
    assert torch.equal(histogram, _naive_histogram(values, grid))
    within = int(((values >= edges[0]) & (values < edges[-1])).sum())
    if inside <= 0.1:
        assert sum(bucketed) == within
    elif inside == 0.9:
        assert sum(bucketed) == values.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [7, 40, 1 << 18])  # pieces of a row, rows, one tile
def test_bucket_histogram_of_a_column_range_of_a_block(dtype, tile, monkeypatch):
    # a large class's slab counted as a column range of whole rows: strided rows
    monkeypatch.setattr(host, "HISTOGRAM_TILE", tile)
    lo, hi, size = 0.3, 0.7, 57
    grid = torch.linspace(lo, hi, size, dtype=torch.float64)
    edges = ceil_grid(grid, dtype)
    gen = torch.Generator().manual_seed(5)
    block = torch.rand(23, 31, generator=gen, dtype=torch.float64).to(dtype)
    block[3, 12:20] = edges[:8]  # on grid points: counted with them
    columns = block[:, 9:26]
    assert not columns.is_contiguous()
    with _threads(2):
        counted = _host_histogram(columns, edges)
    assert torch.equal(counted, _naive_histogram(columns.reshape(-1), grid))
    assert counted.sum() == columns.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile", [13, 1 << 18])  # many tiles over the threads, one tile
def test_buckets_are_the_naive_count_of_grid_points_at_or_below(dtype, tile, monkeypatch):
    # the gathered pairs' buckets (the grid counter's keys), edges included
    monkeypatch.setattr(host, "HISTOGRAM_TILE", tile)
    lo, hi, size = -0.1, 0.4, 77
    grid = torch.linspace(lo, hi, size, dtype=torch.float64)
    edges = ceil_grid(grid, dtype)
    gen = torch.Generator().manual_seed(11)
    values = torch.cat(
        [
            torch.rand(3000, generator=gen, dtype=torch.float64).to(dtype) * 0.8 - 0.2,
            edges,
            torch.nextafter(edges, torch.full_like(edges, -math.inf)),
            torch.tensor([-1.0, 1.0, math.inf, -math.inf], dtype=dtype),
        ]
    )
    values = values[torch.randperm(values.numel(), generator=gen)]
    scale = (size - 1) / (float(edges[-1]) - float(edges[0]))
    shift = torch.tensor(0.75 - float(edges[0]) * scale, dtype=dtype)
    next_edges = torch.cat([edges, torch.tensor([math.nan], dtype=dtype)])
    expected = (values.to(torch.float64)[:, None] >= edges.to(torch.float64)[None, :]).sum(1)
    with _threads(2):
        assert torch.equal(host.buckets(values, next_edges, scale, shift), expected)


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
def test_a_forked_child_gets_a_working_pool(monkeypatch):
    monkeypatch.setattr(host, "FILTER_TILE", 256)  # several tiles: the pool is used
    with _threads(2):
        host.positions_at_or_above(torch.rand(64, 64), 0.5)  # the parent's pool exists
        context = multiprocessing.get_context("fork")
        with context.Pool(1) as pool:
            result = pool.apply_async(_count_in_child)
            assert result.get(timeout=30) == int((torch.arange(4096.0) >= 100).sum())


def _count_in_child() -> int:
    torch.set_num_threads(2)  # (a forked child may start with one)
    block = torch.arange(4096.0).view(64, 64)
    return int(host.positions_at_or_above(block, 100.0).numel())


class _threads:
    def __init__(self, count: int) -> None:
        self.count = count

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.count)

    def __exit__(self, *_: object) -> None:
        torch.set_num_threads(self.before)

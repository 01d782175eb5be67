"""DistributedLossWrapper / DistributedMinerWrapper over 2 gloo processes."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import distributed as pml_dist

WORLD = 2
LOCAL = 12
MARGINS = dict(pos_margin=0.4, neg_margin=0.1)


def _global_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * LOCAL, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (WORLD * LOCAL,), generator=gen)
    return x, y


def _gathered_order(rank, t):
    # pml's all_gather puts this rank's rows first, then the others in rank order.
    chunks = list(t.split(LOCAL))
    return torch.cat([chunks[rank]] + [c for r, c in enumerate(chunks) if r != rank])


def _worker(rank, init_file):
    sys.path.insert(0, os.path.dirname(__file__))
    from naive_tcm import naive_hard_pairs, naive_tcm

    from pml_tcm import TCMMiner, with_tcm

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _global_batch()
        local_x, local_y = (
            x[rank * LOCAL : (rank + 1) * LOCAL],
            y[rank * LOCAL : (rank + 1) * LOCAL],
        )
        gathered_x, gathered_y = _gathered_order(rank, x), _gathered_order(rank, y)

        # efficient=False: the loss of the global batch (times world size, pml's convention)
        wrapper = pml_dist.DistributedLossWrapper(with_tcm(losses.ContrastiveLoss(), **MARGINS))
        leaf = local_x.clone().requires_grad_()
        value = wrapper(leaf, local_y)
        value.backward()
        expected = WORLD * (losses.ContrastiveLoss()(x, y) + naive_tcm(x, y, **MARGINS))
        assert abs(value.item() - expected.item()) < 1e-10, (value.item(), expected.item())
        assert torch.isfinite(leaf.grad).all()

        # efficient=True: local queries against the gathered batch, self pairs removed
        wrapper = pml_dist.DistributedLossWrapper(
            with_tcm(losses.ContrastiveLoss(), **MARGINS), efficient=True
        )
        value = wrapper(local_x, local_y)
        indices = pml_dist.get_indices_tuple(local_y, gathered_y)
        base = losses.ContrastiveLoss()(local_x, local_y, indices, gathered_x, gathered_y)
        tcm = naive_tcm(local_x, local_y, gathered_x, gathered_y, pairs=indices, **MARGINS)
        expected = WORLD * (base + tcm)
        assert abs(value.item() - expected.item()) < 1e-10, (value.item(), expected.item())

        # a miner's pairs do not restrict TCM: still the global batch
        mined_pairs = miners.MultiSimilarityMiner(epsilon=0.0)(local_x, local_y)  # few pairs
        wrapper = pml_dist.DistributedLossWrapper(with_tcm(losses.ContrastiveLoss(), **MARGINS))
        value = wrapper(local_x, local_y, mined_pairs)
        base = losses.ContrastiveLoss()(gathered_x, gathered_y, mined_pairs)
        expected = WORLD * (base + naive_tcm(x, y, **MARGINS))
        assert abs(value.item() - expected.item()) < 1e-10, (value.item(), expected.item())

        # with_tcm on the efficient wrapper: each sample's own slot is left out even where
        # it would be hard (pos_margin = 1)
        all_positive = dict(pos_margin=1.0, neg_margin=0.1)
        wrapper = with_tcm(
            pml_dist.DistributedLossWrapper(losses.ContrastiveLoss(), efficient=True),
            **all_positive,
        )
        value = wrapper(local_x, local_y)
        base = losses.ContrastiveLoss()(local_x, local_y, indices, gathered_x, gathered_y)
        tcm = naive_tcm(local_x, local_y, gathered_x, gathered_y, pairs=indices, **all_positive)
        expected = WORLD * (base + tcm)
        assert abs(value.item() - expected.item()) < 1e-10, (value.item(), expected.item())

        # the miner, both modes
        mined = pml_dist.DistributedMinerWrapper(TCMMiner(**MARGINS))(local_x, local_y)
        hard_pos, hard_neg = naive_hard_pairs(gathered_x, gathered_y, **MARGINS)
        assert set(zip(mined[0].tolist(), mined[1].tolist())) == hard_pos
        assert set(zip(mined[2].tolist(), mined[3].tolist())) == hard_neg
        mined = pml_dist.DistributedMinerWrapper(TCMMiner(**MARGINS), efficient=True)(
            local_x, local_y
        )
        hard_pos, hard_neg = naive_hard_pairs(local_x, local_y, gathered_x, gathered_y, **MARGINS)
        not_self = lambda pairs: {(i, j) for i, j in pairs if i != j}  # noqa: E731
        assert set(zip(mined[0].tolist(), mined[1].tolist())) == not_self(hard_pos)
        assert set(zip(mined[2].tolist(), mined[3].tolist())) == not_self(hard_neg)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_process_gloo(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)

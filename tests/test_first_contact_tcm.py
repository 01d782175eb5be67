"""First-contact findings on TCM (issue 20): the TCM weight in with_tcm, mixed dtypes,
ref_emb given as the batch itself, per-call and thread-safe with_tcm, replicas, the
compute_loss hook, and which pairs TCM sees inside MultipleLosses."""

from __future__ import annotations

import copy
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from naive_tcm import naive_hard_pairs, naive_tcm
from pytorch_metric_learning import losses, miners
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_tcm import TCMMiner, TCMRegularizer, with_tcm
from pml_tcm.functional import tcm_loss
from pml_tcm.losses import ThresholdConsistentMarginLoss

MARGINS = dict(pos_margin=0.4, neg_margin=0.1)


def batch(n=40, dim=8, classes=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


# --- 5. with_tcm(loss, weight=...) -----------------------------------------------------


@pytest.mark.parametrize("weight", [3, 0.25, 0])
def test_with_tcm_weight_sets_the_tcm_weight(weight):
    x, y = batch(seed=1)
    loss = with_tcm(losses.MultiSimilarityLoss(), weight=weight, **MARGINS)
    assert loss.embedding_reg_weight == weight
    expected = losses.MultiSimilarityLoss()(x, y) + weight * naive_tcm(x, y, **MARGINS)
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)


def test_with_tcm_weight_none_keeps_the_losss_own_weight():
    x, y = batch(seed=2)
    loss = with_tcm(losses.ContrastiveLoss(embedding_reg_weight=0.5))
    assert loss.embedding_reg_weight == 0.5
    expected = losses.ContrastiveLoss()(x, y) + 0.5 * naive_tcm(x, y)
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
    with_tcm(loss, weight=2)  # a loss already carrying TCM: only the weight changes
    expected = losses.ContrastiveLoss()(x, y) + 2 * naive_tcm(x, y)
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("weight", [-1, float("nan"), float("inf"), "3", True])
def test_with_tcm_bad_weight(weight):
    with pytest.raises(ValueError, match="weight"):
        with_tcm(losses.ContrastiveLoss(), weight=weight)


@pytest.mark.parametrize("name", ["embedding_reg_weight", "lambda_", "reducer", "margin"])
def test_with_tcm_unknown_keyword_names_its_own_parameters(name):
    with pytest.raises(TypeError) as caught:
        with_tcm(losses.MultiSimilarityLoss(), **{name: 3})
    message = str(caught.value)
    assert message.startswith(f"with_tcm() got an unexpected keyword argument {name!r}")
    for parameter in ("regularizer", "pairs", "weight", "pos_margin", "neg_margin"):
        assert parameter in message
    assert "ModuleWithRecords" not in message


def test_tcm_regularizer_unknown_keyword_names_its_parameters():
    with pytest.raises(TypeError, match=r"TCMRegularizer .*'weight'.*with_tcm\(loss, weight="):
        TCMRegularizer(weight=3)
    TCMRegularizer(collect_stats=True, distance=None)  # pml's own arguments pass through


# --- 6. mixed dtypes and ref_emb given as the batch ------------------------------------


@pytest.mark.parametrize(
    ("dtype", "ref_dtype"), [(torch.float32, torch.float64), (torch.float64, torch.float32)]
)
def test_tcm_casts_ref_emb_to_the_embeddings_accumulation_dtype(dtype, ref_dtype):
    x, y = batch(seed=3, dtype=dtype)
    ref, ref_y = batch(n=30, seed=4, dtype=ref_dtype)
    # the reference: everything in the embeddings' dtype, then compared in float64
    expected = naive_tcm(x.double(), y, ref.to(dtype).double(), ref_y, **MARGINS)
    tol = 1e-5 if torch.float32 in (dtype, ref_dtype) else 1e-12
    leaf = ref.clone().requires_grad_()
    value = TCMRegularizer(**MARGINS)(x, y, ref_emb=leaf, ref_labels=ref_y)
    assert value.dtype == dtype
    assert value.item() == pytest.approx(expected.item(), abs=tol)
    value.backward()
    assert leaf.grad.dtype == ref_dtype and torch.isfinite(leaf.grad).all()
    functional = tcm_loss(x, y, ref, ref_y, **MARGINS)
    assert functional.item() == pytest.approx(expected.item(), abs=tol)
    # the drop-in loss, which already cast, agrees
    drop_in = ThresholdConsistentMarginLoss(margin_plus=0.4, margin_minus=0.1)
    assert drop_in(x, y, ref_emb=ref.to(dtype), ref_labels=ref_y).item() == pytest.approx(
        expected.item(), abs=tol
    )


def test_miner_casts_ref_emb_to_the_embeddings_accumulation_dtype():
    x, y = batch(seed=5, dtype=torch.float32)
    ref, ref_y = batch(n=30, seed=6, dtype=torch.float64)
    a1, p, a2, n = TCMMiner(**MARGINS)(x, y, ref, ref_y)
    hard_pos, hard_neg = naive_hard_pairs(x, y, ref.float(), ref_y, **MARGINS)
    assert set(zip(a1.tolist(), p.tolist())) == hard_pos
    assert set(zip(a2.tolist(), n.tolist())) == hard_neg


def test_batch_as_ref_emb_with_other_ref_labels_is_a_reference_set_as_in_pml():
    """pml pairs ``(x, y, ref_emb=x, ref_labels=y.clone())`` as a separate reference set:
    the self pairs (i, i) count as positive pairs (pml leaves them out only when
    ``ref_labels is labels``)."""
    x, y = batch(seed=7)
    clone = y.clone()
    pml_pairs = lmu.get_all_pairs_indices(y, clone)
    assert any(int(a) == int(b) for a, b in zip(pml_pairs[0], pml_pairs[1]))  # pml's convention
    margins = dict(pos_margin=1.0, neg_margin=0.1)  # self pairs (similarity 1) are hard
    a1, p, a2, n = TCMMiner(**margins)(x, y, x, clone)
    hard_pos, hard_neg = naive_hard_pairs(x, y, x.clone(), clone, **margins)
    assert {(i, i) for i in range(len(y))} <= hard_pos
    assert set(zip(a1.tolist(), p.tolist())) == hard_pos
    assert set(zip(a2.tolist(), n.tolist())) == hard_neg
    value = TCMRegularizer(**margins)(x, y, ref_emb=x, ref_labels=clone)
    expected = naive_tcm(x, y, x.clone(), clone, **margins)
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    assert value.item() != pytest.approx(naive_tcm(x, y, **margins).item(), abs=1e-6)
    # pml's loss agrees where its margins do (pml compares m+ = 1 with rounded similarities)
    pml_loss = losses.ThresholdConsistentMarginLoss(margin_plus=0.4, margin_minus=0.1)
    assert TCMRegularizer(**MARGINS)(x, y, ref_emb=x, ref_labels=clone).item() == pytest.approx(
        pml_loss(x, y, ref_emb=x, ref_labels=clone).item(), abs=1e-12
    )
    # with the labels tensor itself it is the batch against itself, self pairs left out
    assert TCMRegularizer(**margins)(x, y, ref_emb=x, ref_labels=y).item() == pytest.approx(
        naive_tcm(x, y, **margins).item(), abs=1e-12
    )
    a1, p, _, _ = TCMMiner(**margins)(x, y, x, y)
    assert all(int(i) != int(j) for i, j in zip(a1, p))


@pytest.mark.parametrize("component", [TCMRegularizer(), TCMMiner()])
def test_ref_labels_without_ref_emb_says_so(component):
    x, y = batch(seed=8)
    with pytest.raises(ValueError, match="got ref_labels but no ref_emb"):
        component(x, y, ref_labels=y.clone())


# --- 7. per call, thread-safe, replicas ------------------------------------------------


class _MeetingContrastiveLoss(losses.ContrastiveLoss):
    """Waits in compute_loss until every thread has started its call: all calls are in
    progress at once when the TCM term of each is computed."""

    def __init__(self, barrier: threading.Barrier, **kwargs):
        super().__init__(**kwargs)
        self.barrier = barrier

    def compute_loss(self, *args, **kwargs):
        self.barrier.wait(timeout=30)
        return super().compute_loss(*args, **kwargs)


def test_concurrent_calls_of_one_with_tcm_loss_each_get_their_own_term():
    threads = 4
    inputs = [batch(n=20 + 6 * k, seed=40 + k, classes=3 + k) for k in range(threads)]
    refs = [None, batch(n=15, seed=50), None, batch(n=25, seed=51)]
    expected = []
    for (x, y), ref in zip(inputs, refs):
        call = {} if ref is None else {"ref_emb": ref[0], "ref_labels": ref[1]}
        tcm = naive_tcm(x, y, call.get("ref_emb"), call.get("ref_labels"), **MARGINS)
        expected.append((losses.ContrastiveLoss()(x, y, **call) + 2 * tcm).item())
    barrier = threading.Barrier(threads)
    loss = with_tcm(_MeetingContrastiveLoss(barrier, embedding_reg_weight=2), **MARGINS)

    def call(k):
        (x, y), ref = inputs[k], refs[k]
        if ref is None:
            return loss(x, y).item()
        return loss(x, y, ref_emb=ref[0], ref_labels=ref[1]).item()

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(call, range(threads)))
    assert results == pytest.approx(expected, rel=1e-10)


def test_many_concurrent_calls_match_the_single_thread_reference():
    loss = with_tcm(losses.MultiSimilarityLoss(), **MARGINS)
    inputs = [batch(n=16 + k, seed=60 + k, classes=4) for k in range(8)]
    expected = [
        (losses.MultiSimilarityLoss()(x, y) + naive_tcm(x, y, **MARGINS)).item() for x, y in inputs
    ]

    def calls(k):
        return [loss(*inputs[(k + i) % 8]).item() for i in range(24)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(calls, range(4)))
    for k, values in enumerate(results):
        assert values == pytest.approx([expected[(k + i) % 8] for i in range(24)], rel=1e-10)


def _replicate(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    """One replica as ``torch.nn.parallel.replicate`` builds it (each module's
    ``_replicate_for_data_parallel``, children relinked, parameters set as plain tensors),
    on the CPU, with new parameter values, so that a replica running the original module
    shows."""
    modules = list(network.modules())
    index = {module: i for i, module in enumerate(modules)}
    copies = [module._replicate_for_data_parallel() for module in modules]
    gen = torch.Generator().manual_seed(seed)
    for module, replica in zip(modules, copies):
        for key, child in module._modules.items():
            setattr(replica, key, None if child is None else copies[index[child]])
        for key, param in module._parameters.items():
            value = torch.randn(param.shape, generator=gen, dtype=param.dtype)
            setattr(replica, key, value.requires_grad_())
    return copies[0]


def test_a_replica_runs_its_own_module():
    x, y = batch(seed=9, classes=5)
    original = with_tcm(losses.ArcFaceLoss(5, 8).double(), **MARGINS)
    holder = torch.nn.ModuleDict({"loss": original})  # the loss inside a replicated module
    replica = _replicate(holder, seed=10)["loss"]
    assert replica.W is not original.W
    plain = losses.ArcFaceLoss(5, 8).double()
    with torch.no_grad():
        plain.W.copy_(replica.W)
    expected = plain(x, y) + naive_tcm(x, y, **MARGINS)
    value = replica(x, y)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    value.backward()
    assert replica.W.grad is not None and original.W.grad is None
    assert "forward" not in vars(replica) and "forward" not in vars(original)


def test_replicas_of_a_cross_batch_memory_use_their_own_memory():
    x, y = batch(n=12, seed=11, dtype=torch.float32)
    original = with_tcm(
        losses.CrossBatchMemory(losses.ContrastiveLoss(), embedding_size=8, memory_size=32),
        **MARGINS,
    )
    replica = _replicate(original, seed=12)
    replica.embedding_memory = original.embedding_memory.clone()
    replica.label_memory = original.label_memory.clone()
    replica(x, y)
    assert replica.queue_idx == 12 and original.queue_idx == 0  # the replica's own queue
    assert original.embedding_memory.abs().sum() == 0


def test_data_parallel_on_the_cpu_and_copies():
    x, y = batch(seed=13)
    loss = with_tcm(losses.MultiSimilarityLoss(), **MARGINS)
    expected = (losses.MultiSimilarityLoss()(x, y) + naive_tcm(x, y, **MARGINS)).item()
    assert torch.nn.DataParallel(loss)(x, y).item() == pytest.approx(expected, rel=1e-10)
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss)), copy.copy(loss)):
        assert type(clone).__name__ == "MultiSimilarityLoss"
        assert isinstance(clone, losses.MultiSimilarityLoss)
        assert clone.forward.__self__ is clone
        assert clone(x, y).item() == pytest.approx(expected, rel=1e-10)
    # pml's by-name checks and record names see the loss's own class name
    assert type(losses.CrossBatchMemory(loss, embedding_size=8)).__name__ == "CrossBatchMemory"


def test_no_call_state_is_left_on_the_loss_or_the_regularizer():
    x, y = batch(seed=14)
    loss = with_tcm(losses.ContrastiveLoss())
    before = (set(vars(loss)), set(vars(loss.embedding_regularizer)))
    loss(x, y)
    assert (set(vars(loss)), set(vars(loss.embedding_regularizer))) == before
    with pytest.raises(ValueError, match="with_tcm"):  # no context outside the loss's call
        loss.embedding_regularizer(x)


# --- 9. the compute_loss hook; which pairs TCM sees -----------------------------------


def test_compute_loss_is_the_hook_forward_calls():
    class HalfTCM(TCMRegularizer):
        def compute_loss(self, *args, **kwargs):
            loss_dict = super().compute_loss(*args, **kwargs)
            loss_dict["loss"]["losses"] = 0.5 * loss_dict["loss"]["losses"]
            return loss_dict

    x, y = batch(seed=15)
    assert HalfTCM(**MARGINS)(x, y).item() == pytest.approx(
        0.5 * naive_tcm(x, y, **MARGINS).item(), rel=1e-12
    )
    loss = with_tcm(losses.ContrastiveLoss(), regularizer=HalfTCM(**MARGINS))
    expected = losses.ContrastiveLoss()(x, y) + 0.5 * naive_tcm(x, y, **MARGINS)
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-10)


def test_multiple_losses_member_sees_the_mined_pairs_with_tcm_all_pairs():
    x, y = batch(seed=16)
    miner = miners.MultiSimilarityMiner(epsilon=0.3)
    mined = lmu.convert_to_pairs(miner(x, y), y)
    member = losses.MultipleLosses(
        [losses.ContrastiveLoss(), TCMRegularizer(**MARGINS)], miners=[None, miner]
    )
    expected = losses.ContrastiveLoss()(x, y) + naive_tcm(x, y, pairs=mined, **MARGINS)
    assert member(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
    attached = losses.MultipleLosses(
        [with_tcm(losses.ContrastiveLoss(), **MARGINS)], miners=[miner]
    )
    expected = losses.ContrastiveLoss()(x, y, miner(x, y)) + naive_tcm(x, y, **MARGINS)
    assert attached(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
    mined_only = losses.MultipleLosses(
        [with_tcm(losses.ContrastiveLoss(), pairs="mined", **MARGINS)], miners=[miner]
    )
    expected = losses.ContrastiveLoss()(x, y, miner(x, y)) + naive_tcm(x, y, pairs=mined, **MARGINS)
    assert mined_only(x, y).item() == pytest.approx(expected.item(), rel=1e-10)

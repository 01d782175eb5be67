"""TCMRegularizer, TCMMiner and with_tcm inside pytorch-metric-learning."""

import copy
import pickle

import pytest
import torch
from naive_tcm import naive_hard_pairs, naive_tcm
from pytorch_metric_learning import distances, losses, miners, reducers
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from pml_tcm import TCMMiner, TCMRegularizer, with_tcm


def batch(n=48, dim=8, classes=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


MARGINS = dict(pos_margin=0.4, neg_margin=0.1)


def test_pml_published_case():
    x = torch.tensor([[0, 1], [0.43, 0.9], [1, 0], [0.5, 0.5]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert TCMRegularizer()(x, y).item() == pytest.approx(0.5179, abs=1e-4)
    pml_value = losses.ThresholdConsistentMarginLoss()(x, y).item()
    assert TCMRegularizer()(x, y).item() == pytest.approx(pml_value, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_pml_loss_without_ref(seed, dtype):
    x, y = batch(seed=seed, dtype=dtype)
    pml_loss = losses.ThresholdConsistentMarginLoss(
        margin_plus=0.4, margin_minus=0.1, lambda_plus=0.7, lambda_minus=1.3
    )
    ours = TCMRegularizer(**MARGINS, pos_weight=0.7, neg_weight=1.3)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours_value, pml_value = ours(a, y), pml_loss(b, y)
    assert ours_value.item() == pytest.approx(pml_value.item(), abs=tol)
    ours_value.backward()
    pml_value.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=0)
    # with mined pairs as indices_tuple
    pairs = miners.MultiSimilarityMiner(epsilon=0.3)(x, y)
    assert ours(x, y, pairs).item() == pytest.approx(pml_loss(x, y, pairs).item(), abs=tol)


def test_ref_emb_and_triplets_follow_the_naive_reference():
    x, y = batch(seed=1)
    ref, ref_y = batch(n=30, seed=2)
    reg = TCMRegularizer(**MARGINS)
    expected = naive_tcm(x, y, ref, ref_y, **MARGINS)
    assert reg(x, y, ref_emb=ref, ref_labels=ref_y).item() == pytest.approx(
        expected.item(), abs=1e-12
    )
    triplets = lmu.get_random_triplet_indices(y, t_per_anchor=3)
    a, p, n = triplets
    expected = naive_tcm(x, y, pairs=(a, p, a, n), **MARGINS)
    assert reg(x, y, triplets).item() == pytest.approx(expected.item(), abs=1e-12)


PAIR_LOSSES = {
    "ContrastiveLoss": lambda: losses.ContrastiveLoss(),
    "MultiSimilarityLoss": lambda: losses.MultiSimilarityLoss(),
    "TripletMarginLoss": lambda: losses.TripletMarginLoss(margin=0.2),
    "NTXentLoss": lambda: losses.NTXentLoss(),
}
CLASSIFICATION_LOSSES = {
    "ArcFaceLoss": lambda: losses.ArcFaceLoss(5, 8),
    "CosFaceLoss": lambda: losses.CosFaceLoss(5, 8),
    "ProxyAnchorLoss": lambda: losses.ProxyAnchorLoss(5, 8),
    "SubCenterArcFaceLoss": lambda: losses.SubCenterArcFaceLoss(num_classes=5, embedding_size=8),
}


def _check_sum(make_loss, x, y, weight, **call):
    torch.manual_seed(0)
    base = make_loss().double()
    if weight != 1:
        base.embedding_reg_weight = weight
    combined = with_tcm(copy.deepcopy(base), **MARGINS)
    indices = call.get("indices_tuple")
    tcm = naive_tcm(
        x,
        y,
        call.get("ref_emb"),
        call.get("ref_labels"),
        pairs=None if indices is None else lmu.convert_to_pairs(indices, y),
        **MARGINS,
    )
    expected = base(x, y, **call) + weight * tcm
    assert combined(x, y, **call).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-10)
    return combined


@pytest.mark.parametrize("name", list(PAIR_LOSSES) + list(CLASSIFICATION_LOSSES))
@pytest.mark.parametrize("weight", [1.0, 0.25])
def test_with_tcm_is_loss_plus_tcm(name, weight):
    make_loss = {**PAIR_LOSSES, **CLASSIFICATION_LOSSES}[name]
    x, y = batch(seed=3)
    combined = _check_sum(make_loss, x, y, weight)
    assert isinstance(combined.embedding_regularizer, TCMRegularizer)
    assert set(combined.reducer.reducers) >= {"embedding_reg_loss"}
    # mined pairs reach both the base loss and the TCM term
    mined = TCMMiner(**MARGINS)(x, y)
    _check_sum(make_loss, x, y, weight, indices_tuple=mined)


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_with_tcm_honours_ref_emb(name):
    x, y = batch(seed=4)
    ref, ref_y = batch(n=20, seed=5)
    _check_sum(PAIR_LOSSES[name], x, y, 1.0, ref_emb=ref, ref_labels=ref_y)


def test_regularizer_without_with_tcm_fails_with_advice():
    loss = losses.ContrastiveLoss(embedding_regularizer=TCMRegularizer())
    x, y = batch()
    with pytest.raises(ValueError, match="with_tcm"):
        loss(x, y)
    with_tcm(loss)  # adopts the regularizer the loss already carries
    assert loss(x, y).item() == pytest.approx(
        (losses.ContrastiveLoss()(x, y) + naive_tcm(x, y)).item(), rel=1e-10
    )


def test_with_tcm_arguments():
    with pytest.raises(TypeError, match="pytorch_metric_learning loss"):
        with_tcm(torch.nn.MSELoss())
    with pytest.raises(ValueError, match="already has embedding_regularizer"):
        with_tcm(losses.ContrastiveLoss(embedding_regularizer=losses.ContrastiveLoss()))
    with pytest.raises(ValueError, match="not both"):
        with_tcm(losses.ContrastiveLoss(), TCMRegularizer(), pos_margin=0.8)
    with pytest.raises(TypeError, match="TCMRegularizer"):
        with_tcm(losses.ContrastiveLoss(), regularizer=torch.nn.Identity())
    with pytest.raises(ValueError, match="pairs"):
        with_tcm(losses.ContrastiveLoss(), pairs="hard")
    loss = losses.ContrastiveLoss()
    assert with_tcm(loss) is loss and with_tcm(loss) is loss  # idempotent: TCM added once
    x, y = batch(seed=20)
    assert loss(x, y).item() == pytest.approx(
        (losses.ContrastiveLoss()(x, y) + naive_tcm(x, y)).item(), rel=1e-10
    )
    # no torch hooks: pml's HookContainer logs every dict attribute of a loss, and torch's
    # tables for hooks with kwargs are int-keyed
    assert not loss._forward_pre_hooks and not loss._forward_hooks


def _pairs_of(indices, y):
    return lmu.convert_to_pairs(indices, y)


def test_with_tcm_sees_all_pairs_whatever_the_miner():
    x, y = batch(seed=21)
    all_pairs_tcm = naive_tcm(x, y, **MARGINS)
    empty = tuple(torch.zeros(0, dtype=torch.long) for _ in range(4))
    easy_positives = miners.BatchEasyHardMiner(pos_strategy="easy", neg_strategy="semihard")(x, y)
    tcm_pairs = TCMMiner(**MARGINS)(x, y)
    for indices in (empty, easy_positives, tcm_pairs):
        base = losses.ContrastiveLoss()(x, y, indices)
        default = with_tcm(losses.ContrastiveLoss(), **MARGINS)
        assert default(x, y, indices).item() == pytest.approx(
            (base + all_pairs_tcm).item(), rel=1e-10, abs=1e-12
        )
        mined = with_tcm(losses.ContrastiveLoss(), pairs="mined", **MARGINS)
        expected = base + naive_tcm(x, y, pairs=_pairs_of(indices, y), **MARGINS)
        assert mined(x, y, indices).item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    # the two settings differ where the miner leaves hard pairs out, agree on TCMMiner's
    mined_easy = naive_tcm(x, y, pairs=_pairs_of(easy_positives, y), **MARGINS)
    assert abs(mined_easy.item() - all_pairs_tcm.item()) > 1e-3
    assert naive_tcm(x, y, pairs=tcm_pairs, **MARGINS).item() == pytest.approx(
        all_pairs_tcm.item(), rel=1e-10
    )


def _memory_reference(wrapped, x, y, filled, margins):
    """TCM over batch x filled memory, each sample's own slot left out (naive)."""
    mem_x = wrapped.embedding_memory[:filled].double()
    mem_y = wrapped.label_memory[:filled]
    own = wrapped.curr_batch_idx.tolist()
    pos, neg = [], []
    for i in range(len(y)):
        for j in range(filled):
            if j != own[i]:
                (pos if y[i] == mem_y[j] else neg).append((i, j))
    pairs = tuple(torch.tensor(v) for v in (*zip(*pos), *zip(*neg)))
    return naive_tcm(x.double(), y, mem_x, mem_y, pairs=pairs, **margins)


@pytest.mark.parametrize(
    "order, margins",
    [
        ("wrapper", MARGINS),
        ("wrapper", dict(pos_margin=1.0, neg_margin=0.1)),  # own slots would be hard
        ("inner", MARGINS),
    ],
)
def test_cross_batch_memory_with_its_own_miner(order, margins):
    memory_size, dim = 40, 8

    def memory(loss):
        miner = miners.MultiSimilarityMiner(epsilon=0.05)
        return losses.CrossBatchMemory(loss, dim, memory_size=memory_size, miner=miner)

    plain = memory(losses.ContrastiveLoss())
    if order == "wrapper":
        wrapped = with_tcm(memory(losses.ContrastiveLoss()), **margins)
    else:
        wrapped = memory(with_tcm(losses.ContrastiveLoss(), **margins))
    for step in range(3):
        x, y = batch(n=16, dim=dim, seed=30 + step, dtype=torch.float32)
        base = plain(x, y)
        value = wrapped(x, y)
        filled = min(memory_size, 16 * (step + 1))
        expected = _memory_reference(wrapped, x, y, filled, margins)
        assert (value - base).item() == pytest.approx(expected.item(), abs=1e-5)


def test_with_tcm_survives_deepcopy_and_pickle():
    loss = with_tcm(losses.ContrastiveLoss(), **MARGINS)
    x, y = batch()
    expected = loss(x, y).item()
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert clone.embedding_regularizer is not loss.embedding_regularizer
        assert clone(x, y).item() == pytest.approx(expected, rel=1e-12)


def test_inside_multiple_losses():
    x, y = batch(seed=6)
    combined = losses.MultipleLosses(
        [losses.ContrastiveLoss(), TCMRegularizer(**MARGINS)], weights=[1.0, 0.5]
    )
    expected = losses.ContrastiveLoss()(x, y) + 0.5 * naive_tcm(x, y, **MARGINS)
    assert combined(x, y).item() == pytest.approx(expected.item(), rel=1e-10)
    attached = losses.MultipleLosses([with_tcm(losses.ContrastiveLoss(), **MARGINS)])
    assert attached(x, y).item() == pytest.approx(
        (losses.ContrastiveLoss()(x, y) + naive_tcm(x, y, **MARGINS)).item(), rel=1e-10
    )


def test_cross_batch_memory_counts_batch_vs_memory_pairs():
    torch.manual_seed(0)
    memory_size, dim = 40, 8
    plain = losses.CrossBatchMemory(losses.ContrastiveLoss(), dim, memory_size=memory_size)
    wrapped = losses.CrossBatchMemory(
        with_tcm(losses.ContrastiveLoss(), **MARGINS), dim, memory_size=memory_size
    )
    for step in range(3):
        x, y = batch(n=16, dim=dim, seed=10 + step, dtype=torch.float32)
        base = plain(x, y)
        value = wrapped(x, y)
        # the pairs CrossBatchMemory passes: batch vs filled memory, own slots excluded
        filled = min(memory_size, 16 * (step + 1))
        mem_x = wrapped.embedding_memory[:filled].double()
        mem_y = wrapped.label_memory[:filled]
        own = wrapped.curr_batch_idx.tolist()
        pos, neg = [], []
        for i in range(16):
            for j in range(filled):
                if j == own[i]:
                    continue
                (pos if y[i] == mem_y[j] else neg).append((i, j))
        pairs = tuple(torch.tensor(v) for v in (*zip(*pos), *zip(*neg)))
        expected = naive_tcm(x.double(), y, mem_x, mem_y, pairs=pairs, **MARGINS)
        assert (value - base).item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_self_supervised_loss_wrapper(symmetric):
    x, _ = batch(n=12, seed=13)
    augmented, _ = batch(n=12, seed=14)
    ids = torch.arange(12)
    plain = losses.SelfSupervisedLoss(losses.ContrastiveLoss(), symmetric=symmetric)
    wrapped = with_tcm(
        losses.SelfSupervisedLoss(losses.ContrastiveLoss(), symmetric=symmetric), **MARGINS
    )
    if symmetric:  # the wrapper pairs the concatenation with itself
        tcm = naive_tcm(torch.cat([x, augmented]), torch.cat([ids, ids]), **MARGINS)
    else:  # embeddings against the augmentations as references
        tcm = naive_tcm(x, ids, augmented, ids, **MARGINS)
    expected = plain(x, augmented) + tcm
    assert wrapped(x, augmented).item() == pytest.approx(expected.item(), rel=1e-10)


def test_miner_returns_the_hard_pairs():
    x, y = batch(seed=7)
    ref, ref_y = batch(n=25, seed=8)
    miner = TCMMiner(**MARGINS)
    for args in ((x, y), (x, y, ref, ref_y)):
        a1, p, a2, n = miner(*args)
        hard_pos, hard_neg = naive_hard_pairs(*args, **MARGINS)
        assert set(zip(a1.tolist(), p.tolist())) == hard_pos and len(a1) == len(hard_pos)
        assert set(zip(a2.tolist(), n.tolist())) == hard_neg and len(a2) == len(hard_neg)
        assert a1.dtype == torch.long


def test_stats_are_recorded():
    reg = TCMRegularizer(collect_stats=True, **MARGINS)
    x, y = batch(seed=9)
    reg(x, y)
    hard_pos, hard_neg = naive_hard_pairs(x, y, **MARGINS)
    assert int(reg.num_hard_pos_pairs) == len(hard_pos)
    assert int(reg.num_hard_neg_pairs) == len(hard_neg)
    assert float(reg.tcm_value) == pytest.approx(naive_tcm(x, y, **MARGINS).item(), rel=1e-12)
    assert "tcm_value" in reg._record_these_stats
    quiet = TCMRegularizer(**MARGINS)  # collect_stats off: nothing kept
    quiet(x, y)
    assert not hasattr(quiet, "tcm_value") or quiet.tcm_value == 0
    miner = TCMMiner(collect_stats=True, **MARGINS)
    miner(x, y)
    assert miner.num_pos_pairs == len(hard_pos) and miner.num_neg_pairs == len(hard_neg)


def test_regularizer_refuses_a_reducer():
    with pytest.raises(ValueError, match="already reduced"):
        TCMRegularizer(reducer=reducers.SumReducer())


def test_custom_reducer_is_kept():
    loss = losses.ContrastiveLoss(reducer=reducers.SumReducer())
    with_tcm(loss, **MARGINS)
    assert all(isinstance(r, reducers.SumReducer) for r in loss.reducer.reducers.values())
    x, y = batch(seed=11)
    expected = losses.ContrastiveLoss(reducer=reducers.SumReducer())(x, y) + naive_tcm(
        x, y, **MARGINS
    )
    assert loss(x, y).item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("cls", [TCMRegularizer, TCMMiner])
def test_bad_construction(cls):
    with pytest.raises(ValueError, match="CosineSimilarity"):
        cls(distance=distances.LpDistance())
    with pytest.raises(ValueError, match="CosineSimilarity"):
        cls(distance=distances.DotProductSimilarity())
    with pytest.raises(ValueError, match="pos_margin"):
        cls(pos_margin=1.5)
    with pytest.raises(ValueError, match="neg_margin"):
        cls(neg_margin=-1.01)
    with pytest.raises(ValueError, match="pos_margin .* must be >= neg_margin"):
        cls(pos_margin=0.2, neg_margin=0.3)
    with pytest.raises(ValueError, match="neg_margin"):
        cls(neg_margin=float("nan"))


def test_bad_weights():
    with pytest.raises(ValueError, match="pos_weight"):
        TCMRegularizer(pos_weight=-1)
    with pytest.raises(ValueError, match="neg_weight"):
        TCMRegularizer(neg_weight=float("inf"))


@pytest.mark.parametrize("component", [TCMRegularizer(), TCMMiner()])
def test_bad_input(component):
    x, y = batch(n=6)
    with pytest.raises(ValueError, match="labels"):
        component(x, y[:5])
    with pytest.raises(ValueError, match="labels"):
        component(x, y.reshape(2, 3))
    with pytest.raises(ValueError, match="labels"):
        component(x, y.double())
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
        component(bad, y)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="embeddings contains NaN or Inf"):
        component(bad, y)
    zero = x.clone()
    zero[4] = 0
    with pytest.raises(ValueError, match="zero-norm row"):
        component(zero, y)
    with pytest.raises(ValueError, match="ref_emb"):
        component(x, y, ref_emb=torch.zeros(3, 8, dtype=x.dtype), ref_labels=y[:3])
    with pytest.raises(ValueError, match="embedding size"):
        component(x, y, ref_emb=x[:, :4], ref_labels=y)
    with pytest.raises(ValueError, match="ref_labels"):
        component(x, y, ref_emb=x[:3], ref_labels=y)


def test_unchecked_mode_and_degenerate_batches():
    x, y = batch(n=1)
    reg = TCMRegularizer(check_inputs=False)
    leaf = x.clone().requires_grad_()
    value = reg(leaf, y)
    value.backward()
    assert value.item() == 0 and torch.equal(leaf.grad, torch.zeros_like(leaf))
    assert TCMMiner()(x, y)[0].numel() == 0


def test_regularizer_under_torch_compile():
    reg = TCMRegularizer(check_inputs=False, **MARGINS)
    compiled = torch.compile(reg, backend="aot_eager")
    x, y = batch(seed=12, dtype=torch.float32)
    leaf = x.clone().requires_grad_()
    value = compiled(leaf, y)
    value.backward()
    assert value.item() == pytest.approx(naive_tcm(x.double(), y, **MARGINS).item(), abs=1e-5)
    assert torch.isfinite(leaf.grad).all()


def test_with_tcm_loss_under_torch_compile():
    loss = with_tcm(losses.ContrastiveLoss(), regularizer=TCMRegularizer(check_inputs=False))
    compiled = torch.compile(loss, backend="aot_eager")
    x, y = batch(seed=22, dtype=torch.float32)
    leaf = x.clone().requires_grad_()
    value = compiled(leaf, y)
    value.backward()
    expected = losses.ContrastiveLoss()(x.double(), y) + naive_tcm(x.double(), y)
    assert value.item() == pytest.approx(expected.item(), abs=1e-5)
    assert torch.isfinite(leaf.grad).all()

"""pml_tcm.losses.ThresholdConsistentMarginLoss: pml's value where pml is right (pml's own
loss and its published case), the naive per-pair reference where pml reads the wrong rows
(``ref_emb``)."""

from __future__ import annotations

import pytest
import torch
from naive_tcm import all_pairs, naive_hard_pairs, naive_tcm
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers

import pml_tcm
from pml_tcm.losses import ThresholdConsistentMarginLoss

pml_loss_class = losses.ThresholdConsistentMarginLoss  # pml >= 2.7.0, the lowest we allow
TOLERANCE = {torch.float16: 2e-3, torch.float32: 1e-5, torch.float64: 1e-12}
SETTINGS = [
    {},
    dict(lambda_plus=0.7, lambda_minus=1.3, margin_plus=0.4, margin_minus=0.1),
    dict(margin_plus=0.2, margin_minus=-0.2),
]


def batch(n=48, dim=8, classes=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64).to(dtype)
    return x, torch.randint(0, classes, (n,), generator=gen)


def naive_settings(settings):
    names = dict(
        lambda_plus="pos_weight",
        lambda_minus="neg_weight",
        margin_plus="pos_margin",
        margin_minus="neg_margin",
    )
    return {names[k]: v for k, v in settings.items()}


def value_and_grad(loss_fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    value = loss_fn(x, *args, **kwargs)
    value.backward()
    return value.detach().double(), x.grad.double()


def test_is_exported_next_to_the_other_components():
    assert pml_tcm.ThresholdConsistentMarginLoss is ThresholdConsistentMarginLoss
    assert "ThresholdConsistentMarginLoss" in pml_tcm.__all__
    assert isinstance(ThresholdConsistentMarginLoss(), losses.BaseMetricLossFunction)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_pml_published_case(dtype):
    # pml's documented example: ContrastiveLoss 0.4866 + TCM 0.5180 = 1.0045.
    x = torch.tensor([[0.0, 1.0], [0.43, 0.9], [1.0, 0.0], [0.5, 0.5]], dtype=dtype)
    y = torch.tensor([0, 0, 1, 1])
    combined = losses.MultipleLosses(
        [
            losses.ContrastiveLoss(
                distance=distances.CosineSimilarity(), pos_margin=0.9, neg_margin=0.4
            ),
            ThresholdConsistentMarginLoss(),
        ]
    )
    rtol = 1e-2 if dtype == torch.float16 else 1e-5
    assert combined(x, y).item() == pytest.approx(1.0045, rel=rtol, abs=1e-4)
    assert ThresholdConsistentMarginLoss()(x, y).item() == pytest.approx(0.5179, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_equals_pml_on_random_batches(dtype, settings, seed):
    x, y = batch(seed=seed, dtype=dtype)
    ours, theirs = ThresholdConsistentMarginLoss(**settings), pml_loss_class(**settings)
    tol = TOLERANCE[dtype]
    ours_value, ours_grad = value_and_grad(ours, x, y)
    pml_value, pml_grad = value_and_grad(theirs, x, y)
    assert ours_value.item() == pytest.approx(pml_value.item(), abs=tol, rel=tol)
    torch.testing.assert_close(ours_grad, pml_grad, atol=tol, rtol=tol)
    # float16: the value of the float64 reference on the same (rounded) inputs
    expected = naive_tcm(x.double(), y, **naive_settings(settings))
    assert ours_value.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize(
    "miner",
    [
        miners.MultiSimilarityMiner(epsilon=0.3),
        miners.PairMarginMiner(pos_margin=0.5, neg_margin=0.3),
        miners.TripletMarginMiner(margin=0.3, type_of_triplets="all"),
        miners.BatchHardMiner(),
    ],
)
def test_equals_pml_with_mined_pairs_and_triplets(dtype, miner):
    x, y = batch(seed=4, dtype=dtype)
    indices = miner(x.float(), y)
    settings = SETTINGS[1]
    ours_value, ours_grad = value_and_grad(ThresholdConsistentMarginLoss(**settings), x, y, indices)
    pml_value, pml_grad = value_and_grad(pml_loss_class(**settings), x, y, indices)
    tol = TOLERANCE[dtype]
    assert ours_value.item() == pytest.approx(pml_value.item(), abs=tol, rel=tol)
    torch.testing.assert_close(ours_grad, pml_grad, atol=tol, rtol=tol)
    # pml does not need labels when it is given the pairs; neither does this loss
    assert ThresholdConsistentMarginLoss(**settings)(x, None, indices).item() == pytest.approx(
        ours_value.item(), abs=tol
    )


@pytest.mark.parametrize("num_refs", [30, 48, 70])
def test_ref_emb_follows_the_naive_reference(num_refs):
    # pml reads the references' rows from embeddings[p] / embeddings[n]; the formula,
    # and this loss, read them from ref_emb (any number of rows).
    x, y = batch(seed=1)
    ref, ref_y = batch(n=num_refs, seed=2)
    settings = SETTINGS[1]
    loss_fn = ThresholdConsistentMarginLoss(**settings)
    x1, r1 = x.clone().requires_grad_(), ref.clone().requires_grad_()
    x2, r2 = x.clone().requires_grad_(), ref.clone().requires_grad_()
    value = loss_fn(x1, y, ref_emb=r1, ref_labels=ref_y)
    expected = naive_tcm(x2, y, r2, ref_y, **naive_settings(settings))
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    value.backward()
    expected.backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(r1.grad, r2.grad, atol=1e-12, rtol=0)


def test_ref_emb_with_mined_pairs_and_triplets():
    x, y = batch(seed=5)
    ref, ref_y = batch(n=40, seed=6)
    settings = SETTINGS[1]
    loss_fn = ThresholdConsistentMarginLoss(**settings)
    pairs = miners.MultiSimilarityMiner(epsilon=0.3)(x, y, ref, ref_y)
    expected = naive_tcm(x, y, ref, ref_y, pairs=pairs, **naive_settings(settings))
    got = loss_fn(x, y, pairs, ref_emb=ref, ref_labels=ref_y)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    a, p, n = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")(x, y, ref, ref_y)
    expected = naive_tcm(x, y, ref, ref_y, pairs=(a, p, a, n), **naive_settings(settings))
    got = loss_fn(x, y, (a, p, n), ref_emb=ref, ref_labels=ref_y)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_pml_pair_convention_for_ref_labels():
    # pml leaves (i, i) out exactly when ref_labels is labels (the same tensor).
    x, y = batch(seed=7)
    views = x + 0.3 * batch(seed=8)[0]  # e.g. a second view of the same samples
    settings = SETTINGS[2]
    loss_fn = ThresholdConsistentMarginLoss(**settings)
    positives, negatives = all_pairs(y.tolist(), y.tolist(), exclude_self=True)
    without_self = tuple(
        torch.tensor(list(col)) for pairs in (positives, negatives) for col in zip(*pairs)
    )
    expected = naive_tcm(x, y, views, y, pairs=without_self, **naive_settings(settings))
    got = loss_fn(x, y, ref_emb=views, ref_labels=y)
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)
    expected = naive_tcm(x, y, views, y.clone(), **naive_settings(settings))  # self pairs in
    got = loss_fn(x, y, ref_emb=views, ref_labels=y.clone())
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


@pytest.mark.parametrize(
    "make_reducer",
    [
        reducers.MeanReducer,
        reducers.SumReducer,
        reducers.AvgNonZeroReducer,
        lambda: reducers.ThresholdReducer(low=0.1),
        reducers.DoNothingReducer,
    ],
)
def test_reducers_as_pml_handles_them(make_reducer):
    x, y = batch(seed=9)
    ours = ThresholdConsistentMarginLoss(reducer=make_reducer())
    theirs = pml_loss_class(reducer=make_reducer())
    got, expected = ours(x, y), theirs(x, y)
    if isinstance(expected, dict):  # DoNothingReducer hands back the loss dict
        assert got["loss"]["reduction_type"] == expected["loss"]["reduction_type"]
        got, expected = got["loss"]["losses"], expected["loss"]["losses"]
    assert got.item() == pytest.approx(expected.item(), abs=1e-12)


def test_embedding_regularizer_and_zero_loss_as_pml():
    x, y = batch(seed=10)
    kwargs = dict(embedding_regularizer=regularizers.LpRegularizer(), embedding_reg_weight=0.3)
    ours_value, ours_grad = value_and_grad(ThresholdConsistentMarginLoss(**kwargs), x, y)
    pml_value, pml_grad = value_and_grad(pml_loss_class(**kwargs), x, y)
    assert ours_value.item() == pytest.approx(pml_value.item(), abs=1e-12)
    torch.testing.assert_close(ours_grad, pml_grad, atol=1e-12, rtol=0)
    # no hard pair at all: 0, with a (zero) gradient, as pml
    same = torch.ones(6, 3, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    value, grad = value_and_grad(ThresholdConsistentMarginLoss(), same, labels)
    assert value.item() == 0.0 == pml_loss_class()(same, labels).item()
    assert torch.count_nonzero(grad) == 0


def test_stats_count_the_hard_pairs():
    x, y = batch(seed=11)
    loss_fn = ThresholdConsistentMarginLoss(margin_plus=0.4, margin_minus=0.1, collect_stats=True)
    loss_fn(x, y)
    hard_pos, hard_neg = naive_hard_pairs(x, y, pos_margin=0.4, neg_margin=0.1)
    assert int(loss_fn.num_hard_pos_pairs) == len(hard_pos)
    assert int(loss_fn.num_hard_neg_pairs) == len(hard_neg)


def test_cross_batch_memory_refuses_the_class_name_and_with_tcm_is_the_way():
    with pytest.raises(Exception, match="ThresholdConsistentMarginLoss"):
        losses.CrossBatchMemory(ThresholdConsistentMarginLoss(), 8, memory_size=32)
    memory = losses.CrossBatchMemory(pml_tcm.with_tcm(losses.ContrastiveLoss()), 8, memory_size=32)
    x, y = batch(n=16, seed=12, dtype=torch.float32)
    assert torch.isfinite(memory(x, y))


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(lambda_plus="1"), "lambda_plus"),
        (dict(lambda_minus=float("nan")), "lambda_minus"),
        (dict(margin_plus=None), "margin_plus"),
        (dict(margin_minus=float("inf")), "margin_minus"),
        (dict(distance=distances.LpDistance()), "distance"),
        (dict(distance=distances.CosineSimilarity(power=2)), "power"),
    ],
)
def test_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ThresholdConsistentMarginLoss(**kwargs)


def test_bad_calls():
    x, y = batch()
    loss_fn = ThresholdConsistentMarginLoss()
    with pytest.raises(ValueError, match="labels"):
        loss_fn(x)
    with pytest.raises(ValueError, match="labels"):
        loss_fn(x, y[:-1])
    with pytest.raises(ValueError, match="embeddings"):
        loss_fn(x[0], y[:1])
    with pytest.raises(ValueError, match="ref_emb"):
        loss_fn(x, y, ref_emb=x[:, :3], ref_labels=y)
    with pytest.raises(ValueError, match="indices_tuple"):
        loss_fn(x, y, (y, y))

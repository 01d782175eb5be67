"""CUDA's device and sync rules, checked on the CPU model of tests/cuda_model.py.

Every case runs twice: on plain CPU tensors and on model-device tensors under
:class:`CudaRules`; the results must be equal, no op may mix devices, and pml-tcm's own
host syncs are counted (TCM: none; the miner: only the two ``nonzero`` that size its
output; one OPIS evaluation: a constant number, whatever N and the number of chunks, as
the model device takes the sync-free engine of :mod:`pml_tcm.functional.streaming`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cuda_model import MODEL_DEVICE, CudaRules, on_model_device, to_cpu
from pytorch_metric_learning import losses

from pml_tcm import (
    OPISAccuracyCalculator,
    TCMMiner,
    TCMRegularizer,
    calibrate_threshold,
    with_tcm,
)
from pml_tcm.embedding_report import compute_report
from pml_tcm.functional import opis, streaming, tcm_loss

MARGINS = {"pos_margin": 0.5, "neg_margin": 0.0}


def _batch(n: int = 48, d: int = 12, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _clustered(n: int, classes: int = 5, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    labels = torch.arange(n) % classes
    return centres[labels] * 0.6 + torch.randn(n, d, generator=g), labels


def _describe(events) -> str:
    return "; ".join(f"{e.detail} at {e.where}" for e in events)


# --------------------------------------------------------------------------- the model


def test_model_flags_what_cuda_refuses_or_waits_for():
    x = on_model_device(torch.arange(6.0))
    with CudaRules() as rules:
        torch.searchsorted(x, torch.tensor(2.5))  # 0-dim host tensor, not element-wise
        x + torch.tensor(1.0)  # allowed: a 0-dim host scalar in an element-wise op
        x + torch.ones(6)  # host tensor with dimensions
        float(x.sum())
        x.masked_fill(x > 2, x.max())
        x.nonzero()
        torch.ones(3).to(MODEL_DEVICE)
        torch.ones(3).to(MODEL_DEVICE, non_blocking=True)
    assert len(rules.mismatches()) == 2
    details = [e.detail for e in rules.syncs(ours_only=False)]
    assert len(details) == 4
    assert "blocking host-to-device copy" in details
    assert "masked_fill with a device value" in details


# --------------------------------------------------------------------------- TCM


def _tcm_cases():
    x, y = _batch()
    r, ry = _batch(n=30, seed=1)
    pairs = TCMMiner(**MARGINS)(x, y)
    ref_pairs = TCMMiner(**MARGINS)(x, y, r, ry)
    return {
        "batch": (x, y, None, None, None),
        "pairs": (x, y, None, None, pairs),
        "ref": (x, y, r, ry, None),
        "ref+pairs": (x, y, r, ry, ref_pairs),
    }


@pytest.mark.parametrize("case", ["batch", "pairs", "ref", "ref+pairs"])
def test_tcm_loss_is_sync_free_and_equal_to_cpu(case):
    x, y, r, ry, pairs = _tcm_cases()[case]
    leaf = x.clone().requires_grad_()
    expected = tcm_loss(leaf, y, r, ry, pairs=pairs, **MARGINS)
    expected.backward()

    dev_leaf = on_model_device(x, requires_grad=True)

    def move(t):
        return None if t is None else on_model_device(t)

    dev_pairs = None if pairs is None else tuple(on_model_device(t) for t in pairs)
    with CudaRules() as rules:
        value = tcm_loss(dev_leaf, move(y), move(r), move(ry), pairs=dev_pairs, **MARGINS)
        value.backward()
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert not rules.syncs(), _describe(rules.syncs())
    assert torch.equal(to_cpu(value), expected.detach())
    torch.testing.assert_close(to_cpu(dev_leaf.grad), leaf.grad, rtol=0, atol=0)


@pytest.mark.parametrize("with_pairs", [False, True])
def test_regularizer_with_host_labels_is_sync_free(with_pairs):
    """pml's trainers leave labels on the CPU: TCM moves them without blocking."""
    x, y = _batch()
    pairs = TCMMiner(**MARGINS)(x, y) if with_pairs else None
    regularizer = TCMRegularizer(check_inputs=False, **MARGINS)
    leaf = x.clone().requires_grad_()
    expected = regularizer(leaf, y, pairs)
    expected.backward()

    dev_leaf = on_model_device(x, requires_grad=True)
    with CudaRules() as rules:
        value = regularizer(dev_leaf, y, pairs)  # labels and pairs on the host
        value.backward()
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert not rules.syncs(), _describe(rules.syncs())
    assert torch.equal(to_cpu(value), expected.detach())
    assert torch.equal(to_cpu(dev_leaf.grad), leaf.grad)


@pytest.mark.parametrize(
    "make_loss",
    [losses.ContrastiveLoss, losses.MultiSimilarityLoss],
    ids=["contrastive", "multisimilarity"],
)
def test_with_tcm_adds_no_sync_of_its_own(make_loss):
    x, y = _batch()
    reference, labels = _batch(n=20, seed=3)

    def loss_fn():
        return with_tcm(make_loss(), regularizer=TCMRegularizer(check_inputs=False, **MARGINS))

    leaf = x.clone().requires_grad_()
    expected = loss_fn()(leaf, y, ref_emb=reference, ref_labels=labels)
    expected.backward()

    dev_leaf = on_model_device(x, requires_grad=True)
    with CudaRules() as rules:
        value = loss_fn()(
            dev_leaf, y, ref_emb=on_model_device(reference), ref_labels=on_model_device(labels)
        )
        value.backward()
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert not rules.syncs(), _describe(rules.syncs())  # pml's own syncs are not ours
    torch.testing.assert_close(to_cpu(value), expected.detach())
    torch.testing.assert_close(to_cpu(dev_leaf.grad), leaf.grad)


def test_miner_syncs_only_to_size_its_output():
    x, y = _batch()
    expected = TCMMiner(**MARGINS)(x, y)
    with CudaRules() as rules:
        mined = TCMMiner(check_inputs=False, **MARGINS)(on_model_device(x), y)
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert [e.detail for e in rules.syncs()] == ["nonzero", "nonzero"]
    for got, want in zip(mined, expected):
        assert torch.equal(to_cpu(got), want)


# --------------------------------------------------------------------------- OPIS


OPIS_PATHS = {
    "grid": {"calibration_range": (0.0, 0.6)},
    "far": {},
    "guide": {"collect_limit": 500},
    "pivot": {"collect_limit": 20, "retain_limit": 0},
}


def _groups(n: int) -> torch.Tensor:
    return (torch.arange(n) * 7) % 3  # three groups, cutting across the classes


# "large": every class takes the large-class path (slabs of its own columns)
LAYOUTS = {"classes": (None, False), "groups": (3, False), "large+groups": (3, True)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", list(OPIS_PATHS))
def test_opis_paths_on_the_device_equal_cpu(path, layout, monkeypatch):
    grouped, large = LAYOUTS[layout]
    if large:
        monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 16)
    x, y = _clustered(300)
    settings = {"chunk_size": 64, **OPIS_PATHS[path]}
    groups = _groups(300) if grouped else None
    expected = opis(x, y, groups=groups, **settings)  # the CPU's gathering engine
    with CudaRules() as rules:
        result = opis(
            on_model_device(x),
            on_model_device(y),
            groups=None if groups is None else on_model_device(groups),
            **settings,
        )
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert result.by == expected.by
    assert result.opis == expected.opis
    assert result.eps_opis == expected.eps_opis
    assert result.calibration_range == expected.calibration_range
    for name in ("positive_histogram", "negative_histogram", "positives", "negatives"):
        got = to_cpu(getattr(result.state, name)).to(torch.int64)
        assert torch.equal(got, getattr(expected.state, name).to(torch.int64)), name


def test_the_cpu_gathers_and_other_devices_count_densely(monkeypatch):
    x, y = _clustered(40)

    def stream(queries, labels):
        return streaming.PairStream(
            queries=queries,
            query_labels=labels,
            references=queries,
            reference_labels=labels,
            classes=torch.arange(5, device=labels.device),
            self_offset=0,
            score_fn=streaming.cosine_similarity_scores,
            higher_is_closer=True,
            chunk_size=None,
        )

    assert not stream(x, y).sync_free
    with CudaRules():
        assert stream(on_model_device(x), on_model_device(y)).sync_free
    monkeypatch.setattr(streaming, "SYNC_FREE", True)
    assert stream(x, y).sync_free


# Host syncs of one OPIS evaluation on the model device, whatever N and the number of
# chunks (docs/reference/functional.md states them): set-up, label preparation, one read
# of the stream's plan, the grid's edges and the result's curves (20; one more with
# groups); the FAR path adds the count of negatives and, per exact pass, the reads of its
# tallies (8; one pass here, as in most evaluations).
OPIS_SYNC_BOUND = {"grid": 21, "far": 29}


def _opis_syncs(n: int, chunks: int, grouped: bool = False, **settings) -> int:
    x, y = _clustered(n)
    groups = on_model_device(_groups(n)) if grouped else None
    with CudaRules() as rules:
        opis(
            on_model_device(x),
            on_model_device(y),
            chunk_size=n // chunks,
            groups=groups,
            **settings,
        )
    assert not rules.mismatches(), _describe(rules.mismatches())
    return len(rules.syncs())


@pytest.mark.parametrize("grouped", [False, True], ids=["classes", "groups"])
@pytest.mark.parametrize("path", ["grid", "far"])
def test_opis_syncs_do_not_grow_with_n_or_chunks(path, grouped):
    settings = OPIS_PATHS[path]
    counts = {
        (n, chunks): _opis_syncs(n, chunks, grouped, **settings)
        for n, chunks in ((200, 4), (400, 4), (800, 4), (400, 16), (800, 16))
    }
    assert len(set(counts.values())) == 1, counts
    assert counts[(200, 4)] <= OPIS_SYNC_BOUND[path], counts


def test_opis_syncs_with_large_classes_do_not_grow_with_chunks(monkeypatch):
    # every class large: one positive slab per class and chunk (and, with groups, runs)
    monkeypatch.setattr(streaming, "LARGE_CLASS_REFERENCES", 16)
    counts = {c: _opis_syncs(400, c, True, **OPIS_PATHS["far"]) for c in (4, 16)}
    assert counts[4] == counts[16] <= OPIS_SYNC_BOUND["far"], counts


def test_single_class_opis_syncs_do_not_grow_with_chunks():
    # no negative pair: the range is the positive scores' (it read each chunk's back);
    # one large class, one slab per chunk
    x, _ = _clustered(400)
    y = torch.zeros(400, dtype=torch.int64)
    counts = {}
    for chunks in (4, 16):
        with CudaRules() as rules:
            result = opis(on_model_device(x), on_model_device(y), chunk_size=400 // chunks)
        assert not rules.mismatches(), _describe(rules.mismatches())
        counts[chunks] = len(rules.syncs())
    assert counts[4] == counts[16], counts
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    off_diagonal = (unit @ unit.T)[~torch.eye(400, dtype=torch.bool)]
    low, high = result.calibration_range
    assert low == pytest.approx(float(off_diagonal.min()), abs=1e-6)
    assert high == pytest.approx(float(off_diagonal.max()), abs=1e-6)


@pytest.mark.parametrize("grouped", [False, True], ids=["classes", "groups"])
def test_calibration_on_the_device_equals_cpu(grouped):
    x, y = _clustered(240)
    groups = _groups(240) if grouped else None
    for target in ({"target_far": 1e-2}, {"target_frr": 0.1}):
        expected = calibrate_threshold(x, y, groups=groups, chunk_size=40, **target)
        with CudaRules() as rules:
            report = calibrate_threshold(
                on_model_device(x),
                on_model_device(y),
                groups=None if groups is None else on_model_device(groups),
                chunk_size=40,
                **target,
            )
        assert not rules.mismatches(), _describe(rules.mismatches())
        assert report.threshold == expected.threshold
        assert torch.equal(report.class_far, expected.class_far)
        assert torch.equal(report.class_frr, expected.class_frr)
        if grouped:
            assert torch.equal(report.groups.far, expected.groups.far)
            assert torch.equal(report.groups.frr, expected.groups.frr)


@pytest.mark.parametrize("target", [{"target_far": 1e-2}, {"target_frr": 0.1}], ids=str)
def test_calibration_syncs_do_not_grow_with_n_or_chunks(target):
    counts = {}
    for n, chunks in ((200, 4), (400, 4), (400, 16)):
        x, y = _clustered(n)
        with CudaRules() as rules:
            calibrate_threshold(
                on_model_device(x), on_model_device(y), chunk_size=n // chunks, **target
            )
        counts[(n, chunks)] = len(rules.syncs())
    assert len(set(counts.values())) == 1, counts


def test_calculator_on_the_device_equals_cpu():
    x, y = _clustered(240)
    include = ("opis", "eps_opis")
    expected = OPISAccuracyCalculator(include=include, device=torch.device("cpu"))
    expected = expected.get_accuracy(x, y)
    calculator = OPISAccuracyCalculator(include=include, device=MODEL_DEVICE)
    with CudaRules() as rules:
        metrics = calculator.get_accuracy(on_model_device(x), on_model_device(y))
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert metrics == expected


def test_report_path_on_the_device_equals_cpu():
    x, y = _clustered(200)
    embeddings, labels = x.numpy(), y.numpy().astype(np.int64)
    expected = compute_report(embeddings, labels, device="cpu")
    with CudaRules() as rules:
        report = compute_report(embeddings, labels, device=MODEL_DEVICE)
    assert not rules.mismatches(), _describe(rules.mismatches())
    assert report.metrics == pytest.approx(expected.metrics, rel=1e-6)
    assert report.calibration.threshold == expected.calibration.threshold


# --------------------------------------------------------------------------- autocast


def _dense_tcm64(x, y, r, ry, pos_margin, neg_margin, pos_weight=1.0, neg_weight=1.0):
    """The TCM formula in float64, written out on dense matrices (reference)."""
    q = x.double() / x.double().norm(dim=1, keepdim=True)
    k = r.double() / r.double().norm(dim=1, keepdim=True)
    s = q @ k.T
    same = y[:, None] == ry[None, :]
    hard_pos, hard_neg = same & (s <= pos_margin), ~same & (s >= neg_margin)
    value = torch.zeros((), dtype=torch.float64)
    if hard_pos.any():
        value = value + pos_weight * (pos_margin - s[hard_pos]).mean()
    if hard_neg.any():
        value = value + neg_weight * (s[hard_neg] - neg_margin).mean()
    return value, int(hard_pos.sum()), int(hard_neg.sum())


def test_fp16_autocast_keeps_counts_above_65504():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    y = torch.randint(0, 2, (256,), generator=g)
    r = torch.randn(1024, 32, generator=g)
    ry = torch.randint(0, 2, (1024,), generator=g)
    leaf64 = x.double().requires_grad_()
    reference, num_pos, _ = _dense_tcm64(leaf64, y, r, ry, 0.9, 0.5, neg_weight=0.0)
    reference.backward()
    assert num_pos > 65504  # a float16 count would be inf

    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.float16):
        value = tcm_loss(leaf, y, r, ry, pos_margin=0.9, neg_margin=0.5, neg_weight=0.0)
    value.backward()
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(reference), rel=1e-5)
    assert leaf.grad.abs().max() > 0
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-4, atol=1e-9)


def test_bf16_autocast_selects_the_float64_hard_pairs():
    # Similarities spread over the margins: rounding them to bfloat16 (8 bits) would move
    # the pairs within ~0.004 of a margin to the other side.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 8, generator=g)
    y = torch.randint(0, 3, (96,), generator=g)
    regularizer = TCMRegularizer(pos_margin=0.3, neg_margin=0.1, collect_stats=True)
    _, num_pos, num_neg = _dense_tcm64(x, y, x, y, 0.3, 0.1)
    # the dense reference pairs each sample with itself too: remove those positives
    diagonal = (x.double() / x.double().norm(dim=1, keepdim=True)).square().sum(1)
    num_pos -= int((diagonal <= 0.3).sum())
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = regularizer(leaf, y)
    assert value.dtype == torch.float32
    assert int(regularizer.num_hard_pos_pairs) == num_pos
    assert int(regularizer.num_hard_neg_pairs) == num_neg
    leaf64 = x.double().requires_grad_()
    from naive_tcm import naive_tcm

    expected = naive_tcm(leaf64, y, pos_margin=0.3, neg_margin=0.1)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert math.isfinite(float(value))

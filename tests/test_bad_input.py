"""Bad or extreme input: a clear error naming the argument, or the value of the float64
reference — never NaN, a deep traceback or a silently wrong number."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive_tcm import naive_hard_pairs, naive_tcm

from pml_tcm import OPISAccuracyCalculator, TCMMiner, TCMRegularizer, calibrate_threshold
from pml_tcm.embedding_report import compute_report
from pml_tcm.functional import opis, tcm_loss

MARGINS = {"pos_margin": 0.5, "neg_margin": 0.1}


def _batch(n=40, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def _reference_opis(x: torch.Tensor, y: torch.Tensor) -> dict:
    """naive OPIS on the float64 cosine matrix of the rows (self pairs excluded)."""
    unit = x.double() / x.double().norm(dim=1, keepdim=True)
    return naive_opis((unit @ unit.T).numpy(), y.numpy(), y.numpy(), 0)


def _clustered(n=300, classes=5, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, d, generator=g, dtype=torch.float64)
    return centres[labels] * 0.7 + torch.randn(n, d, generator=g, dtype=torch.float64), labels


# --------------------------------------------------------------------------- scale


@pytest.mark.parametrize("scale", [1e-30, 1e-13, 1e19, 1e30])
def test_tcm_and_miner_do_not_depend_on_row_scale(scale):
    x, y = _batch()
    reference = naive_tcm(x, y, **MARGINS).item()
    scaled = (x * scale).float()
    assert torch.isfinite(scaled).all()
    assert TCMRegularizer(**MARGINS)(scaled, y).item() == pytest.approx(reference, rel=1e-5)
    hard_pos, hard_neg = naive_hard_pairs(x, y, **MARGINS)
    a1, p, a2, n = TCMMiner(**MARGINS)(scaled, y)
    assert set(zip(a1.tolist(), p.tolist())) == hard_pos
    assert set(zip(a2.tolist(), n.tolist())) == hard_neg


def test_float16_rows_with_a_norm_above_65504():
    x, y = _clustered()
    reference = _reference_opis(x, y)
    big = (x * 1e4).half()  # entries finite, squared norm far beyond float16
    assert torch.isfinite(big).all() and not torch.isfinite(big.float().norm(dim=1).half()).all()
    result = opis(big, y)
    assert result.opis == pytest.approx(reference["opis"], rel=0.05, abs=1e-5)
    assert result.calibration_range[0] == pytest.approx(
        calibrate_threshold(x.half(), y, target_far=1e-2).threshold, abs=2e-3
    )
    threshold = calibrate_threshold(big, y, target_far=1e-2).threshold
    expected = calibrate_threshold(x, y, target_far=1e-2).threshold
    assert threshold == pytest.approx(expected, abs=2e-3)
    assert threshold != 0.0


@pytest.mark.parametrize("scale", [1e-30, 1e20])
def test_opis_calibration_and_report_do_not_depend_on_row_scale(scale):
    x, y = _clustered()
    reference = _reference_opis(x, y)
    scaled = (x * scale).float()
    assert opis(scaled, y).opis == pytest.approx(reference["opis"], rel=1e-3)
    expected = calibrate_threshold(x, y, target_far=1e-2).threshold
    assert calibrate_threshold(scaled, y, target_far=1e-2).threshold == pytest.approx(
        expected, abs=1e-6
    )
    report = compute_report(scaled.numpy(), y.numpy())
    plain = compute_report(x.float().numpy(), y.numpy())
    assert report.metrics == pytest.approx(plain.metrics, rel=1e-4)
    assert report.metrics["opis"] > 0


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"beta": 1e154}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"num_thresholds": 10**9}, "num_thresholds"),
        ({"num_thresholds": True}, "num_thresholds"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"epsilon": 1.0}, "epsilon"),
        ({"far_range": (0.0, 0.1)}, "far_range"),
    ],
)
def test_opis_settings_are_checked_before_anything_runs(settings, name):
    x, y = _clustered(n=50)
    with pytest.raises(ValueError, match=name):
        opis(x, y, **settings)
    with pytest.raises(ValueError, match=name):
        OPISAccuracyCalculator(**settings)


@pytest.mark.parametrize(
    "settings, name",
    [
        ({"pos_weight": 1e39}, "pos_weight"),
        ({"neg_weight": -1.0}, "neg_weight"),
        ({"pos_margin": True}, "pos_margin"),
        ({"neg_margin": math.nan}, "neg_margin"),
    ],
)
def test_tcm_settings_are_checked(settings, name):
    with pytest.raises(ValueError, match=name):
        TCMRegularizer(**settings)


def test_numpy_scalars_are_accepted_as_numbers():
    x, y = _clustered(n=120)
    expected = opis(x, y, far_range=(0.01, 0.1), beta=2.0, num_thresholds=50)
    got = opis(
        x,
        y,
        far_range=(np.float32(0.01), np.float64(0.1)),
        beta=np.float32(2.0),
        num_thresholds=np.int64(50),
        chunk_size=np.int32(16),
    )
    assert got.opis == pytest.approx(expected.opis, rel=1e-6)
    regularizer = TCMRegularizer(pos_margin=np.float32(0.5), neg_weight=np.float64(0.5))
    assert regularizer.pos_margin == pytest.approx(0.5)
    report = calibrate_threshold(x, y, target_far=np.float32(0.01))
    assert report.threshold == calibrate_threshold(x, y, target_far=0.01).threshold


def test_huge_weights_that_are_accepted_stay_finite():
    x, y = _batch()
    value = TCMRegularizer(pos_weight=1e37, neg_weight=1e37, **MARGINS)(x.float(), y)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(1e37 * naive_tcm(x, y, **MARGINS).item(), rel=1e-5)


# --------------------------------------------------------------------------- property


# powers of two: the scaled rows are the same numbers up to the exponent, so the result
# must not move at all (other scales round the entries, and OPIS on a dozen pairs jumps
# when a rounded pair crosses the calibrated threshold)
finite_scales = st.sampled_from([2.0**-115, 2.0**-60, 2.0**-20, 1.0, 2.0**20, 2.0**60, 2.0**115])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 12),
    d=st.integers(0, 5),
    classes=st.integers(1, 4),
    scale=finite_scales,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    label_dtype=st.sampled_from([torch.int8, torch.int64, torch.bool, torch.float32]),
    pos_margin=st.floats(-2, 2),
    neg_margin=st.floats(-2, 2),
    seed=st.integers(0, 2**16),
)
def test_public_tcm_api_errors_clearly_or_matches_float64(
    n, d, classes, scale, dtype, label_dtype, pos_margin, neg_margin, seed
):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, d, generator=g, dtype=torch.float64) * scale
    labels = torch.randint(0, classes, (n,), generator=g).to(label_dtype)
    x = x64.to(dtype)
    try:
        value = TCMRegularizer(pos_margin=pos_margin, neg_margin=neg_margin)(x, labels)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(
            word in message for word in ("pos_margin", "neg_margin", "embeddings", "labels", "row")
        ), message
        return
    assert torch.isfinite(value)
    # the reference sees the rows as the model produced them (after the dtype cast)
    reference = naive_tcm(x.double(), labels.long(), pos_margin=pos_margin, neg_margin=neg_margin)
    assert value.item() == pytest.approx(reference.item(), abs=1e-4, rel=1e-3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 30),
    classes=st.integers(1, 5),
    scale=finite_scales,
    beta=st.sampled_from([1e-3, 0.5, 1.0, 4.0, 1e120]),
    num_thresholds=st.sampled_from([1, 2, 17]),
    seed=st.integers(0, 2**16),
)
def test_public_opis_api_errors_clearly_or_matches_float64(
    n, classes, scale, beta, num_thresholds, seed
):
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(n, 6, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    settings_ = {"beta": beta, "num_thresholds": num_thresholds}
    try:
        result = opis((x64 * scale).float(), labels, **settings_)
    except ValueError as error:
        assert any(w in str(error) for w in ("beta", "num_thresholds", "empty", "queries"))
        return
    assert math.isfinite(result.opis) and math.isfinite(result.eps_opis)
    reference = opis(x64.float(), labels, **settings_)
    assert result.opis == pytest.approx(reference.opis, rel=1e-4, abs=1e-9)
    assert result.eps_opis == pytest.approx(reference.eps_opis, rel=1e-4, abs=1e-9)


def test_tcm_loss_functional_with_mismatched_reference():
    x, y = _batch()
    with pytest.raises(ValueError, match="ref_labels"):
        tcm_loss(x, y, x[:5])


@pytest.mark.parametrize(
    "indices, phrase",
    [
        (
            (torch.tensor([0, 1]), torch.tensor([2, 99]), torch.tensor([0]), torch.tensor([5])),
            "positives (p) must lie in [0, 40)",
        ),
        (
            (torch.tensor([-1]), torch.tensor([2]), torch.tensor([0]), torch.tensor([5])),
            "anchors (a1)",
        ),
        (
            (torch.tensor([0.0]), torch.tensor([2]), torch.tensor([0]), torch.tensor([5])),
            "1-D integer",
        ),
        (
            (torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([0]), torch.tensor([5])),
            "same lengths",
        ),
        ((torch.tensor([0]), torch.tensor([2])), "indices_tuple must be"),
    ],
)
def test_bad_indices_tuple_is_a_clear_error(indices, phrase):
    x, y = _batch()
    with pytest.raises(ValueError) as error:
        TCMRegularizer(**MARGINS)(x, y, indices)
    assert phrase in str(error.value)

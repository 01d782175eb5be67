"""Input checks that raise a ``ValueError`` naming the offending argument.

Shape and range checks are free. :func:`check_embeddings_values` reads one boolean back
from the device (a host-device synchronisation); callers on a hot path can skip it.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

MAX_WEIGHT = 1e37
"""Largest TCM weight: each part is at most ``2 * weight``, and the term must stay finite
in float32."""
MAX_BETA = 1e100
"""Largest β: ``(1 + β²)`` times a pair count must stay finite in float64."""
MAX_THRESHOLDS = 1_000_000
"""Largest OPIS grid (a resolution of 1e-6 of the calibration range)."""


def is_real(value: object) -> bool:
    """A real number (Python or numpy int/float), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_chunk_size(chunk_size: object) -> None:
    """``chunk_size`` is ``None`` or a positive integer."""
    if chunk_size is not None and (not is_integer(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def check_embeddings_shape(embeddings: Tensor, name: str = "embeddings") -> None:
    """Require a 2-D floating-point tensor."""
    if not isinstance(embeddings, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(embeddings).__name__}")
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (num_samples, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {embeddings.dtype}")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0: cosine similarity is undefined")


def check_labels(labels: Tensor, num_samples: int, name: str = "labels") -> None:
    """Require 1-D integer (or bool) labels, one per sample."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (num_samples,), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must hold integer class ids, got {labels.dtype}")
    if labels.shape[0] != num_samples:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but there are {num_samples} embeddings"
        )


VALUE_CHECK_BYTES = 1 << 24
"""Rows checked at a time by :func:`check_embeddings_values` (its temporaries stay this
small: ``torch.isfinite`` of a whole set costs several times the set)."""


def check_embeddings_values(
    embeddings: Tensor, name: str = "embeddings", *, require_direction: bool = True
) -> None:
    """Reject NaN/Inf entries and (with ``require_direction``) zero-norm rows (cosine
    similarity is undefined there). ``embeddings``: ``(N, D)``.

    Checked a block of rows at a time; one host-device synchronisation on the happy path.
    """
    if embeddings.numel() == 0:
        return
    rows = embeddings.shape[0]
    finite_rows = torch.empty(rows, dtype=torch.bool, device=embeddings.device)
    nonzero_rows = torch.ones_like(finite_rows)
    step = max(1, VALUE_CHECK_BYTES // (embeddings[0].numel() * embeddings.element_size()))
    for start in range(0, rows, step):
        block = embeddings[start : start + step]
        torch.all(torch.isfinite(block), dim=1, out=finite_rows[start : start + step])
        if require_direction:
            torch.any(block != 0, dim=1, out=nonzero_rows[start : start + step])
    if bool((finite_rows & nonzero_rows).all()):
        return
    if not bool(finite_rows.all()):
        row = int((~finite_rows).nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or Inf (first at row {row})")
    row = int((~nonzero_rows).nonzero()[0, 0])
    raise ValueError(
        f"{name} has a zero-norm row (row {row}); cosine similarity is undefined for it"
    )


def check_margins(pos_margin: float, neg_margin: float) -> None:
    """Both margins are cosine similarities in [-1, 1] and ``pos_margin >= neg_margin``."""
    for name, value in (("pos_margin", pos_margin), ("neg_margin", neg_margin)):
        if not is_real(value) or not math.isfinite(float(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [-1, 1], got {value}")
    if pos_margin < neg_margin:
        raise ValueError(f"pos_margin ({pos_margin}) must be >= neg_margin ({neg_margin})")


def check_weight(value: float, name: str) -> None:
    """A loss weight is a number in ``[0, MAX_WEIGHT]``."""
    if not is_real(value) or not math.isfinite(value) or not 0 <= value <= MAX_WEIGHT:
        raise ValueError(
            f"{name} must be a number in [0, {MAX_WEIGHT:g}] (the term stays finite in "
            f"float32), got {value!r}"
        )


def check_opis_settings(
    calibration_range: tuple[float, float] | None,
    far_range: tuple[float, float],
    num_thresholds: int,
    beta: float,
    epsilon: float,
) -> None:
    """OPIS settings: an ordered finite ``calibration_range`` (or ``None``), FAR bounds
    with ``0 < far_lo <= far_hi <= 1``, ``num_thresholds >= 2``, ``beta > 0`` and
    ``0 < epsilon < 1``.

    Raises:
        ValueError: naming the offending argument.
    """

    is_number = is_real
    if calibration_range is not None:
        if (
            not isinstance(calibration_range, (tuple, list))
            or len(calibration_range) != 2
            or not all(is_number(x) and math.isfinite(x) for x in calibration_range)
        ):
            raise ValueError(
                f"calibration_range must be a pair of finite numbers, got {calibration_range!r}"
            )
        if calibration_range[0] > calibration_range[1]:
            raise ValueError(
                f"calibration_range must be (low, high) with low <= high, got {calibration_range}"
            )
    if (
        not isinstance(far_range, (tuple, list))
        or len(far_range) != 2
        or not all(is_number(x) and math.isfinite(x) for x in far_range)
    ):
        raise ValueError(f"far_range must be a pair of numbers, got {far_range!r}")
    if not (0 < far_range[0] <= 1 and 0 < far_range[1] <= 1):
        raise ValueError(f"far_range values must lie in (0, 1], got {far_range}")
    if far_range[0] > far_range[1]:
        raise ValueError(
            f"far_range must be (far_lo, far_hi) with far_lo <= far_hi, got {far_range}"
        )
    if not is_integer(num_thresholds) or not 2 <= num_thresholds <= MAX_THRESHOLDS:
        raise ValueError(
            f"num_thresholds must be an integer in [2, {MAX_THRESHOLDS}], got {num_thresholds!r}"
        )
    if not is_number(beta) or not 0 < float(beta) <= MAX_BETA:
        raise ValueError(
            f"beta must lie in (0, {MAX_BETA:g}] (F-beta weighs counts by 1 + beta**2), "
            f"got {beta!r}"
        )
    if not is_number(epsilon) or not 0 < epsilon < 1:
        raise ValueError(f"epsilon must lie in (0, 1), got {epsilon!r}")

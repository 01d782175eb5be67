"""Unit-norm rows for any finite row, whatever its scale.

Cosine similarity does not depend on a row's length, but ``F.normalize`` does in floating
point: a row whose squared norm overflows (float32 entries around 1e19, float16 rows with
norm above 65504) becomes zero, and one whose norm is below ``F.normalize``'s ``eps``
(1e-12) is divided by ``eps`` instead of its norm. Each row is therefore first scaled by a
power of two that brings its largest entry near 1 — exact, as it only shifts exponents —
and normalised after.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rescale_rows(rows: Tensor) -> Tensor:
    """``rows`` times a power of two per row, so that each row's largest ``|entry|`` lies in
    about ``[0.5, 2)``; zero rows stay zero. Exact (exponent shifts), no host sync, and a
    constant for the gradient (cosine similarity is scale invariant). ``(N, D) -> (N, D)``.
    """
    with torch.no_grad():
        largest = rows.detach().abs().amax(dim=1, keepdim=True)
        largest = torch.where(largest > 0, largest, torch.ones_like(largest))
        exponent = torch.floor(torch.log2(largest.double()))
        # two factors, each a normal number even for the extreme exponents of the dtype
        first = torch.floor(exponent / 2)
        scale_a = torch.exp2(-first).to(rows.dtype)
        scale_b = torch.exp2(first - exponent).to(rows.dtype)
    return rows * scale_a * scale_b


def unit_rows(rows: Tensor) -> Tensor:
    """Rows divided by their Euclidean norm, computed in the rows' dtype (zero rows stay
    zero). ``(N, D) -> (N, D)``."""
    return F.normalize(rescale_rows(rows), dim=1)


BLOCK_BYTES = 2 << 20
"""Rows normalised per step by :func:`unit_rows_into` (its temporaries stay this small)."""


def unit_rows_into(rows: Tensor, out: Tensor | None = None) -> Tensor:
    """:func:`unit_rows` of ``rows`` written into ``out`` (``rows`` itself when ``None``:
    in place) a block of rows at a time, so that no ``(N, D)`` temporary stands beside the
    result; row for row the same values. ``out``: ``(N, D)``, any device and float dtype
    (each block is converted to it first). Returns ``out``."""
    out = rows if out is None else out
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.element_size()))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(device=out.device, dtype=out.dtype)
        out[start : start + step] = unit_rows(block)
    return out

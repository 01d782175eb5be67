"""Threshold-Consistent Margin (TCM) term and hard-pair mining, as pure tensor math.

For queries ``x_i`` (labels ``y_i``), references ``r_j`` (labels ``z_j``) and cosine
similarity ``S_ij``::

    TCM = pos_weight * sum_{y_i = z_j, S_ij <= m+} (m+ - S_ij) / #{y_i = z_j, S_ij <= m+}
        + neg_weight * sum_{y_i != z_j, S_ij >= m-} (S_ij - m-) / #{y_i != z_j, S_ij >= m-}

An empty part is 0; the counts are constants for the gradient. Similarities are
compared as values in [-1, 1]: ``m+ = 1`` makes every positive pair hard and ``m- = -1``
every negative pair, whatever the rounding of an identical pair. Everything is computed
from one similarity matrix: memory is ``O(N*M)`` scalars, never ``O(N*M*D)``, and nothing is
read back to the host, so the term runs under ``torch.compile`` without graph breaks.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .normalize import unit_rows
from .pairs import pair_masks

PairIndices = tuple[Tensor, Tensor, Tensor, Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def normalize(embeddings: Tensor) -> Tensor:
    """Unit-norm rows in the accumulation dtype, exact for any finite row (see
    :mod:`pml_tcm.functional.normalize`). ``(N, D) -> (N, D)``."""
    return unit_rows(embeddings.to(accumulation_dtype(embeddings.dtype)))


def _normalize_references(references: Tensor, queries: Tensor) -> Tensor:
    """Unit-norm reference rows in the dtype of the normalised ``queries`` (the
    embeddings' accumulation dtype), so that mixed dtypes meet in one matmul: float64
    references against float32 embeddings are cast to float32. ``(M, D) -> (M, D)``."""
    return unit_rows(references.to(queries.dtype))


_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on ``device``: inside, TCM computes in its accumulation dtype.

    Under fp16 autocast the similarity matrix and the hard-pair counts would be float16
    (a count above 65504 becomes inf); under bf16 the similarities would be rounded to 8
    bits, moving pairs across the margins. (A plain device-type test: torch.compile
    cannot trace ``torch.amp.is_autocast_available``.)
    """
    if device.type in _AUTOCAST_DEVICES:
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _comparison_bounds(pos_margin: float, neg_margin: float) -> tuple[float, float]:
    # Cosine similarity lies in [-1, 1] but rounding can put an identical pair at
    # 1 + 2e-16; a margin at the end of the range therefore accepts every pair.
    pos_bound = math.inf if pos_margin >= 1.0 else pos_margin
    neg_bound = -math.inf if neg_margin <= -1.0 else neg_margin
    return pos_bound, neg_bound


def hard_pair_masks(
    sims: Tensor,
    labels: Tensor,
    ref_labels: Tensor,
    pos_margin: float,
    neg_margin: float,
    self_offset: int | None = None,
    self_columns: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Hard positive (``S <= pos_margin``) and hard negative (``S >= neg_margin``) masks.

    Args:
        sims: ``(N, M)`` cosine similarities.
        labels: ``(N,)`` query labels.
        ref_labels: ``(M,)`` reference labels.
        pos_margin: m+; positives at or below it are hard.
        neg_margin: m-; negatives at or above it are hard.
        self_offset: see :func:`pml_tcm.functional.pairs.pair_masks`.
        self_columns: see :func:`pml_tcm.functional.pairs.pair_masks`.

    Returns:
        ``(hard_positive, hard_negative)``, each ``(N, M)`` bool.
    """
    pos_bound, neg_bound = _comparison_bounds(pos_margin, neg_margin)
    hard_positive, hard_negative = pair_masks(labels, ref_labels, self_offset, self_columns)
    hard_positive &= sims <= pos_bound
    hard_negative &= sims >= neg_bound
    return hard_positive, hard_negative


def count_true(mask: Tensor) -> Tensor:
    """Number of ``True`` entries of a 2-D mask, a 0-dim int64 tensor (no host sync).

    Counted in row blocks of about 2^22 entries: on CUDA an integer reduction of a bool
    tensor first casts all of it to int64, 8 bytes an entry (2 GiB for a 16384^2 mask).
    """
    rows = max(1, (1 << 22) // max(1, mask.shape[1]))
    if mask.shape[0] <= rows:
        return torch.count_nonzero(mask)
    return torch.stack([torch.count_nonzero(block) for block in mask.split(rows)]).sum()


def _part_coefficient(weight: float, count: Tensor, dtype: torch.dtype) -> Tensor:
    # weight / count, and 0 when there is no hard pair; a tensor, so no host sync.
    return weight / count.clamp_min(1).to(dtype)


@torch.no_grad()
def tcm_pair_weights(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor,
    ref_labels: Tensor,
    pos_margin: float,
    neg_margin: float,
    pos_weight: float,
    neg_weight: float,
    self_offset: int | None = None,
    pairs: PairIndices | None = None,
    self_columns: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The TCM term as ``sum(W * S) + constant``, a linear function of the similarities.

    Args:
        embeddings: ``(N, D)`` unit-norm queries.
        labels: ``(N,)`` query labels.
        ref_embeddings: ``(M, D)`` unit-norm references.
        ref_labels: ``(M,)`` reference labels.
        pos_margin, neg_margin, pos_weight, neg_weight: m+, m-, lambda+, lambda-.
        self_offset: see :func:`pml_tcm.functional.pairs.pair_masks`; ignored when
            ``pairs`` is given.
        pairs: optional explicit pairs ``(a1, p, a2, n)``: positive pairs ``(a1[k], p[k])``
            and negative pairs ``(a2[k], n[k])``; a pair listed twice counts twice.
        self_columns: see :func:`pml_tcm.functional.pairs.pair_masks`; ignored when
            ``pairs`` is given.

    Returns:
        ``(W, constant, num_hard_pos, num_hard_neg)``: ``W`` is ``(N, M)`` in the
        embeddings' dtype; the others are 0-dim.
    """
    sims = embeddings @ ref_embeddings.T
    dtype = sims.dtype
    if pairs is None:
        hard_positive, hard_negative = hard_pair_masks(
            sims, labels, ref_labels, pos_margin, neg_margin, self_offset, self_columns
        )
        num_pos, num_neg = count_true(hard_positive), count_true(hard_negative)
        pos_coef = _part_coefficient(pos_weight, num_pos, dtype)
        neg_coef = _part_coefficient(neg_weight, num_neg, dtype)
        # W over S's storage (S is not needed any more). mul/where take the 0-dim device
        # coefficients as tensor operands; masked_fill_ would read them back to the host.
        # (Each step in place: mul(mask, coef, out=) would cast the mask through an N x M
        # temporary.)
        weights = sims.copy_(hard_positive).mul_(-pos_coef)
        torch.where(hard_negative, neg_coef, weights, out=weights)
    else:
        anchors_pos, positives, anchors_neg, negatives = pairs
        pos_sims = sims[anchors_pos, positives]
        neg_sims = sims[anchors_neg, negatives]
        pos_bound, neg_bound = _comparison_bounds(pos_margin, neg_margin)
        hard_pos = pos_sims <= pos_bound
        hard_neg = neg_sims >= neg_bound
        num_pos, num_neg = torch.count_nonzero(hard_pos), torch.count_nonzero(hard_neg)
        pos_coef = _part_coefficient(pos_weight, num_pos, dtype)
        neg_coef = _part_coefficient(neg_weight, num_neg, dtype)
        weights = sims.zero_()
        weights.index_put_(
            (anchors_pos, positives), -pos_coef * hard_pos.to(dtype), accumulate=True
        )
        weights.index_put_((anchors_neg, negatives), neg_coef * hard_neg.to(dtype), accumulate=True)
    constant = pos_weight * pos_margin * (num_pos > 0).to(dtype) - neg_weight * neg_margin * (
        num_neg > 0
    ).to(dtype)
    return weights, constant, num_pos, num_neg


def tcm_loss(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    pos_margin: float = 0.9,
    neg_margin: float = 0.5,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    pairs: PairIndices | None = None,
) -> Tensor:
    """The TCM regularization term.

    Args:
        embeddings: ``(N, D)`` float16/bfloat16/float32/float64; need not be normalised.
        labels: ``(N,)`` integer labels.
        ref_embeddings: ``(M, D)`` references, or ``None`` to pair the batch with itself
            (self pairs excluded); cast to the embeddings' accumulation dtype (float64
            references against float32 embeddings are computed in float32).
        ref_labels: ``(M,)`` reference labels; required with ``ref_embeddings``.
        pos_margin: m+; positive pairs with similarity at or below it are hard.
        neg_margin: m-; negative pairs with similarity at or above it are hard.
        pos_weight: lambda+, weight of the hard-positive part.
        neg_weight: lambda-, weight of the hard-negative part.
        pairs: optional explicit pairs ``(a1, p, a2, n)`` (indices into the queries and
            the references); only these pairs are considered.

    Returns:
        0-dim tensor, float64 for float64 input and float32 otherwise. Its gradient flows
        to ``embeddings`` and ``ref_embeddings``.

    No value checks here (see :mod:`pml_tcm.functional.validation`): this function
    never synchronises with the device.
    """
    return tcm_loss_and_counts(
        embeddings,
        labels,
        ref_embeddings,
        ref_labels,
        pos_margin,
        neg_margin,
        pos_weight,
        neg_weight,
        pairs,
    )[0]


def tcm_loss_and_counts(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    pos_margin: float = 0.9,
    neg_margin: float = 0.5,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    pairs: PairIndices | None = None,
    self_columns: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tcm_loss` plus the numbers of hard positive and hard negative pairs.

    ``self_columns`` (``(N,)`` int64, with ``ref_embeddings``): the reference index of
    each query's own copy, left out like a self pair (see
    :func:`pml_tcm.functional.pairs.pair_masks`).

    Autocast is switched off inside: similarities, counts and the result stay in the
    accumulation dtype (float32, or float64 for float64 input).
    """
    with full_precision(embeddings.device):
        queries = normalize(embeddings)
        if ref_embeddings is None:
            references, ref_labels, self_offset = queries, labels, 0
        else:
            if ref_labels is None:
                raise ValueError("ref_labels is required when ref_embeddings is given")
            references, self_offset = _normalize_references(ref_embeddings, queries), None
        weights, constant, num_pos, num_neg = tcm_pair_weights(
            queries.detach(),
            labels,
            references.detach(),
            ref_labels,
            pos_margin,
            neg_margin,
            pos_weight,
            neg_weight,
            self_offset,
            pairs,
            None if ref_embeddings is None else self_columns,
        )
        # sum_ij W_ij <q_i, r_j> written as sum_i <q_i, (W r)_i>: W is saved once for the
        # backward pass and no (N, M) gradient is ever built.
        loss = (queries * (weights @ references)).sum() + constant
        return loss, num_pos, num_neg


@torch.no_grad()
def tcm_hard_pairs(
    embeddings: Tensor,
    labels: Tensor,
    ref_embeddings: Tensor | None = None,
    ref_labels: Tensor | None = None,
    pos_margin: float = 0.9,
    neg_margin: float = 0.5,
) -> PairIndices:
    """Indices of the pairs the TCM term penalises, as pml's ``(a1, p, a2, n)``.

    Args: as :func:`tcm_loss`.

    Returns:
        Four ``(P,)`` int64 tensors: hard positive pairs ``(a1, p)`` (same label,
        ``S <= pos_margin``) and hard negative pairs ``(a2, n)`` (``S >= neg_margin``).
    """
    if ref_embeddings is not None and ref_labels is None:
        raise ValueError("ref_labels is required when ref_embeddings is given")
    with full_precision(embeddings.device):
        queries = normalize(embeddings)
        if ref_embeddings is None:
            references, ref_labels, self_offset = queries, labels, 0
        else:
            references, self_offset = _normalize_references(ref_embeddings, queries), None
        hard_positive, hard_negative = hard_pair_masks(
            queries @ references.T, labels, ref_labels, pos_margin, neg_margin, self_offset
        )
    anchors_pos, positives = torch.nonzero(hard_positive, as_tuple=True)
    anchors_neg, negatives = torch.nonzero(hard_negative, as_tuple=True)
    return anchors_pos, positives, anchors_neg, negatives

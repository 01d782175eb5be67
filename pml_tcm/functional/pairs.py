"""Pair conventions shared by TCM, the TCM miner and OPIS.

A *pair* is (query ``i``, reference ``j``). When the reference set is the query set
itself, a sample is never paired with itself: the pair ``(i, i + self_offset)`` is
neither positive nor negative. ``self_offset`` is the position of query 0 in the
reference set, so a chunk of queries ``[s, e)`` of a set compared against the whole set
uses ``self_offset=s``; ``None`` means the two sets are distinct.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_masks(
    labels: Tensor,
    ref_labels: Tensor,
    self_offset: int | None = None,
    self_columns: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Positive and negative pair masks.

    Args:
        labels: ``(N,)`` integer labels of the queries.
        ref_labels: ``(M,)`` integer labels of the references.
        self_offset: where query 0 sits in the reference set when the queries are part
            of it (its self pairs are excluded), or ``None`` for distinct sets.
        self_columns: ``(N,)`` int64, the reference index of each query's own copy (a
            memory slot), excluded like a self pair; for references that hold the
            queries at arbitrary positions. Its pairs must be positive (same label).

    Returns:
        ``(positive, negative)``, each ``(N, M)`` bool: same label and not a self pair;
        different label.
    """
    positive = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    negative = ~positive
    if self_offset is not None:
        self_pair_diagonal(positive, self_offset).fill_(False)
    if self_columns is not None:
        rows = torch.arange(labels.shape[0], device=positive.device)
        positive[rows, self_columns] = False  # index_put_: no host sync
    return positive, negative


def self_pair_diagonal(matrix: Tensor, self_offset: int) -> Tensor:
    """The view of an ``(N, M)`` matrix holding the self pairs ``(i, i + self_offset)``."""
    return torch.diagonal(matrix, offset=self_offset)


def self_pair_columns(rows: Tensor, self_offset: int) -> Tensor:
    """Reference index of each query row's self pair, for pairs given as index lists.

    Args:
        rows: ``(P,)`` int64 query indices (relative to the block that ``self_offset``
            refers to).
        self_offset: see :func:`pair_masks`.

    Returns:
        ``(P,)`` int64 ``rows + self_offset``: a pair ``(row, column)`` is a self pair
        exactly when ``column`` equals it.
    """
    return rows + self_offset

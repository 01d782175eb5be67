"""Naive per-pair TCM reference for the tests: loops over pairs, one dot product each."""

from __future__ import annotations

import torch
from torch import Tensor


def all_pairs(labels: list[int], ref_labels: list[int], exclude_self: bool):
    positives, negatives = [], []
    for i, yi in enumerate(labels):
        for j, yj in enumerate(ref_labels):
            if exclude_self and i == j:
                continue
            (positives if yi == yj else negatives).append((i, j))
    return positives, negatives


def naive_tcm(
    embeddings: Tensor,
    labels: Tensor,
    ref_emb: Tensor | None = None,
    ref_labels: Tensor | None = None,
    pos_margin: float = 0.9,
    neg_margin: float = 0.5,
    pos_weight: float = 1.0,
    neg_weight: float = 1.0,
    pairs=None,
) -> Tensor:
    """The TCM formula of the paper, term by term (differentiable)."""
    refs = embeddings if ref_emb is None else ref_emb
    ref_ys = labels if ref_labels is None else ref_labels
    if pairs is None:
        positives, negatives = all_pairs(labels.tolist(), ref_ys.tolist(), ref_emb is None)
    else:
        a1, p, a2, n = (t.tolist() for t in pairs)
        positives, negatives = list(zip(a1, p)), list(zip(a2, n))

    def cosine(i: int, j: int) -> Tensor:
        u, v = embeddings[i], refs[j]
        return ((u @ v) / (u.norm() * v.norm())).clamp(-1.0, 1.0)

    pos_terms = [pos_margin - s for s in (cosine(i, j) for i, j in positives) if s <= pos_margin]
    neg_terms = [s - neg_margin for s in (cosine(i, j) for i, j in negatives) if s >= neg_margin]
    zero = embeddings.sum() * 0
    pos_part = torch.stack(pos_terms).mean() if pos_terms else zero
    neg_part = torch.stack(neg_terms).mean() if neg_terms else zero
    return pos_weight * pos_part + neg_weight * neg_part


def naive_hard_pairs(
    embeddings, labels, ref_emb=None, ref_labels=None, pos_margin=0.9, neg_margin=0.5
):
    """Hard pairs as two sets of (i, j)."""
    refs = embeddings if ref_emb is None else ref_emb
    ref_ys = labels if ref_labels is None else ref_labels
    positives, negatives = all_pairs(labels.tolist(), ref_ys.tolist(), ref_emb is None)

    def cosine(i: int, j: int) -> float:
        u, v = embeddings[i].double(), refs[j].double()
        return float(((u @ v) / (u.norm() * v.norm())).clamp(-1.0, 1.0))

    hard_pos = {(i, j) for i, j in positives if cosine(i, j) <= pos_margin}
    hard_neg = {(i, j) for i, j in negatives if cosine(i, j) >= neg_margin}
    return hard_pos, hard_neg

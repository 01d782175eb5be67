"""One global threshold for deployment and its per-class error rates, as tensor math.

Pairs, self pairs and matching follow :mod:`pml_tcm.functional.opis`: a pair matches at
threshold ``t`` when its closeness score (similarity, or minus a distance) is ``>= t``.
For class ``c`` (the query's label): ``FAR_c(t) = FP_c(t) / negatives_c`` and
``FRR_c(t) = FN_c(t) / positives_c``.

* Target FAR ``f``: ``t`` is the k-th largest negative closeness, ``k = max(1, ⌈f·n_neg⌉)``
  (the definition of the OPIS calibration range; found exactly by the same streamed
  search). Its pooled FAR is ``>= f`` (equal up to ties and rounding of ``f · n_neg``).
* Target FRR ``r``: ``t`` is the k-th smallest positive closeness with
  ``k = ⌊r · n_pos⌋ + 1``: the highest threshold that rejects at most ``r · n_pos``
  positive pairs (pooled FRR ``<= r``). Positive scores are collected exactly (there are
  ``sum_c n_c²`` of them, far fewer than all pairs).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import Tensor

from .opis import (
    ScoreFn,
    _all_gather_values,
    _all_reduce,
    _far_closeness_thresholds,
    _pair_totals,
    _PairStream,
    ceil_fraction_of,
    cosine_similarity_scores,
    global_classes,
)
from .pairs import pair_masks


def class_error_counts(
    stream: _PairStream, closeness_threshold: float, distributed: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class: ``(false_accepts, false_rejects, negatives, positives)``, ``(C,)`` int64."""
    num_classes = stream.classes.shape[0]
    device = stream.queries.device
    false_accepts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    true_accepts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for start, end in stream.chunks():
        values, class_index, is_positive = stream.pairs_at_or_above(closeness_threshold, start, end)
        accepted = values.to(torch.float64) >= closeness_threshold
        true_accepts += torch.bincount(class_index[accepted & is_positive], minlength=num_classes)
        false_accepts += torch.bincount(class_index[accepted & ~is_positive], minlength=num_classes)
    positives, negatives = _pair_totals(stream)
    for tensor in (false_accepts, true_accepts):
        _all_reduce(tensor, distributed)
    _all_reduce(positives, distributed)
    _all_reduce(negatives, distributed)
    return false_accepts, positives - true_accepts, negatives, positives


def positive_scores(stream: _PairStream, distributed: bool = False) -> Tensor:
    """All positive-pair closeness scores (1-D, unordered), over all ranks."""
    out = []
    for start, end in stream.chunks():
        scores = stream.scores(start, end)
        offset = None if stream.self_offset is None else stream.self_offset + start
        positive, _ = pair_masks(stream.query_labels[start:end], stream.reference_labels, offset)
        out.append(scores[positive])
    values = torch.cat(out) if out else stream.queries.new_zeros(0)
    return _all_gather_values(values, distributed)


def calibrate_closeness_threshold(
    queries: Tensor,
    query_labels: Tensor,
    references: Tensor,
    reference_labels: Tensor,
    *,
    target_far: float | None,
    target_frr: float | None,
    self_offset: int | None,
    score_fn: ScoreFn = cosine_similarity_scores,
    higher_is_closer: bool = True,
    chunk_size: int | None = None,
    distributed: bool = False,
) -> tuple[float, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The closeness threshold for a target FAR or FRR and the per-class error counts.

    Inputs must already be checked (see :func:`pml_tcm.calibrate_threshold`).

    Returns:
        ``(closeness_threshold, classes, (false_accepts, false_rejects, negatives,
        positives))``, the counts ``(C,)`` int64 per class.

    Raises:
        ValueError: no negative pair for a target FAR, no positive pair for a target FRR.
    """
    classes = global_classes(query_labels, distributed)
    stream = _PairStream(
        queries,
        query_labels,
        references,
        reference_labels,
        classes,
        self_offset,
        score_fn,
        higher_is_closer,
        chunk_size,
    )
    positives, negatives = _pair_totals(stream)
    if target_far is not None:
        num_negatives = int(_all_reduce(negatives.sum().reshape(1), distributed))
        if num_negatives == 0:
            raise ValueError("target_far: there is no negative pair (a single class)")
        rank = max(1, ceil_fraction_of(target_far, num_negatives))
        (threshold,), _, _ = _far_closeness_thresholds(
            stream, [rank], num_negatives, distributed, 1 << 24, 0, 0
        )
    else:
        values = positive_scores(stream, distributed)
        if values.numel() == 0:
            raise ValueError("target_frr: there is no positive pair")
        k = math.floor(Fraction(repr(float(target_frr))) * values.numel()) + 1
        if k > values.numel():
            threshold = math.inf  # reject everything (target_frr = 1)
        else:
            threshold = float(torch.kthvalue(values.cpu(), k).values)
    counts = class_error_counts(stream, threshold, distributed)
    return threshold, classes, counts

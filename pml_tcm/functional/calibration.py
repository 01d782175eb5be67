"""One global threshold for deployment and its per-class error rates, as tensor math.

Pairs and self pairs follow :mod:`pml_tcm.functional.streaming`; a pair matches at
threshold ``t`` when its closeness score (similarity, or minus a distance) is ``>= t``.
For class ``c`` (the query's label): ``FAR_c(t) = FP_c(t) / negatives_c`` and
``FRR_c(t) = FN_c(t) / positives_c``.

* Target FAR ``f``: ``t`` is the k-th largest negative closeness, ``k = max(1, ⌈f·n_neg⌉)``
  (the definition of the OPIS calibration range; found exactly by the same streamed
  search, :mod:`pml_tcm.functional.far_search`). Its pooled FAR is ``>= f`` (equal up to
  ties and rounding of ``f · n_neg``).
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

from .collectives import all_gather_values, all_reduce, global_classes
from .far_search import far_closeness_thresholds, far_rank, num_negative_pairs
from .streaming import PairStream, ScoreFn, ceil_to_dtype, cosine_similarity_scores


def class_error_counts(
    stream: PairStream, closeness_threshold: float, distributed: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per class: ``(false_accepts, false_rejects, negatives, positives)``, ``(C,)`` int64."""
    num_classes = stream.classes.shape[0]
    device = stream.queries.device
    false_accepts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    true_accepts = torch.zeros(num_classes, dtype=torch.int64, device=device)
    for piece in stream.pieces():
        values, class_index, is_positive = stream.pairs_at_or_above(closeness_threshold, piece)
        true_accepts += torch.bincount(class_index[is_positive], minlength=num_classes)
        false_accepts += torch.bincount(class_index[~is_positive], minlength=num_classes)
    for slab in stream.positive_slabs():
        block, self_scores = stream.slab_scores(slab)
        limit = ceil_to_dtype(closeness_threshold, block.dtype)
        accepted = (block >= limit).sum() - (self_scores >= limit).sum()
        true_accepts[slab.class_index] += accepted
    positives, negatives = stream.pair_totals()
    for tensor in (false_accepts, true_accepts):
        all_reduce(tensor, distributed=distributed)
    all_reduce(positives, distributed=distributed)
    all_reduce(negatives, distributed=distributed)
    return false_accepts, positives - true_accepts, negatives, positives


def positive_scores(stream: PairStream, distributed: bool = False) -> Tensor:
    """All positive-pair closeness scores (1-D, unordered), over all ranks."""
    from .opis import _positive_values

    out = list(_positive_values(stream))
    values = torch.cat(out) if out else stream.queries.new_zeros(0)
    values = values[~torch.isnan(values)]
    return all_gather_values(values, distributed=distributed)


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
    classes = global_classes(query_labels, distributed=distributed)
    stream = PairStream(
        queries=queries,
        query_labels=query_labels,
        references=references,
        reference_labels=reference_labels,
        classes=classes,
        self_offset=self_offset,
        score_fn=score_fn,
        higher_is_closer=higher_is_closer,
        chunk_size=chunk_size,
    )
    if target_far is not None:
        num_negatives = num_negative_pairs(stream, distributed=distributed)
        if num_negatives == 0:
            raise ValueError("target_far: there is no negative pair (a single class)")
        search = far_closeness_thresholds(
            stream=stream,
            ranks=[far_rank(target_far, num_negatives)],
            num_negatives=num_negatives,
            distributed=distributed,
            collect_limit=1 << 24,
            retain_limit=0,
            seed=0,
        )
        (threshold,) = search.values
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

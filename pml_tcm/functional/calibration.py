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
  positive pairs (pooled FRR ``<= r``), found exactly by a radix selection over the
  streamed positive scores (:func:`kth_smallest_positive`: two passes, 2^16 counts, no
  score collected, so one huge class costs no more memory than many small ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import Tensor

from .collectives import all_gather_values, all_reduce, global_classes
from .counting import AcceptedCounts
from .far_search import COLLECT_LIMIT, far_closeness_thresholds, far_rank, num_negative_pairs
from .streaming import ChunkPairs, PairStream, ScoreFn, cosine_similarity_scores


@dataclass
class QueryErrors:
    """The pairs of each query at one threshold (one rank's queries, in the stream's
    order): what per-class and per-group rates are sums of, and what the bootstrap
    resamples.

    Attributes:
        false_accepts: ``(N,)`` int64 negative pairs ``>= threshold``.
        false_rejects: ``(N,)`` int64 positive pairs ``< threshold``.
        negatives: ``(N,)`` int64 negative pairs.
        positives: ``(N,)`` int64 positive pairs.
        classes: ``(N,)`` int64 the query's class index (into the stream's classes).
        groups: ``(N,)`` int64 the query's group id, or ``None`` without groups.
    """

    false_accepts: Tensor
    false_rejects: Tensor
    negatives: Tensor
    positives: Tensor
    classes: Tensor
    groups: Tensor | None = None

    @classmethod
    def of_stream(
        cls, stream: PairStream, false_accepts: Tensor, true_accepts: Tensor
    ) -> QueryErrors:
        """The errors of a stream's rows from their accepted negatives and positives."""
        positives, negatives = stream.query_pair_totals()
        return cls(
            false_accepts,
            positives - true_accepts,
            negatives,
            positives,
            stream.query_class,
            stream.query_group,
        )

    def counts(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(false_accepts, false_rejects, negatives, positives)``."""
        return self.false_accepts, self.false_rejects, self.negatives, self.positives

    def per(
        self, index: Tensor, size: int, distributed: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four counts summed per ``index`` value (``(N,)`` in ``[0, size)``), over all
        ranks when ``distributed``: ``(size,)`` int64 each."""
        stacked = torch.stack(self.counts())
        sums = stacked.new_zeros(4, size).index_add_(1, index, stacked)
        all_reduce(sums, distributed=distributed)
        return tuple(sums.unbind(0))

    def gathered(self, distributed: bool) -> QueryErrors:
        """Every rank's rows, concatenated in rank order (unchanged when not
        ``distributed``)."""
        if not distributed:
            return self
        fields = [*self.counts(), self.classes] + ([] if self.groups is None else [self.groups])
        out = [all_gather_values(f, distributed=True) for f in fields]
        return QueryErrors(*out[:5], out[5] if self.groups is not None else None)


def query_errors(
    stream: PairStream,
    closeness_threshold: float,
    retained: Iterable[ChunkPairs] | None = None,
) -> QueryErrors:
    """The :class:`QueryErrors` of this rank's queries at ``closeness_threshold``: from
    ``retained`` pairs (gathered at or below the threshold) or a pass over the pieces,
    then the large classes' positive slabs."""
    accepted = AcceptedCounts(stream, closeness_threshold)
    if stream.sync_free:
        for piece in stream.dense_pieces():
            for tile in stream.dense_tiles(piece):
                accepted.add_tile(tile)
        retained = ()
    elif retained is None:
        retained = (stream.scan(closeness_threshold, piece) for piece in stream.pieces())
    for pairs in retained:
        accepted.add(pairs)
    for slab in () if stream.sync_free else stream.positive_slabs():
        block, self_scores, _ = stream.slab_scores(slab)
        accepted.add_slab(slab, block, self_scores)
    return QueryErrors.of_stream(stream, *accepted.error_counts())


RADIX_BITS = 16
RADIX_TILE = 1 << 20


def sortable_keys(values: Tensor) -> Tensor:
    """int64 keys that order like the float values (float32 or float64; -0.0 just below
    +0.0): non-negative floats keep their bit pattern, negative ones map to
    ``-1 - magnitude bits``."""
    if values.dtype == torch.float64:
        bits = values.view(torch.int64)
        magnitude = bits & 0x7FFFFFFFFFFFFFFF
    else:
        bits = values.to(torch.float32).view(torch.int32).to(torch.int64)
        magnitude = bits & 0x7FFFFFFF
    return torch.where(bits >= 0, bits, -1 - magnitude)


def _key_value(key: int, dtype: torch.dtype) -> float:
    """The float whose :func:`sortable_keys` key is ``key``."""
    if dtype == torch.float64:
        bits = key if key >= 0 else (-1 - key) | (1 << 63)
        as_int = torch.tensor([bits - (1 << 64) if bits >= 1 << 63 else bits])
        return float(as_int.view(torch.float64))
    bits = key if key >= 0 else (-1 - key) | (1 << 31)
    as_int = torch.tensor([bits - (1 << 32) if bits >= 1 << 31 else bits], dtype=torch.int32)
    return float(as_int.view(torch.float32))


def _dense_radix_counts(
    stream: PairStream, counts: Tensor, prefix: int | None, shift: int, dtype: torch.dtype
) -> None:
    """One radix level of :func:`kth_smallest_positive` on a sync-free stream: every pair
    of every tile keyed, the positive ones with the prefix counted by one ``index_add_``
    per tile (no pair gathered, no host sync)."""
    for piece in stream.dense_pieces():
        for tile in stream.dense_tiles(piece):
            if tile.positive is None:
                continue
            keys = sortable_keys(tile.scores.to(dtype))
            counted = tile.positive & ~torch.isnan(tile.scores)
            if prefix is None:
                digits = (keys >> shift) + (1 << (RADIX_BITS - 1))
            else:
                counted &= (keys >> (shift + RADIX_BITS)) == prefix
                digits = (keys >> shift) & ((1 << RADIX_BITS) - 1)
            counts.index_add_(0, digits.view(-1), counted.view(-1).to(torch.int64))


def kth_smallest_positive(stream: PairStream, k: int, distributed: bool = False) -> float:
    """The exact ``k``-th smallest positive closeness (1-based), over all ranks, in
    bounded memory: a radix selection on :func:`sortable_keys`, 16 bits a pass (two
    passes over the positive pairs for float32 scores, four for float64), each pass one
    histogram of 2^16 counts; no score is collected."""
    dtype = torch.float64 if stream.queries.dtype == torch.float64 else torch.float32
    key_bits = 64 if dtype == torch.float64 else 32
    device = stream.queries.device
    prefix, rank = None, k
    for level in range(key_bits // RADIX_BITS):
        shift = key_bits - RADIX_BITS * (level + 1)
        counts = torch.zeros(1 << RADIX_BITS, dtype=torch.int64, device=device)
        if stream.sync_free:
            _dense_radix_counts(stream, counts, prefix, shift, dtype)
        for values in () if stream.sync_free else stream.positive_values():
            for tile in values.split(RADIX_TILE):  # bounded temporaries (int64 keys)
                keys = sortable_keys(tile[~torch.isnan(tile)].to(dtype))
                if prefix is not None:
                    keys = keys[(keys >> (shift + RADIX_BITS)) == prefix]
                # the top digit is signed (keys are): offset it into [0, 2^16)
                if prefix is None:
                    digits = (keys >> shift) + (1 << (RADIX_BITS - 1))
                else:
                    digits = (keys >> shift) & ((1 << RADIX_BITS) - 1)
                counts += torch.bincount(digits, minlength=1 << RADIX_BITS)
        all_reduce(counts, distributed=distributed)
        cumulative = counts.cumsum(0).cpu()
        digit = int(torch.searchsorted(cumulative, torch.tensor([rank]))[0])
        rank -= int(cumulative[digit - 1]) if digit else 0
        if prefix is None:
            prefix = digit - (1 << (RADIX_BITS - 1))
        else:
            prefix = (prefix << RADIX_BITS) | digit
    return _key_value(prefix, dtype)


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
    query_groups: Tensor | None = None,
    num_groups: int = 0,
    retain_limit: int = 1 << 27,
) -> tuple[float, Tensor, QueryErrors]:
    """The closeness threshold for a target FAR or FRR and each query's error counts.

    Inputs must already be checked (see :func:`pml_tcm.calibrate_threshold`). For a
    target FAR the pairs gathered by the exact search are counted again at the threshold
    when they fit ``retain_limit`` scores (else a second pass).

    Returns:
        ``(closeness_threshold, classes, errors)``: ``classes`` the ``(C,)`` sorted query
        class ids (over all ranks), ``errors`` this rank's :class:`QueryErrors`
        (``errors.classes`` index ``classes``).

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
        query_groups=query_groups,
        num_groups=num_groups,
    )
    retained = None
    if target_far is not None:
        num_negatives = num_negative_pairs(stream, distributed=distributed)
        if num_negatives == 0:
            raise ValueError("target_far: there is no negative pair (a single class)")
        search = far_closeness_thresholds(
            stream=stream,
            ranks=[far_rank(target_far, num_negatives)],
            num_negatives=num_negatives,
            distributed=distributed,
            collect_limit=COLLECT_LIMIT,
            retain_limit=retain_limit,
            seed=0,
        )
        (threshold,) = search.values
        if search.retained is not None and search.retained_floor <= threshold:
            retained = search.retained
    else:
        positives, _ = stream.pair_totals()
        num_positives = int(all_reduce(positives.sum().reshape(1), distributed=distributed))
        if num_positives == 0:
            raise ValueError("target_frr: there is no positive pair")
        k = math.floor(Fraction(repr(float(target_frr))) * num_positives) + 1
        if k > num_positives:
            threshold = math.inf  # reject everything (target_frr = 1)
        else:
            threshold = kth_smallest_positive(stream, k, distributed)
    return threshold, classes, query_errors(stream, threshold, retained)

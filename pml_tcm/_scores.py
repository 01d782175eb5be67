"""pml distances as score functions of the functional core (``score_fn``)."""

from __future__ import annotations

from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity

from .functional.streaming import ScoreFn, cosine_similarity_scores


def score_function(distance: BaseDistance) -> ScoreFn:
    """The score function for a pml distance.

    pml's plain CosineSimilarity is normalize + matmul: the functional default computes the
    same values and streams its blocks through one reused buffer. Any other distance is
    called as it is (``distance(queries, references)``).
    """
    if type(distance) is CosineSimilarity and distance.power == 1:
        return cosine_similarity_scores
    return distance


def needs_direction(distance: BaseDistance) -> bool:
    """Whether ``distance`` normalises rows (a zero-norm row then has no direction)."""
    return isinstance(distance, CosineSimilarity) or bool(distance.normalize_embeddings)

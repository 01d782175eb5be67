"""Pure tensor math of pml-tcm; imports nothing from pytorch-metric-learning.

One concept per module: ``tcm`` (the TCM term and its hard pairs), ``pairs`` (pair and
self-pair conventions), ``labels`` (dense class ids), ``normalize`` (unit rows),
``validation`` (input checks), ``opis`` (the OPIS metric), ``utility`` (F-β curves over
the grid and their means), ``streaming`` (pairs of query
chunks), ``counting`` (grid histograms), ``far_search`` (exact FAR thresholds),
``collectives`` (``torch.distributed``), ``calibration`` (one threshold for a target FAR
or FRR), ``retrieval`` (precision@1 and MAP@R in bounded memory).
"""

from .labels import dense_class_ids
from .opis import (
    OPISResult,
    OPISState,
    cosine_similarity_scores,
    opis,
    opis_compute,
    opis_update,
    threshold_grid,
)
from .pairs import pair_masks, self_pair_columns, self_pair_diagonal
from .retrieval import RETRIEVAL_METRICS, RetrievalMemoryError, retrieval_metrics
from .tcm import hard_pair_masks, tcm_hard_pairs, tcm_loss, tcm_loss_and_counts

__all__ = [
    "OPISResult",
    "OPISState",
    "cosine_similarity_scores",
    "dense_class_ids",
    "opis",
    "opis_compute",
    "opis_update",
    "threshold_grid",
    "hard_pair_masks",
    "pair_masks",
    "RETRIEVAL_METRICS",
    "RetrievalMemoryError",
    "retrieval_metrics",
    "self_pair_columns",
    "self_pair_diagonal",
    "tcm_hard_pairs",
    "tcm_loss",
    "tcm_loss_and_counts",
]

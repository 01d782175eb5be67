"""A drop-in for pml's ``losses.ThresholdConsistentMarginLoss``, on the functional core."""

from __future__ import annotations

import math
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from torch import Tensor

from . import _pml_checks
from .functional import tcm as tcm_functional
from .functional import validation


class ThresholdConsistentMarginLoss(BaseMetricLossFunction):
    """pml's ``losses.ThresholdConsistentMarginLoss`` (TCM, Zhang et al., ICLR 2024),
    same constructor, same call, computed from one similarity matrix.

    Replace ``from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss``
    by ``from pml_tcm.losses import ThresholdConsistentMarginLoss``; nothing else changes::

        loss_fn = ThresholdConsistentMarginLoss()       # lambda+ = lambda- = 1, m+ 0.9, m- 0.5
        loss = loss_fn(embeddings, labels)               # all pairs of the batch
        loss = loss_fn(embeddings, labels, miner(embeddings, labels))  # mined pairs/triplets
        loss = loss_fn(embeddings, labels, ref_emb=refs, ref_labels=ref_labels)

    The value is pml's: ``lambda_plus`` times the mean of ``margin_plus - S`` over the
    positive pairs with cosine similarity ``S <= margin_plus``, plus ``lambda_minus`` times
    the mean of ``S - margin_minus`` over the negative pairs with ``S >= margin_minus``
    (an empty part is 0). The pairs are pml's: all pairs (self pairs excluded when
    ``ref_labels`` is ``labels``, pml's convention), or those of ``indices_tuple``
    (pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``; a pair listed twice counts
    twice). Differences from pml's class:

    * with ``ref_emb``, pml reads the references' rows from ``embeddings`` (its
      ``embeddings[p]``/``embeddings[n]``); here they come from ``ref_emb``, as the
      formula says;
    * no per-pair gathers: one similarity matrix, memory O(N·M) scalars instead of
      O(pairs·D), and no host-device synchronisation;
    * float16/bfloat16 embeddings are accumulated, and the loss returned, in float32;
    * ``distance`` must be ``CosineSimilarity()`` with ``power=1`` (pml accepts any
      ``CosineSimilarity`` and ignores its ``power``).

    Like pml's loss it returns an already-reduced value (``"reduction_type":
    "already_reduced"``), so a ``reducer`` passes it through unchanged.

    pml's ``CrossBatchMemory`` and ``SelfSupervisedLoss`` refuse any loss of this class
    name (pml's list of supported losses goes by name), this one included. To use TCM
    there, attach it to a supported loss: ``CrossBatchMemory(with_tcm(loss), ...)`` (see
    :func:`pml_tcm.with_tcm`).

    Args:
        lambda_plus: weight of the hard-positive part.
        lambda_minus: weight of the hard-negative part.
        margin_plus: m+; positive pairs with similarity ``<= margin_plus`` are hard.
        margin_minus: m-; negative pairs with similarity ``>= margin_minus`` are hard.
        **kwargs: pml's ``BaseMetricLossFunction`` arguments (``reducer``, ``distance``,
            ``embedding_regularizer``, ``collect_stats``...).

    Raises:
        ValueError: a weight or margin that is not a finite number, or another distance.

    Recorded stats (with ``collect_stats=True``): ``num_hard_pos_pairs``,
    ``num_hard_neg_pairs`` (0-dim tensors).
    """

    def __init__(
        self,
        lambda_plus: float = 1.0,
        lambda_minus: float = 1.0,
        margin_plus: float = 0.9,
        margin_minus: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _pml_checks.check_cosine_distance(self.distance, "ThresholdConsistentMarginLoss")
        for name, value in (
            ("lambda_plus", lambda_plus),
            ("lambda_minus", lambda_minus),
            ("margin_plus", margin_plus),
            ("margin_minus", margin_minus),
        ):
            if not validation.is_real(value):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{name} must be finite, got {value!r}")
        self.lambda_plus = lambda_plus
        self.lambda_minus = lambda_minus
        self.margin_plus = margin_plus
        self.margin_minus = margin_minus
        self.add_to_recordable_attributes(
            list_of_names=["lambda_plus", "lambda_minus", "margin_plus", "margin_minus"],
            is_stat=False,
        )
        self.add_to_recordable_attributes(
            list_of_names=["num_hard_pos_pairs", "num_hard_neg_pairs"], is_stat=True
        )

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor | None,
        indices_tuple: tuple[Tensor, ...] | None,
        ref_emb: Tensor,
        ref_labels: Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        """pml's hook: ``ref_emb``/``ref_labels`` are the batch itself when not given.

        Args:
            embeddings: ``(N, D)`` floating-point embeddings.
            labels: ``(N,)`` labels; may be ``None`` when ``indices_tuple`` is given.
            indices_tuple: ``None``, pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``,
                indices into ``embeddings`` (anchors) and ``ref_emb`` (the others).
            ref_emb: ``(M, D)`` references.
            ref_labels: ``(M,)`` reference labels.
        """
        validation.check_embeddings_shape(embeddings, "embeddings")
        if ref_emb is not embeddings:
            validation.check_embeddings_shape(ref_emb, "ref_emb")
            if ref_emb.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"ref_emb has embedding size {ref_emb.shape[1]} but embeddings has "
                    f"{embeddings.shape[1]}"
                )
        if indices_tuple is None and (labels is None or ref_labels is None):
            raise ValueError(
                "ThresholdConsistentMarginLoss needs labels (and ref_labels with ref_emb), "
                "or an indices_tuple"
            )
        pairs = _pml_checks.as_pairs(indices_tuple, labels, ref_labels, embeddings.device)
        # pml's pairs: without indices_tuple, (i, i) is left out when ref_labels is
        # labels (the batch against itself, or a reference set of the same samples).
        self_pairs_left_out = indices_tuple is None and ref_labels is labels
        references, self_columns = ref_emb.to(embeddings.dtype), None
        if ref_emb is embeddings and (self_pairs_left_out or pairs is not None):
            references = ref_labels = None  # the batch against itself
        elif self_pairs_left_out:
            self_columns = torch.arange(embeddings.shape[0], device=embeddings.device)
        elif ref_labels is None:  # pairs given without labels: no label is read
            ref_labels = torch.zeros(ref_emb.shape[0], dtype=torch.int64, device=ref_emb.device)
        loss, num_pos, num_neg = tcm_functional.tcm_loss_and_counts(
            embeddings,
            labels,
            references,
            ref_labels,
            self.margin_plus,
            self.margin_minus,
            self.lambda_plus,
            self.lambda_minus,
            pairs,
            self_columns,
        )
        if self.collect_stats:
            self.num_hard_pos_pairs, self.num_hard_neg_pairs = num_pos, num_neg
        return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

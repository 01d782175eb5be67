"""TCMMiner: the hard pairs of the TCM term, as a pml pair miner."""

from __future__ import annotations

from typing import Any

from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor

from . import _pml_checks
from .functional import tcm as tcm_functional
from .functional import validation


class TCMMiner(BaseMiner):
    """Mines the pairs the TCM term penalises, as ``(a1, p, a2, n)``.

    Positive pairs have the same label and cosine similarity ``<= pos_margin``; negative
    pairs have different labels and similarity ``>= neg_margin`` (the same inclusive
    comparisons as :class:`pml_tcm.TCMRegularizer`). Any pml loss can consume the output;
    passing it as ``indices_tuple`` to a :func:`pml_tcm.with_tcm` loss mines once per
    step for both the base loss and the TCM term. Mining runs on the embeddings' device.

    Args:
        pos_margin: m+ in [-1, 1].
        neg_margin: m- in [-1, 1], at most ``pos_margin``.
        check_inputs: reject NaN/Inf and zero-norm rows.
        **kwargs: passed to pml's ``BaseMiner`` (``distance`` must be ``CosineSimilarity()``,
            ``collect_stats``).

    Raises:
        ValueError: margins out of range, another distance, or bad embeddings/labels.
    """

    def __init__(
        self,
        pos_margin: float = 0.9,
        neg_margin: float = 0.5,
        check_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _pml_checks.check_cosine_distance(self.distance, "TCMMiner")
        validation.check_margins(pos_margin, neg_margin)
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.check_inputs = check_inputs
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"], is_stat=False)

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The hard pairs of one batch; called like a pml miner.

        Args:
            embeddings: ``(N, D)`` floating-point embeddings.
            labels: ``(N,)`` integer labels.
            ref_emb: optional ``(M, D)`` reference embeddings (default: the batch,
                self pairs excluded), cast to the embeddings' accumulation dtype. The
                batch itself with ``ref_labels`` other than ``labels`` is a separate
                reference set (self pairs included), as in pml.
            ref_labels: ``(M,)`` reference labels, required with ``ref_emb``.

        Returns:
            ``(a1, p, a2, n)``: int64 index tensors of the hard positive pairs
            ``(a1[k], p[k])`` and hard negative pairs ``(a2[k], n[k])``.

        Raises:
            ValueError: bad embeddings or labels (shapes; NaN/Inf or zero-norm rows when
                ``check_inputs``).
        """
        # Our checks first, so that bad input gets our messages, not pml's asserts; the
        # labels are moved without blocking, so pml's own move finds them in place.
        labels, ref_emb, ref_labels = _pml_checks.prepare_batch(
            embeddings, labels, ref_emb, ref_labels, self.check_inputs, "TCMMiner"
        )
        return super().forward(embeddings, labels, ref_emb, ref_labels)

    def mine(
        self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if ref_emb is embeddings and ref_labels is labels:  # pml's stand-in for "no ref_emb"
            ref_emb, ref_labels = None, None
        return tcm_functional.tcm_hard_pairs(
            embeddings, labels, ref_emb, ref_labels, self.pos_margin, self.neg_margin
        )

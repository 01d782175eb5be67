"""TCMRegularizer: the Threshold-Consistent Margin term as a pml embedding regularizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.regularizers import BaseRegularizer
from torch import Tensor

from . import _pml_checks
from .functional import tcm as tcm_functional
from .functional import validation

_NEEDS_WITH_TCM = (
    "TCMRegularizer needs labels, but it was called with embeddings only. pml calls an "
    "embedding_regularizer that way; attach it with pml_tcm.with_tcm(loss) (or "
    "with_tcm(loss, regularizer=...)) so that the loss hands it labels, ref_emb/"
    "ref_labels and indices_tuple on every call."
)

ARGUMENTS = ("pos_margin", "neg_margin", "pos_weight", "neg_weight", "check_inputs")
"""TCMRegularizer's own constructor arguments."""
PML_ARGUMENTS = ("distance", "collect_stats")
"""The pml ``BaseRegularizer`` arguments TCMRegularizer takes (``reducer`` is refused)."""


class OwnSlots(Protocol):
    """Where each query's own copy sits among the references (set by a loss wrapper)."""

    def columns(self, num_queries: int, device: torch.device) -> Tensor: ...


@dataclass(frozen=True)
class AttachedCall:
    """What a :func:`pml_tcm.with_tcm` loss was called with, for its regularizer."""

    labels: Tensor | None
    indices_tuple: tuple[Tensor, ...] | None
    ref_emb: Tensor | None
    ref_labels: Tensor | None
    own_slots: OwnSlots | None


# The call in progress of each thread (and asyncio task): pml calls the embedding
# regularizer with the embeddings only, so the loss's call reaches it here, never through
# an attribute of the (shared) regularizer.
_ATTACHED_CALL: ContextVar[tuple[TCMRegularizer, AttachedCall] | None] = ContextVar(
    "pml_tcm_attached_call", default=None
)


@contextlib.contextmanager
def attached_call(regularizer: TCMRegularizer, call: AttachedCall) -> Iterator[None]:
    """Inside, ``regularizer(embeddings)`` (pml's call) computes the term of ``call``."""
    token = _ATTACHED_CALL.set((regularizer, call))
    try:
        yield
    finally:
        _ATTACHED_CALL.reset(token)


class TCMRegularizer(BaseRegularizer):
    """Threshold-Consistent Margin (TCM) term (Zhang et al., ICLR 2024).

    Penalises hard positive pairs (same label, cosine similarity ``<= pos_margin``) by
    ``pos_margin - S`` and hard negative pairs (different labels, ``>= neg_margin``) by
    ``S - neg_margin``, each part averaged over its hard pairs. Computed from one
    similarity matrix; no host-device sync beyond the optional input check.

    Use it through :func:`pml_tcm.with_tcm` (which makes a pml loss hand it labels), as a
    member of ``losses.MultipleLosses``, or call it directly::

        reg = TCMRegularizer()
        value = reg(embeddings, labels)                  # batch vs batch
        value = reg(embeddings, labels, ref_emb=refs, ref_labels=ref_labels)

    Args:
        pos_margin: m+ in [-1, 1].
        neg_margin: m- in [-1, 1], at most ``pos_margin``.
        pos_weight: lambda+ >= 0.
        neg_weight: lambda- >= 0.
        check_inputs: check for NaN/Inf and zero-norm rows (one host-device sync per
            call). Set False for a sync-free step, e.g. under ``torch.compile``.
        **kwargs: passed to pml's ``BaseRegularizer`` (``distance``, ``collect_stats``).
            ``distance`` must be ``CosineSimilarity()``. ``reducer`` is refused: the term
            is already reduced (each part is a mean over its hard pairs), and a pml
            reducer would pass it through unchanged.

    Which pairs it sees: called directly, or as a member of ``losses.MultipleLosses``
    (which hands each member the ``indices_tuple`` of its miner), the pairs of
    ``indices_tuple`` when one is given, else all pairs. Attached with
    :func:`pml_tcm.with_tcm`, all pairs of the call by default, whatever a miner passed
    (``with_tcm(..., pairs="mined")`` for the mined ones).

    Raises:
        ValueError: margins or weights out of range, another distance, or a reducer.
        TypeError: an argument that is neither TCMRegularizer's nor pml's.

    Recorded stats (with ``collect_stats=True``, pml's stat mechanism, so that pml's
    record-keeper logs them beside the loss): ``tcm_value`` (the term of the last call),
    ``num_hard_pos_pairs``, ``num_hard_neg_pairs``. They are 0-dim tensors on the
    embeddings' device, read by the logger, not here: no host sync; with
    ``collect_stats=False`` they are not kept.
    """

    def __init__(
        self,
        pos_margin: float = 0.9,
        neg_margin: float = 0.5,
        pos_weight: float = 1.0,
        neg_weight: float = 1.0,
        check_inputs: bool = True,
        **kwargs: Any,
    ) -> None:
        unknown = sorted(set(kwargs) - set(PML_ARGUMENTS) - {"reducer"})
        if unknown:
            raise TypeError(
                f"TCMRegularizer got an unexpected keyword argument {unknown[0]!r}; it takes "
                f"{', '.join(ARGUMENTS + PML_ARGUMENTS)} (the TCM weight is the loss's "
                "embedding_reg_weight: with_tcm(loss, weight=...))"
            )
        if kwargs.get("reducer") is not None:
            raise ValueError(
                "TCMRegularizer takes no reducer: the TCM term is already reduced (each "
                "part is the mean over its hard pairs). To weight it, set the loss's "
                "embedding_reg_weight."
            )
        super().__init__(**kwargs)
        _pml_checks.check_cosine_distance(self.distance, "TCMRegularizer")
        validation.check_margins(pos_margin, neg_margin)
        validation.check_weight(pos_weight, "pos_weight")
        validation.check_weight(neg_weight, "neg_weight")
        self.pos_margin = float(pos_margin)
        self.neg_margin = float(neg_margin)
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)
        self.check_inputs = check_inputs
        self.add_to_recordable_attributes(
            list_of_names=["pos_margin", "neg_margin", "pos_weight", "neg_weight"],
            is_stat=False,
        )
        self.add_to_recordable_attributes(
            list_of_names=["tcm_value", "num_hard_pos_pairs", "num_hard_neg_pairs"], is_stat=True
        )

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor | None = None,
        indices_tuple: tuple[Tensor, ...] | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        """The TCM term of one batch; called like a pml loss.

        Args:
            embeddings: ``(N, D)`` floating-point embeddings.
            labels: ``(N,)`` integer labels; ``None`` only when called by a
                :func:`pml_tcm.with_tcm` loss, which supplies them.
            indices_tuple: optional pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``;
                only these pairs are considered. (Through :func:`pml_tcm.with_tcm` TCM
                sees all pairs of the call unless it was attached with
                ``pairs="mined"``.)
            ref_emb: optional ``(M, D)`` reference embeddings, cast to the embeddings'
                accumulation dtype (float32, float64 for float64 embeddings). The batch
                itself with ``ref_labels`` other than ``labels`` is a separate reference
                set (self pairs included), as in pml.
            ref_labels: ``(M,)`` reference labels, required with ``ref_emb``.

        Returns:
            The reduced (0-dim) TCM term.

        Raises:
            ValueError: no labels outside :func:`pml_tcm.with_tcm`, or bad embeddings or
                labels (shapes; NaN/Inf or zero-norm rows when ``check_inputs``).
        """
        self.reset_stats()
        own_slots = None
        if labels is None:
            attached = _ATTACHED_CALL.get()
            if attached is None or attached[0] is not self:
                raise ValueError(_NEEDS_WITH_TCM)
            call = attached[1]
            labels, indices_tuple = call.labels, call.indices_tuple
            ref_emb, ref_labels, own_slots = call.ref_emb, call.ref_labels, call.own_slots
            if labels is None:
                raise ValueError("the loss TCM is attached to was called without labels")
        labels, ref_emb, ref_labels = _pml_checks.prepare_batch(
            embeddings, labels, ref_emb, ref_labels, self.check_inputs, "TCMRegularizer"
        )
        self_columns = None
        if own_slots is not None and ref_emb is not None:
            self_columns = own_slots.columns(embeddings.shape[0], embeddings.device)
        loss_dict = self.compute_loss(
            embeddings, labels, indices_tuple, ref_emb, ref_labels, self_columns
        )
        return self.reducer(loss_dict, embeddings, labels)

    def compute_loss(
        self,
        embeddings: Tensor,
        labels: Tensor,
        indices_tuple: tuple[Tensor, ...] | None,
        ref_emb: Tensor | None,
        ref_labels: Tensor | None,
        self_columns: Tensor | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The term as pml's already-reduced loss dict; :meth:`forward` calls it with
        checked input (as pml's losses call their ``compute_loss``), so a subclass may
        override it.

        Args:
            embeddings: ``(N, D)`` embeddings.
            labels: ``(N,)`` labels on the embeddings' device.
            indices_tuple: ``None`` (all pairs), pairs ``(a1, p, a2, n)`` or triplets
                ``(a, p, n)``.
            ref_emb: ``(M, D)`` references, or ``None`` for the batch against itself
                (self pairs excluded).
            ref_labels: ``(M,)`` reference labels (with ``ref_emb``).
            self_columns: ``(N,)`` reference index of each query's own copy, left out
                like a self pair (set by :func:`pml_tcm.with_tcm` inside
                ``CrossBatchMemory``), or ``None``.
        """
        pairs = _pml_checks.as_pairs(
            indices_tuple, labels, labels if ref_labels is None else ref_labels, embeddings.device
        )
        if pairs is not None and self.check_inputs:
            num_references = embeddings.shape[0] if ref_emb is None else ref_emb.shape[0]
            _pml_checks.check_pair_range(pairs, embeddings.shape[0], num_references)
        loss, num_pos, num_neg = tcm_functional.tcm_loss_and_counts(
            embeddings,
            labels,
            ref_emb,
            ref_labels,
            self.pos_margin,
            self.neg_margin,
            self.pos_weight,
            self.neg_weight,
            pairs,
            self_columns,
        )
        if self.collect_stats:
            self.tcm_value = loss.detach()
            self.num_hard_pos_pairs, self.num_hard_neg_pairs = num_pos, num_neg
        return _already_reduced(loss)


def _already_reduced(loss: Tensor) -> dict[str, dict[str, Any]]:
    return {"loss": {"losses": loss, "indices": None, "reduction_type": "already_reduced"}}

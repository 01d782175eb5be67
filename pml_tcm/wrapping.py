"""with_tcm: attach a TCMRegularizer to any pml loss."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.base_loss_wrapper import BaseLossWrapper
from pytorch_metric_learning.reducers import DoNothingReducer, MultipleReducers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper
from torch import nn

from .regularizer import TCMRegularizer

LossT = TypeVar("LossT", bound=nn.Module)

_CALL_ARGUMENTS = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")


def with_tcm(loss_fn: LossT, regularizer: TCMRegularizer | None = None, **tcm_kwargs: Any) -> LossT:
    """Add the TCM term to a pml loss; returns the same loss object.

    The loss gets a :class:`~pml_tcm.TCMRegularizer` as its ``embedding_regularizer``
    (scaled by its ``embedding_reg_weight``, reduced as pml would reduce it) and, on
    every call, hands it the labels, ``ref_emb``/``ref_labels`` and ``indices_tuple`` it
    was called with. So the loss returns ``base loss + embedding_reg_weight * TCM`` over
    the same pairs the base loss sees: batch-vs-memory pairs inside
    ``losses.CrossBatchMemory``, the global or local-vs-global batch inside
    ``utils.distributed.DistributedLossWrapper``, the mined pairs given as
    ``indices_tuple``.

    Args:
        loss_fn: a pml ``BaseMetricLossFunction`` (pair, tuple or classification loss),
            or a wrapper around one (``CrossBatchMemory``, ``SelfSupervisedLoss``,
            ``DistributedLossWrapper``): TCM is attached to the wrapped loss, so it sees
            the pairs the wrapper hands that loss.
        regularizer: the TCMRegularizer to attach; by default the one the loss already
            carries, else ``TCMRegularizer(**tcm_kwargs)``.
        **tcm_kwargs: TCMRegularizer arguments (``pos_margin``, ``neg_margin``,
            ``pos_weight``, ``neg_weight``, ...), when no regularizer is given.

    Returns:
        ``loss_fn`` itself.

    Raises:
        TypeError: ``loss_fn`` is not a pml loss, or ``regularizer`` not a TCMRegularizer.
        ValueError: the loss already carries another embedding regularizer, or both
            ``regularizer`` and ``tcm_kwargs`` are given.
    """
    inner = loss_fn
    while isinstance(inner, (BaseLossWrapper, DistributedLossWrapper)):
        inner = inner.loss
    if not isinstance(inner, BaseMetricLossFunction):
        raise TypeError(
            "with_tcm expects a pytorch_metric_learning loss (BaseMetricLossFunction, or a "
            f"loss wrapper around one), got {type(loss_fn).__name__}"
        )
    if regularizer is not None and tcm_kwargs:
        raise ValueError("pass either regularizer or TCMRegularizer kwargs, not both")
    if regularizer is not None and not isinstance(regularizer, TCMRegularizer):
        raise TypeError(f"regularizer must be a TCMRegularizer, got {type(regularizer).__name__}")
    current = inner.embedding_regularizer
    if current is not None and not isinstance(current, TCMRegularizer):
        raise ValueError(
            f"{type(inner).__name__} already has embedding_regularizer="
            f"{type(current).__name__}; pml losses hold one embedding regularizer"
        )
    if regularizer is None:
        if current is not None and tcm_kwargs:
            raise ValueError(
                f"{type(inner).__name__} already carries a TCMRegularizer; "
                "configure that one instead of passing TCMRegularizer kwargs"
            )
        regularizer = current if current is not None else TCMRegularizer(**tcm_kwargs)
    _attach(inner, regularizer)
    return loss_fn


def _attach(loss: BaseMetricLossFunction, regularizer: TCMRegularizer) -> None:
    had_regularizer = loss.embedding_regularizer is not None
    loss.embedding_regularizer = regularizer
    if not had_regularizer:
        loss.add_to_recordable_attributes(list_of_names=["embedding_reg_weight"], is_stat=False)
        _add_reducer_entry(loss)
    if _hand_call_to_regularizer not in loss._forward_pre_hooks.values():
        loss.register_forward_pre_hook(_hand_call_to_regularizer, with_kwargs=True)
        loss.register_forward_hook(_clear_regularizer_call, always_call=True)


def _add_reducer_entry(loss: BaseMetricLossFunction) -> None:
    """Give the new ``embedding_reg_loss`` sub-loss a reducer, as pml's constructor would."""
    reducer = loss.reducer
    if isinstance(reducer, DoNothingReducer):
        return
    if isinstance(reducer, MultipleReducers):
        if "embedding_reg_loss" not in reducer.reducers:
            template = next(iter(reducer.reducers.values()), loss.get_default_reducer())
            reducer.reducers["embedding_reg_loss"] = copy.deepcopy(template)
        return
    # A single reducer: pml builds one copy per sub-loss once there are several.
    loss.set_reducer(reducer)


def _hand_call_to_regularizer(module: nn.Module, args: tuple, kwargs: dict) -> None:
    call = dict(zip(_CALL_ARGUMENTS, args, strict=False))
    call.update({k: v for k, v in kwargs.items() if k in _CALL_ARGUMENTS})
    module.embedding_regularizer._call_context = {
        name: call.get(name) for name in _CALL_ARGUMENTS[1:]
    }


def _clear_regularizer_call(module: nn.Module, args: tuple, output: Any) -> None:
    regularizer = module.embedding_regularizer
    if isinstance(regularizer, TCMRegularizer):
        regularizer._call_context = None

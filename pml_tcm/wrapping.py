"""with_tcm: attach a TCMRegularizer to any pml loss."""

from __future__ import annotations

import copy
from typing import Any, Literal, TypeVar

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.losses.base_loss_wrapper import BaseLossWrapper
from pytorch_metric_learning.reducers import DoNothingReducer, MultipleReducers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, is_distributed
from torch import Tensor, nn

from .regularizer import TCMRegularizer

LossT = TypeVar("LossT", bound=nn.Module)

_CALL_ARGUMENTS = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")
_PAIRS = ("all", "mined")


def with_tcm(
    loss_fn: LossT,
    regularizer: TCMRegularizer | None = None,
    pairs: Literal["all", "mined"] = "all",
    **tcm_kwargs: Any,
) -> LossT:
    """Add the TCM term to a pml loss; returns the same loss object.

    The loss gets a :class:`~pml_tcm.TCMRegularizer` as its ``embedding_regularizer``
    (scaled by its ``embedding_reg_weight``; pml adds it as an already-reduced sub-loss
    ``embedding_reg_loss``) and, on every call, hands it the labels and
    ``ref_emb``/``ref_labels`` it was called with. The loss returns
    ``base loss + embedding_reg_weight * TCM``.

    Which pairs TCM sees (``pairs="all"``, the paper's batch regularizer): every pair the
    call defines, whatever ``indices_tuple`` a miner passed to the base loss — batch x
    batch without self pairs; batch x ``ref_emb``; inside ``losses.CrossBatchMemory``,
    batch x memory; inside ``utils.distributed.DistributedLossWrapper``, the global (or
    local x global) batch. So a miner in front of the loss never switches TCM off.
    ``pairs="mined"`` restricts TCM to the pairs of ``indices_tuple`` when one is given.

    Each sample's own slot (its copy in the memory of a ``CrossBatchMemory``, itself in
    the gathered batch of an ``efficient=True`` ``DistributedLossWrapper``) is left out
    when ``with_tcm`` is applied to the wrapper (``with_tcm(CrossBatchMemory(loss, ...))``).
    Applied to the inner loss only, TCM cannot tell the own slot from another reference:
    it counts as a positive pair of similarity 1, which is hard only when
    ``pos_margin >= 1`` (up to rounding), so for any ``pos_margin`` below about
    ``1 - 1e-6`` both orders give the same value.

    Args:
        loss_fn: a pml ``BaseMetricLossFunction`` (pair, tuple or classification loss),
            or a wrapper around one (``CrossBatchMemory``, ``SelfSupervisedLoss``,
            ``DistributedLossWrapper``): TCM is attached to the wrapped loss, so it sees
            the pairs the wrapper hands that loss.
        regularizer: the TCMRegularizer to attach; by default the one the loss already
            carries, else ``TCMRegularizer(**tcm_kwargs)``.
        pairs: ``"all"`` (default) or ``"mined"``, see above.
        **tcm_kwargs: TCMRegularizer arguments (``pos_margin``, ``neg_margin``,
            ``pos_weight``, ``neg_weight``, ...), when no regularizer is given.

    Returns:
        ``loss_fn`` itself.

    Raises:
        TypeError: ``loss_fn`` is not a pml loss, or ``regularizer`` not a TCMRegularizer.
        ValueError: the loss already carries another embedding regularizer, both
            ``regularizer`` and ``tcm_kwargs`` are given, or ``pairs`` is unknown.
    """
    if pairs not in _PAIRS:
        raise ValueError(f"pairs must be 'all' or 'mined', got {pairs!r}")
    wrappers = []
    inner = loss_fn
    while isinstance(inner, (BaseLossWrapper, DistributedLossWrapper)):
        wrappers.append(inner)
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
    call = _attach(inner, regularizer, pairs)
    for wrapper in wrappers:
        if isinstance(wrapper, CrossBatchMemory):
            _set_forward(wrapper, _MemoryCall(wrapper, call))
        elif isinstance(wrapper, DistributedLossWrapper) and wrapper.efficient:
            _set_forward(wrapper, _GatheredCall(wrapper, call))
    return loss_fn


def _attach(loss: BaseMetricLossFunction, regularizer: TCMRegularizer, pairs: str) -> _TCMCall:
    had_regularizer = loss.embedding_regularizer is not None
    loss.embedding_regularizer = regularizer
    if not had_regularizer:
        loss.add_to_recordable_attributes(list_of_names=["embedding_reg_weight"], is_stat=False)
        _add_reducer_entry(loss)
    call = loss.__dict__.get("forward")
    if not isinstance(call, _TCMCall):
        call = _TCMCall(loss)
        _set_forward(loss, call)
    call.pairs = pairs
    return call


def _set_forward(module: nn.Module, forward: Any) -> None:
    # An instance attribute shadows the class's forward; nn.Module.__call__ finds it. Not
    # a torch hook: pml's HookContainer logs every dict attribute of a loss, and torch
    # keeps int-keyed dicts for hooks registered with kwargs.
    if not isinstance(module.__dict__.get("forward"), (_TCMCall, _MemoryCall, _GatheredCall)):
        module.forward = forward


class _TCMCall:
    """The forward of a loss carrying TCM: hands the call to the regularizer, then runs
    the loss class's own forward. Picklable and deep-copyable with its loss."""

    def __init__(self, loss: BaseMetricLossFunction) -> None:
        self.loss = loss
        self.pairs = "all"
        self.own_slots: Tensor | None = None  # set by an enclosing wrapper's call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = dict(zip(_CALL_ARGUMENTS, args, strict=False))
        call.update({k: v for k, v in kwargs.items() if k in _CALL_ARGUMENTS})
        regularizer = self.loss.embedding_regularizer
        if isinstance(regularizer, TCMRegularizer):
            regularizer._call_context = {
                "labels": call.get("labels"),
                "indices_tuple": call.get("indices_tuple") if self.pairs == "mined" else None,
                "ref_emb": call.get("ref_emb"),
                "ref_labels": call.get("ref_labels"),
                "own_slots": self.own_slots if call.get("ref_emb") is not None else None,
            }
        try:
            return type(self.loss).forward(self.loss, *args, **kwargs)
        finally:
            if isinstance(regularizer, TCMRegularizer):
                regularizer._call_context = None


class _MemoryCall:
    """The forward of a CrossBatchMemory around a TCM loss: tells TCM each sample's own
    memory slot (when the batch is enqueued, as pml then removes those pairs)."""

    def __init__(self, memory: CrossBatchMemory, inner: _TCMCall) -> None:
        self.memory = memory
        self.inner = inner

    def __call__(self, embeddings: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Any:
        enqueue_mask = args[1] if len(args) > 1 else kwargs.get("enqueue_mask")
        memory = self.memory
        self.inner.own_slots = _OwnSlots(memory) if enqueue_mask is None else None
        try:
            return type(memory).forward(memory, embeddings, labels, *args, **kwargs)
        finally:
            self.inner.own_slots = None


class _GatheredCall:
    """The forward of an ``efficient=True`` DistributedLossWrapper around a TCM loss: the
    gathered references start with the local batch, so sample ``i``'s own slot is ``i``."""

    def __init__(self, wrapper: DistributedLossWrapper, inner: _TCMCall) -> None:
        self.wrapper = wrapper
        self.inner = inner

    def __call__(self, embeddings: Tensor, *args: Any, **kwargs: Any) -> Any:
        call = dict(zip(_CALL_ARGUMENTS[1:], args, strict=False))
        call.update(kwargs)
        gathers_batch = call.get("ref_emb") is None and is_distributed()
        self.inner.own_slots = _LeadingSlots() if gathers_batch else None
        try:
            return type(self.wrapper).forward(self.wrapper, embeddings, *args, **kwargs)
        finally:
            self.inner.own_slots = None


class _OwnSlots:
    """Own memory slots of the batch just enqueued: read when TCM runs (after pml's
    ``add_to_memory`` has set them)."""

    def __init__(self, memory: CrossBatchMemory) -> None:
        self.memory = memory

    def columns(self, num_queries: int, device: torch.device) -> Tensor:
        return self.memory.curr_batch_idx.to(device)


class _LeadingSlots:
    def columns(self, num_queries: int, device: torch.device) -> Tensor:
        return torch.arange(num_queries, device=device)


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

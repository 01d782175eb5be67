"""with_tcm: attach a TCMRegularizer to any pml loss."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Literal, TypeVar

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.losses.base_loss_wrapper import BaseLossWrapper
from pytorch_metric_learning.reducers import DoNothingReducer, MultipleReducers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper, is_distributed
from torch import Tensor, nn

from .functional import validation
from .regularizer import (
    ARGUMENTS,
    PML_ARGUMENTS,
    AttachedCall,
    OwnSlots,
    TCMRegularizer,
    attached_call,
)

LossT = TypeVar("LossT", bound=nn.Module)

_CALL_ARGUMENTS = ("embeddings", "labels", "indices_tuple", "ref_emb", "ref_labels")
_PAIRS = ("all", "mined")


def with_tcm(
    loss_fn: LossT,
    regularizer: TCMRegularizer | None = None,
    pairs: Literal["all", "mined"] = "all",
    weight: float | None = None,
    **tcm_kwargs: Any,
) -> LossT:
    """Add the TCM term to a pml loss; returns the same loss object.

    The loss gets a :class:`~pml_tcm.TCMRegularizer` as its ``embedding_regularizer``
    (scaled by its ``embedding_reg_weight``, which ``weight`` sets; pml adds it as an
    already-reduced sub-loss ``embedding_reg_loss``) and, on every call, hands it the
    labels and ``ref_emb``/``ref_labels`` it was called with. The loss returns
    ``base loss + embedding_reg_weight * TCM``::

        loss_fn = with_tcm(losses.MultiSimilarityLoss(), weight=3, pos_margin=0.9)

    Which pairs TCM sees (``pairs="all"``, the paper's batch regularizer): every pair the
    call defines, whatever ``indices_tuple`` a miner passed to the base loss — batch x
    batch without self pairs; batch x ``ref_emb``; inside ``losses.CrossBatchMemory``,
    batch x memory; inside ``utils.distributed.DistributedLossWrapper``, the global (or
    local x global) batch. So a miner in front of the loss never switches TCM off.
    ``pairs="mined"`` restricts TCM to the pairs of ``indices_tuple`` when one is given.
    (A ``TCMRegularizer`` used on its own, e.g. as a member of ``losses.MultipleLosses``,
    takes the ``indices_tuple`` it is given: the mined pairs.)

    Each sample's own slot (its copy in the memory of a ``CrossBatchMemory``, itself in
    the gathered batch of an ``efficient=True`` ``DistributedLossWrapper``) is left out
    when ``with_tcm`` is applied to the wrapper (``with_tcm(CrossBatchMemory(loss, ...))``).
    Applied to the inner loss only, TCM cannot tell the own slot from another reference:
    it counts as a positive pair of similarity 1, which is hard only when
    ``pos_margin >= 1`` (up to rounding), so for any ``pos_margin`` below about
    ``1 - 1e-6`` both orders give the same value.

    The loss (and the wrappers named above) become instances of a subclass of their
    class, of the same name, whose ``forward`` passes the call to TCM: ``isinstance``
    and pml's by-name checks still hold, ``type(loss) is losses.MultiSimilarityLoss``
    no longer does. The call is kept per thread and per call, never on the loss or the
    regularizer: one loss may be called from several threads at once, and replicas
    (``nn.DataParallel``), deep copies and pickles each run their own module.

    Args:
        loss_fn: a pml ``BaseMetricLossFunction`` (pair, tuple or classification loss),
            or a wrapper around one (``CrossBatchMemory``, ``SelfSupervisedLoss``,
            ``DistributedLossWrapper``): TCM is attached to the wrapped loss, so it sees
            the pairs the wrapper hands that loss.
        regularizer: the TCMRegularizer to attach; by default the one the loss already
            carries, else ``TCMRegularizer(**tcm_kwargs)``.
        pairs: ``"all"`` (default) or ``"mined"``, see above.
        weight: the TCM weight lambda, a number >= 0: sets the loss's
            ``embedding_reg_weight`` (pml's weight of its embedding regularizer). ``None``
            (default) keeps the loss's own, 1 unless it was given to the loss.
        **tcm_kwargs: TCMRegularizer arguments (``pos_margin``, ``neg_margin``,
            ``pos_weight``, ``neg_weight``, ``check_inputs``, ``distance``,
            ``collect_stats``), when no regularizer is given.

    Returns:
        ``loss_fn`` itself.

    Raises:
        TypeError: ``loss_fn`` is not a pml loss, ``regularizer`` not a TCMRegularizer,
            or a keyword argument is neither ``with_tcm``'s nor TCMRegularizer's.
        ValueError: the loss already carries another embedding regularizer, both
            ``regularizer`` and ``tcm_kwargs`` are given, ``pairs`` is unknown or
            ``weight`` out of range.
    """
    unknown = [name for name in tcm_kwargs if name not in ARGUMENTS + PML_ARGUMENTS]
    if unknown:
        raise TypeError(
            f"with_tcm() got an unexpected keyword argument {unknown[0]!r}; it takes "
            "loss_fn, regularizer, pairs, weight (the TCM weight, pml's "
            "embedding_reg_weight) and the TCMRegularizer arguments "
            f"{', '.join(ARGUMENTS + PML_ARGUMENTS)}"
        )
    if weight is not None:
        validation.check_weight(weight, "weight")
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
    _attach(inner, regularizer, pairs)
    if weight is not None:
        inner.embedding_reg_weight = float(weight)
    for wrapper in wrappers:
        if isinstance(wrapper, CrossBatchMemory):
            _give_forward(wrapper, _TCMMemory)
        elif isinstance(wrapper, DistributedLossWrapper) and wrapper.efficient:
            _give_forward(wrapper, _TCMGathered)
    return loss_fn


def _attach(loss: BaseMetricLossFunction, regularizer: TCMRegularizer, pairs: str) -> None:
    had_regularizer = loss.embedding_regularizer is not None
    loss.embedding_regularizer = regularizer
    if not had_regularizer:
        loss.add_to_recordable_attributes(list_of_names=["embedding_reg_weight"], is_stat=False)
        _add_reducer_entry(loss)
    _give_forward(loss, _TCMLoss)
    loss._tcm_pairs = pairs


def _give_forward(module: nn.Module, forward_class: type) -> None:
    # The module becomes an instance of a subclass (same name, so pml's lists of supported
    # losses and its record names still match) whose forward adds TCM's call. A method,
    # not an instance attribute or a torch hook: replicas (nn.DataParallel), deep copies
    # and pickles run their own module; pml's HookContainer logs every dict attribute of a
    # loss, and torch keeps int-keyed dicts for hooks registered with kwargs.
    if not isinstance(module, forward_class):
        module.__class__ = _subclass(type(module), forward_class)


_SUBCLASSES: dict[tuple[type, type], type] = {}


def _subclass(base: type, forward_class: type) -> type:
    cls = _SUBCLASSES.get((base, forward_class))
    if cls is None:
        cls = type(
            base.__name__,
            (forward_class, base),
            {
                "__module__": __name__,
                "__qualname__": f"with_tcm.<{base.__qualname__}>",
                "__doc__": base.__doc__,
                "_tcm_base": base,
            },
        )
        _SUBCLASSES[(base, forward_class)] = cls
    return cls


def _rebuild(base: type, forward_class: type) -> nn.Module:
    return object.__new__(_subclass(base, forward_class))


class _WithTCMForward:
    """Pickling and copying of a module whose class :func:`with_tcm` replaced: by its
    original class, which is importable, while the subclass is built at run time."""

    _tcm_base: type

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        forward_class = next(c for c in type(self).__bases__ if issubclass(c, _WithTCMForward))
        return (_rebuild, (self._tcm_base, forward_class), self.__getstate__())


class _TCMLoss(_WithTCMForward):
    """The forward of a loss carrying TCM: hands the call to the regularizer, then runs
    the loss class's own forward."""

    _tcm_pairs = "all"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        regularizer = self.embedding_regularizer
        if not isinstance(regularizer, TCMRegularizer):
            return super().forward(*args, **kwargs)
        call = dict(zip(_CALL_ARGUMENTS, args, strict=False))
        call.update({k: v for k, v in kwargs.items() if k in _CALL_ARGUMENTS})
        ref_emb = call.get("ref_emb")
        own = _OWN_SLOTS.get()
        own_slots = own[1] if own is not None and own[0] is self else None
        attached = AttachedCall(
            labels=call.get("labels"),
            indices_tuple=call.get("indices_tuple") if self._tcm_pairs == "mined" else None,
            ref_emb=ref_emb,
            ref_labels=call.get("ref_labels"),
            own_slots=own_slots if ref_emb is not None else None,
        )
        with attached_call(regularizer, attached):
            return super().forward(*args, **kwargs)


# The own slots an enclosing wrapper's call tells the innermost TCM loss (which it names).
_OWN_SLOTS: ContextVar[tuple[nn.Module, OwnSlots | None] | None] = ContextVar(
    "pml_tcm_own_slots", default=None
)


@contextlib.contextmanager
def _own_slots(wrapper: nn.Module, slots: OwnSlots | None) -> Iterator[None]:
    token = _OWN_SLOTS.set((_innermost(wrapper), slots))
    try:
        yield
    finally:
        _OWN_SLOTS.reset(token)


def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, (BaseLossWrapper, DistributedLossWrapper)):
        module = module.loss
    return module


class _TCMMemory(_WithTCMForward):
    """The forward of a CrossBatchMemory around a TCM loss: tells TCM each sample's own
    memory slot (when the batch is enqueued, as pml then removes those pairs)."""

    def forward(self, embeddings: Tensor, labels: Tensor, *args: Any, **kwargs: Any) -> Any:
        enqueue_mask = args[1] if len(args) > 1 else kwargs.get("enqueue_mask")
        with _own_slots(self, _MemorySlots(self) if enqueue_mask is None else None):
            return super().forward(embeddings, labels, *args, **kwargs)


class _TCMGathered(_WithTCMForward):
    """The forward of an ``efficient=True`` DistributedLossWrapper around a TCM loss: the
    gathered references start with the local batch, so sample ``i``'s own slot is ``i``."""

    def forward(self, embeddings: Tensor, *args: Any, **kwargs: Any) -> Any:
        call = dict(zip(_CALL_ARGUMENTS[1:], args, strict=False))
        call.update(kwargs)
        gathers_batch = call.get("ref_emb") is None and is_distributed()
        with _own_slots(self, _LeadingSlots() if gathers_batch else None):
            return super().forward(embeddings, *args, **kwargs)


class _MemorySlots:
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

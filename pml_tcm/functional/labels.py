"""Labels of any dtype and size as dense class ids.

Class labels are only compared for equality, so any labels can be replaced by the index
of their value among the sorted distinct values: ``0 .. C-1``. This keeps integer labels
of any magnitude exact where a library casts labels to float32 (integers from 2^24 on
collide there), and lets bool and non-integral float labels through code written for
integer class ids. A label may also be a row (``(N, K)`` labels): rows are compared
whole, ordered lexicographically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _common_dtype(label_sets: Sequence[Tensor], names: Sequence[str]) -> torch.dtype:
    dtypes = {labels.dtype for labels in label_sets}
    if len(dtypes) == 1:
        return dtypes.pop()
    if torch.uint64 in dtypes:
        raise ValueError(
            f"{' and '.join(names)}: uint64 labels can only be compared with uint64 labels "
            f"(got {', '.join(str(d) for d in sorted(dtypes, key=str))})"
        )
    if any(dtype.is_floating_point for dtype in dtypes):
        return torch.float64
    return torch.int64


def dense_class_ids(
    label_sets: Sequence[Tensor], names: Sequence[str]
) -> tuple[list[Tensor], Tensor]:
    """Replace labels by their rank among the distinct labels of all the sets.

    Args:
        label_sets: tensors of shape ``(N_i,)`` or ``(N_i, K)`` (one row per sample), any
            integer, unsigned, bool or floating dtype; several sets (e.g. queries and
            references) share one numbering. Sets of different dtypes are compared by
            value in a common dtype (int64, or float64 when one of them is floating).
        names: the argument name of each set, for error messages.

    Returns:
        ``(ids, classes)``: ``ids[i]`` is ``(N_i,)`` int64 on ``label_sets[0]``'s device,
        ``classes`` the ``(C,)`` (or ``(C, K)``) sorted distinct labels, so that
        ``classes[ids[i]]`` gives back ``label_sets[i]`` (in the common dtype). The ids
        keep the order of the labels: ``a < b`` exactly when ``id(a) < id(b)``.

    Raises:
        ValueError: naming the set: not a tensor, 0-D or more than 2-D, complex, NaN
            labels, sets whose rows differ in size.
    """
    if len(label_sets) != len(names) or not label_sets:
        raise ValueError("give one name per label set, and at least one set")
    for labels, name in zip(label_sets, names):
        if not isinstance(labels, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
        if labels.ndim not in (1, 2):
            raise ValueError(
                f"{name} must be 1-D (one label per sample) or 2-D (one label row per "
                f"sample), got shape {tuple(labels.shape)}"
            )
        if labels.is_complex():
            raise ValueError(f"{name} must be real, got {labels.dtype}")
        if labels.is_floating_point() and bool(torch.isnan(labels).any()):
            raise ValueError(f"{name} contains NaN (NaN is not equal to itself: no class)")
    if len({labels.shape[1:] for labels in label_sets}) > 1:
        raise ValueError(
            f"{' and '.join(names)} must have the same label shape, got "
            f"{', '.join(str(tuple(labels.shape[1:])) for labels in label_sets)}"
        )
    dtype = _common_dtype(label_sets, names)
    device = label_sets[0].device
    joined = torch.cat([labels.to(device, dtype) for labels in label_sets])
    classes, inverse = torch.unique(
        joined, sorted=True, return_inverse=True, dim=0 if joined.ndim == 2 else None
    )
    ids = list(torch.split(inverse.to(torch.int64), [len(labels) for labels in label_sets]))
    return ids, classes

"""One input preparation for every evaluation entry point.

OPIS (:func:`pml_tcm.functional.opis`), the threshold calibration, the retrieval metrics,
the pml calculator and the report all take their sets through :func:`prepare_sets`, so
the same input gets the same checks, the same errors and the same numbers everywhere:

* embeddings: NumPy arrays or tensors, ``(N, D)`` with ``N, D >= 1`` (1-D, 3-D, 0 rows
  or size 0: a ``ValueError`` naming the argument); finite; no zero-norm row when the
  score needs a direction (cosine: as TCM and the CLI refuse them); detached (evaluation
  never needs a gradient); float16/bfloat16 (and integer) input is scored in float32,
  float64 stays float64;
* labels: any real dtype, ``(N,)`` or ``(N, K)`` rows, mapped to shared dense int64
  class ids (:func:`~pml_tcm.functional.labels.dense_class_ids`);
* ``ref_includes_query``: the references' rows ``[offset, offset + N)`` must *be* the
  queries (same values, same labels), not just be long enough: otherwise the self pairs
  removed would be the wrong pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .collectives import all_gather_values
from .labels import dense_class_ids
from .validation import check_embeddings_values, is_integer


@dataclass
class PreparedSets:
    """Checked evaluation sets, ready to stream.

    Attributes:
        queries: ``(N, D)`` float32 or float64, detached.
        query_ids: ``(N,)`` int64 dense class ids on the queries' device.
        references: ``(M, D)`` same dtype and device (the queries themselves when no
            reference set was given).
        reference_ids: ``(M,)`` int64 dense class ids.
        label_values: ``(C_all,)`` (or ``(C_all, K)``) the label of each id, on the CPU,
            in the labels' common dtype.
        self_offset: position of query 0 in the reference set when the references
            include the queries (self pairs are skipped), else ``None``.
        references_are_queries: no separate reference set was given.
        query_groups: ``(N,)`` int64 dense group ids of the queries (``None`` without
            groups).
        group_values: ``(U,)`` the group of each id, on the CPU (``None`` without groups).
    """

    queries: Tensor
    query_ids: Tensor
    references: Tensor
    reference_ids: Tensor
    label_values: Tensor
    self_offset: int | None
    references_are_queries: bool
    query_groups: Tensor | None = None
    group_values: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return 0 if self.group_values is None else self.group_values.shape[0]


def as_tensor(value: Any, name: str) -> Tensor:
    """A tensor view of a tensor or NumPy array (no copy where possible).

    Raises:
        ValueError: naming ``name``: neither a tensor nor a numeric array.
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            hint = ""
            if value.dtype.kind in "USO":  # names (e.g. customers): ids first
                hint = " (map names to integer ids first: np.unique(names, return_inverse=True))"
            raise ValueError(f"{name} must hold numbers, got dtype {value.dtype}{hint}")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise ValueError(f"{name} must be a torch.Tensor or a NumPy array, got {type(value).__name__}")


def evaluation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a set is scored in: float64 stays, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def prepare_embeddings(value: Any, name: str, *, require_direction: bool = True) -> Tensor:
    """One ``(N, D)`` set, checked, detached, in its evaluation dtype.

    One host-device synchronisation (the value checks).

    Raises:
        ValueError: naming ``name``: not 2-D, no rows, size 0, not numbers, NaN/Inf, a
            zero-norm row (with ``require_direction``).
    """
    embeddings = as_tensor(value, name)
    if embeddings.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (num_samples, embedding_size), got shape {tuple(embeddings.shape)}"
        )
    if embeddings.is_complex() or embeddings.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got {embeddings.dtype}")
    if embeddings.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if embeddings.shape[1] == 0:
        raise ValueError(f"{name} has embedding size 0")
    embeddings = embeddings.detach()
    embeddings = embeddings.to(evaluation_dtype(embeddings.dtype))
    check_embeddings_values(embeddings, name, require_direction=require_direction)
    return embeddings


def prepare_sets(
    queries: Any,
    query_labels: Any,
    references: Any = None,
    reference_labels: Any = None,
    *,
    ref_includes_query: bool = False,
    query_offset: int = 0,
    require_direction: bool = True,
    distributed: bool = False,
    groups: Any = None,
    names: tuple[str, str, str, str] = (
        "queries",
        "query_labels",
        "references",
        "reference_labels",
    ),
) -> PreparedSets:
    """Check and convert an evaluation's sets (see the module docstring).

    Args:
        queries: ``(N, D)`` embeddings (tensor or NumPy array).
        query_labels: ``(N,)`` labels (or ``(N, K)`` label rows), any real dtype.
        references: ``(M, D)``, or ``None`` for the queries themselves (self pairs
            skipped).
        reference_labels: ``(M,)`` labels, required with ``references``.
        ref_includes_query: ``references[query_offset : query_offset + N]`` are the
            queries (verified).
        query_offset: where query 0 sits in the references (a shard's start).
        require_direction: refuse zero-norm rows (the score normalises rows).
        distributed: number the labels of all ``torch.distributed`` ranks together
            (1-D labels only), so that every rank's class ids mean the same classes.
        groups: ``(N,)`` a group id per query (any label-like dtype), or ``None``;
            numbered like labels (over all ranks when ``distributed``); at least two
            groups are needed.
        names: the argument names used in error messages, in the order above.

    Returns:
        The :class:`PreparedSets`.

    Raises:
        ValueError: naming the argument.
    """
    q_name, ql_name, r_name, rl_name = names
    if not isinstance(ref_includes_query, bool):
        raise ValueError(f"ref_includes_query must be a bool, got {ref_includes_query!r}")
    if not is_integer(query_offset) or query_offset < 0:
        raise ValueError(f"query_offset must be a non-negative integer, got {query_offset!r}")
    if references is None and reference_labels is not None:
        raise ValueError(f"{rl_name} was given without {r_name}")
    if references is not None and reference_labels is None:
        raise ValueError(f"{rl_name} is required with {r_name}")
    query_set = prepare_embeddings(queries, q_name, require_direction=require_direction)
    query_labels = _labels(query_labels, ql_name, query_set.shape[0], q_name)
    if references is None:
        reference_set, reference_labels, self_offset = query_set, None, query_offset
    else:
        reference_set = prepare_embeddings(references, r_name, require_direction=require_direction)
        reference_labels = _labels(reference_labels, rl_name, reference_set.shape[0], r_name)
        if reference_set.shape[1] != query_set.shape[1]:
            raise ValueError(
                f"{r_name} has embedding size {reference_set.shape[1]} but {q_name} has "
                f"{query_set.shape[1]}"
            )
        dtype = torch.promote_types(query_set.dtype, reference_set.dtype)
        query_set = query_set.to(dtype)
        reference_set = reference_set.to(device=query_set.device, dtype=dtype)
        self_offset = query_offset if ref_includes_query else None
    label_sets = [query_labels] if reference_labels is None else [query_labels, reference_labels]
    ids, label_values = _class_ids(label_sets, [ql_name, rl_name][: len(label_sets)], distributed)
    query_ids = ids[0].to(query_set.device)
    reference_ids = ids[-1].to(query_set.device)
    if references is not None and ref_includes_query:
        _check_includes_queries(
            query_set, query_ids, reference_set, reference_ids, query_offset, names
        )
    query_groups = group_values = None
    if groups is not None:
        group_labels = _labels(groups, "groups", query_set.shape[0], q_name)
        if group_labels.ndim != 1:
            raise ValueError(
                f"groups must be 1-D (one group per query), got shape {tuple(group_labels.shape)}"
            )
        (query_groups,), group_values = _class_ids([group_labels], ["groups"], distributed)
        if group_values.shape[0] < 2:
            raise ValueError(
                "groups: every query is in one group; give at least two groups (without "
                "groups the rates are per class)"
            )
        query_groups = query_groups.to(query_set.device)
    return PreparedSets(
        queries=query_set,
        query_ids=query_ids,
        references=reference_set,
        reference_ids=query_ids if references is None else reference_ids,
        label_values=label_values.cpu(),
        self_offset=self_offset,
        references_are_queries=references is None,
        query_groups=query_groups,
        group_values=None if group_values is None else group_values.cpu(),
    )


def _class_ids(
    label_sets: list[Tensor], names: list[str], distributed: bool
) -> tuple[list[Tensor], Tensor]:
    """Dense class ids of the sets; with ``distributed``, numbered over all ranks."""
    ids, label_values = dense_class_ids(label_sets, names)
    if not distributed:
        return ids, label_values
    if label_values.ndim != 1 or label_values.dtype == torch.uint64:
        raise ValueError(
            f"{' and '.join(names)}: distributed evaluation needs 1-D labels that fit int64 "
            f"or float64, got {label_values.dtype} of shape {tuple(label_values.shape[1:])}"
        )
    common = torch.float64 if label_values.is_floating_point() else torch.int64
    local = label_values.to(common)
    everywhere = torch.unique(all_gather_values(local, distributed=True))
    renumber = torch.searchsorted(everywhere, local)
    return [renumber[i] for i in ids], everywhere.cpu()


def _labels(value: Any, name: str, expected: int, embeddings_name: str) -> Tensor:
    labels = as_tensor(value, name)
    if labels.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (one label per sample) or 2-D (one label row per sample), "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != expected:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but {embeddings_name} has {expected} rows"
        )
    return labels


def _check_includes_queries(
    queries: Tensor,
    query_ids: Tensor,
    references: Tensor,
    reference_ids: Tensor,
    offset: int,
    names: tuple[str, str, str, str],
) -> None:
    """``ref_includes_query``: the references' rows ``[offset, offset + N)`` are the
    queries, row for row, with the same labels."""
    q_name, ql_name, r_name, rl_name = names
    end = offset + queries.shape[0]
    if end > references.shape[0]:
        raise ValueError(
            f"ref_includes_query=True needs the {q_name} inside the {r_name}: offset "
            f"{offset} + {queries.shape[0]} rows > {references.shape[0]} rows"
        )
    if not torch.equal(references[offset:end], queries):
        rows = (references[offset:end] != queries).any(dim=1).nonzero()
        raise ValueError(
            f"ref_includes_query=True needs {r_name}[{offset}:{end}] to be the {q_name}; "
            f"row {int(rows[0, 0])} differs"
        )
    if not torch.equal(reference_ids[offset:end], query_ids):
        rows = (reference_ids[offset:end] != query_ids).nonzero()
        raise ValueError(
            f"ref_includes_query=True needs {rl_name}[{offset}:{end}] to be the {ql_name}; "
            f"row {int(rows[0, 0])} differs"
        )

"""Argument checks shared by the pml adapters."""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor

from .functional import validation
from .functional.tcm import PairIndices


def check_cosine_distance(distance: object, owner: str) -> None:
    """TCM's margins are cosine similarities: only pml's plain CosineSimilarity fits."""
    if type(distance) is not CosineSimilarity or distance.power != 1:
        raise ValueError(
            f"{owner} requires distance=CosineSimilarity() (its margins are cosine "
            f"similarities), got {type(distance).__name__}"
            + (f" with power={distance.power}" if hasattr(distance, "power") else "")
        )


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device`` without blocking the host.

    pml's trainers hand labels over on the CPU; a plain ``.to(device)`` waits for the GPU
    to finish its queue on every step. A non-blocking copy from pageable memory is staged
    before it returns, so the source may change afterwards.
    """
    if tensor.device == device:
        return tensor
    return tensor.to(device, non_blocking=True)


def prepare_batch(
    embeddings: Tensor,
    labels: Tensor | None,
    ref_emb: Tensor | None,
    ref_labels: Tensor | None,
    check_values: bool,
    owner: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Check a pml-style call and return ``(labels, ref_emb, ref_labels)`` on the device.

    ``ref_emb`` comes back as ``None`` when the batch is paired with itself, so that self
    pairs are excluded: no ``ref_emb``, or pml's stand-in for none, the batch itself with
    ``ref_labels`` absent or the very ``labels`` tensor. The batch passed as ``ref_emb``
    with other ``ref_labels`` is a separate reference set (self pairs included), as in
    pml's losses and miners.
    """
    validation.check_embeddings_shape(embeddings, "embeddings")
    if labels is None:
        raise ValueError(f"{owner} needs labels")
    validation.check_labels(labels, embeddings.shape[0], "labels")
    if ref_emb is None and ref_labels is not None and ref_labels is not labels:
        raise ValueError(
            f"{owner} got ref_labels but no ref_emb: pass both (a reference set) or neither "
            "(the batch against itself)"
        )
    batch_with_itself = ref_emb is None or (
        ref_emb is embeddings and (ref_labels is None or ref_labels is labels)
    )
    labels = to_device_async(labels, embeddings.device)
    if batch_with_itself:
        ref_emb = ref_labels = None
    else:
        validation.check_embeddings_shape(ref_emb, "ref_emb")
        if ref_emb.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"ref_emb has embedding size {ref_emb.shape[1]} but embeddings has "
                f"{embeddings.shape[1]}"
            )
        if ref_labels is None:
            raise ValueError(f"{owner} needs ref_labels when ref_emb is given")
        validation.check_labels(ref_labels, ref_emb.shape[0], "ref_labels")
        ref_labels = to_device_async(ref_labels, ref_emb.device)
    if check_values:
        validation.check_embeddings_values(embeddings, "embeddings")
        if ref_emb is not None:
            validation.check_embeddings_values(ref_emb, "ref_emb")
    return labels, ref_emb, ref_labels


def as_pairs(
    indices_tuple: tuple[Tensor, ...] | None,
    labels: Tensor,
    ref_labels: Tensor | None,
    device: torch.device,
) -> PairIndices | None:
    """pml's indices_tuple (pairs or triplets) as ``(a1, p, a2, n)`` on ``device``."""
    if indices_tuple is None:
        return None
    if len(indices_tuple) not in (3, 4):
        raise ValueError(
            "indices_tuple must be (anchors, positives, negatives) or "
            f"(anchors1, positives, anchors2, negatives), got {len(indices_tuple)} tensors"
        )
    for k, index in enumerate(indices_tuple):
        index = torch.as_tensor(index)
        if index.ndim != 1 or index.is_floating_point() or index.is_complex():
            raise ValueError(
                f"indices_tuple[{k}] must be a 1-D integer tensor, got "
                f"{index.dtype} of shape {tuple(index.shape)}"
            )
    lengths = {len(t) for t in indices_tuple[:2]} | {len(indices_tuple[-1])}
    if len(indices_tuple) == 3 and len(lengths) != 1:
        raise ValueError(f"indices_tuple: triplet tensors of different lengths {sorted(lengths)}")
    if len(indices_tuple) == 4 and (
        len(indices_tuple[0]) != len(indices_tuple[1])
        or len(indices_tuple[2]) != len(indices_tuple[3])
    ):
        raise ValueError("indices_tuple: a1/p and a2/n must have the same lengths")
    pairs = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
    return tuple(to_device_async(torch.as_tensor(x), device).long() for x in pairs)


def check_pair_range(pairs: PairIndices, num_queries: int, num_references: int) -> None:
    """Every index of ``(a1, p, a2, n)`` inside the queries / references (a host sync).

    Raises:
        ValueError: naming the offending tensor.
    """
    names = ("anchors (a1)", "positives (p)", "anchors (a2)", "negatives (n)")
    sizes = (num_queries, num_references, num_queries, num_references)
    for name, index, size in zip(names, pairs, sizes):
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < size):
            raise ValueError(
                f"indices_tuple: {name} must lie in [0, {size}), got values from "
                f"{int(index.min())} to {int(index.max())}"
            )

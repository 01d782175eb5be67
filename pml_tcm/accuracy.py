"""OPISAccuracyCalculator: pml's AccuracyCalculator with OPIS and ε-OPIS."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import EQUALITY, AccuracyCalculator
from torch import Tensor

from ._scores import score_function
from ._sharding import check_shard_queries, query_shard
from .functional import validation
from .functional.labels import dense_class_ids
from .functional.opis import OPISResult, opis

OPIS_METRICS = ("opis", "eps_opis", "neg_opis", "neg_eps_opis")
# pml casts labels to float32, which holds every integer up to 2^24 exactly.
MAX_FLOAT32_CLASSES = 2**24


class OPISAccuracyCalculator(AccuracyCalculator):
    """Adds the metrics ``"opis"`` and ``"eps_opis"`` to pml's ``AccuracyCalculator``.

    Also ``"neg_opis"`` and ``"neg_eps_opis"`` (minus each, from the same pass): pml's
    ``HookContainer`` keeps the epoch with the *largest* primary metric, and OPIS is
    lower-is-better, so select models with ``HookContainer(primary_metric="neg_opis")``.

    The definitions (pairs, F-β utility, FAR-defined calibration range, grid mean, the
    rule for classes without positives) are those of :mod:`pml_tcm.functional.opis`.
    Both metrics come from one streamed pass over the data per ``get_accuracy`` call and
    neither needs pml's k-NN search: ``include=("opis", "eps_opis")`` runs no k-NN.
    The last full result (curves included) is kept in :attr:`last_result`.

    With ``return_per_class=True``, ``"opis"`` is the list of ``⟨U_c⟩`` per distinct query
    label (ascending label order, like pml's per-class lists); ``"eps_opis"`` stays a
    float (it is not a per-class quantity).

    Labels of any size: ``get_accuracy`` maps the labels to dense class ids before pml
    sees them (pml compares labels as float32, where integers from 2^24 on collide), so
    every metric is exact for int8…int64 (any magnitude, negative too), unsigned, bool
    and float labels; :attr:`last_result` ``.classes`` holds the labels as given.

    A custom ``label_comparison_fn`` works as in pml; OPIS needs classes (equality), so
    the OPIS metrics (``"opis"``, ``"eps_opis"``, ``"neg_opis"``, ``"neg_eps_opis"``) are
    then left out of the default metrics, and asking for one in ``include`` raises a
    ``ValueError``.

    Args:
        calibration_range: explicit ``(t_lo, t_hi)`` in the distance's units, or ``None``
            for the range given by ``far_range``.
        far_range: ``(far_lo, far_hi)``, ``0 < far_lo <= far_hi <= 1``.
        num_thresholds: grid size, ``>= 2``.
        beta: β > 0 of the F-β utility.
        epsilon: ε in (0, 1) of ε-OPIS.
        distance: a pml distance (default ``CosineSimilarity()``); for a distance where
            smaller is closer (``not distance.is_inverted``, e.g. ``LpDistance``) a pair
            matches when its distance is ``<= t``.
        chunk_size: query rows per streamed block (default: a block of about 2^26 scores).
        shard_queries: ``"auto"`` splits the queries over the ``torch.distributed`` ranks
            when a process group with several ranks is initialised, each rank streaming
            its contiguous share against the whole reference set and the counts being
            summed with ``all_reduce`` (every rank must call ``get_accuracy`` with the same
            data); ``False`` never shards; ``True`` requires an initialised group.
        **kwargs: pml's ``AccuracyCalculator`` arguments (``include``, ``exclude``,
            ``return_per_class``, ``k``, ``device``, ...).

    Raises:
        ValueError: an invalid setting, a custom ``label_comparison_fn`` with the OPIS
            metrics in ``include``, or (in ``get_accuracy``) bad embeddings or labels.
    """

    def __init__(
        self,
        calibration_range: tuple[float, float] | None = None,
        far_range: tuple[float, float] = (1e-3, 1e-2),
        num_thresholds: int = 1000,
        beta: float = 1.0,
        epsilon: float = 0.1,
        distance: BaseDistance | None = None,
        chunk_size: int | None = None,
        shard_queries: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        validation.check_opis_settings(calibration_range, far_range, num_thresholds, beta, epsilon)
        if distance is None:
            distance = CosineSimilarity()
        if not isinstance(distance, BaseDistance):
            raise ValueError(f"distance must be a pml distance, got {type(distance).__name__}")
        validation.check_chunk_size(chunk_size)
        check_shard_queries(shard_queries)
        self.calibration_range = calibration_range
        self.far_range = tuple(far_range)
        self.num_thresholds = num_thresholds
        self.beta = beta
        self.epsilon = epsilon
        self.distance = distance
        self.chunk_size = chunk_size
        self.shard_queries = shard_queries
        self.last_result: OPISResult | None = None
        self._label_values: Tensor | None = None
        super().__init__(**kwargs)
        if self.label_comparison_fn is not EQUALITY:
            # Labels compared by a custom function need not be classes: OPIS (which needs
            # classes) is an error only when asked for by name, and otherwise left out of
            # the default metrics, so that everything pml accepts keeps working.
            _refuse_opis_with_custom_comparison(kwargs.get("include", ()))
            for name in OPIS_METRICS:
                self.original_function_dict.pop(name, None)
            self.curr_function_dict = self.get_function_dict()

    def get_accuracy(
        self,
        query: Any,
        query_labels: Any,
        reference: Any = None,
        reference_labels: Any = None,
        ref_includes_query: bool = False,
        include: tuple[str, ...] | list[str] = (),
        exclude: tuple[str, ...] | list[str] = (),
    ) -> dict:
        """pml's ``get_accuracy``, with the labels mapped to dense class ids first.

        With pml's default label comparison (equality), query and reference labels are
        replaced by their rank among the distinct labels of both sets before pml sees
        them: pml compares labels as float32, where integers from 2^24 on collide, and
        every metric (pml's and OPIS) then gives the values of the dense ids. Labels may
        be any integer, unsigned, bool or float dtype (``(N,)``, or ``(N, K)`` rows),
        tensors or NumPy arrays. With a custom ``label_comparison_fn`` the labels are
        passed on unchanged, as pml does. NaN/Inf embeddings are rejected first, naming
        the set.
        """
        if self.label_comparison_fn is not EQUALITY:
            _refuse_opis_with_custom_comparison(include)
        for name, embeddings in (("query", query), ("reference", reference)):
            if embeddings is not None and not bool(
                torch.isfinite(torch.as_tensor(embeddings)).all()
            ):
                raise ValueError(f"{name} contains NaN or Inf")
        self._label_values = None
        if self.label_comparison_fn is EQUALITY:
            query_labels, reference_labels, self._label_values = _dense_labels(
                query, query_labels, reference, reference_labels
            )
        return super().get_accuracy(
            query, query_labels, reference, reference_labels, ref_includes_query, include, exclude
        )

    def _get_accuracy(self, function_dict: dict, **kwargs: Any) -> dict:
        self.last_result = None
        return super()._get_accuracy(function_dict, **kwargs)

    def _opis_result(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
    ) -> OPISResult:
        if self.last_result is not None:
            return self.last_result
        query_labels = _integer_labels(query_labels, "query_labels")
        reference_labels = _integer_labels(reference_labels, "reference_labels")
        start, end, distributed = query_shard(query.shape[0], self.shard_queries)
        with torch.no_grad():
            result = opis(
                query[start:end],
                query_labels[start:end],
                reference,
                reference_labels,
                ref_includes_query=ref_includes_query,
                query_offset=start,
                calibration_range=self.calibration_range,
                far_range=self.far_range,
                num_thresholds=self.num_thresholds,
                beta=self.beta,
                epsilon=self.epsilon,
                score_fn=score_function(self.distance),
                higher_is_closer=self.distance.is_inverted,
                chunk_size=self.chunk_size,
                distributed=distributed,
            )
        if self._label_values is not None:  # the classes as the caller labelled them
            result = dataclasses.replace(result, classes=self._label_values[result.classes])
        self.last_result = result
        return result

    def calculate_opis(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        **kwargs: Any,
    ) -> float | list[float]:
        """OPIS (or ``⟨U_c⟩`` per class with ``return_per_class``)."""
        result = self._opis_result(
            query, query_labels, reference, reference_labels, ref_includes_query
        )
        if self.return_per_class:
            return result.mean_class_utility.tolist()
        return result.opis

    def calculate_eps_opis(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        **kwargs: Any,
    ) -> float:
        """ε-OPIS."""
        result = self._opis_result(
            query, query_labels, reference, reference_labels, ref_includes_query
        )
        return result.eps_opis

    def calculate_neg_opis(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        **kwargs: Any,
    ) -> float:
        """Minus OPIS, for selection by pml's ``HookContainer`` (which keeps the largest)."""
        result = self._opis_result(
            query, query_labels, reference, reference_labels, ref_includes_query
        )
        return -result.opis

    def calculate_neg_eps_opis(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
        **kwargs: Any,
    ) -> float:
        """Minus ε-OPIS."""
        result = self._opis_result(
            query, query_labels, reference, reference_labels, ref_includes_query
        )
        return -result.eps_opis


def _refuse_opis_with_custom_comparison(include: Any) -> None:
    requested = [name for name in OPIS_METRICS if name in tuple(include)]
    if requested:
        raise ValueError(
            f"label_comparison_fn: the OPIS metrics {requested} need labels compared by "
            "equality (classes); leave them out of include to use a custom comparison"
        )


def _dense_labels(
    query: Any, query_labels: Any, reference: Any, reference_labels: Any
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Query and reference labels as dense int64 ids, and the label of each id."""
    sets, names = [_label_tensor(query_labels, "query_labels")], ["query_labels"]
    if reference is not None and reference_labels is not None:
        sets.append(_label_tensor(reference_labels, "reference_labels"))
        names.append("reference_labels")
    ids, classes = dense_class_ids(sets, names)
    if len(classes) > MAX_FLOAT32_CLASSES:
        raise ValueError(
            f"query_labels/reference_labels: {len(classes)} distinct labels; pml compares "
            f"class ids as float32, exact only up to {MAX_FLOAT32_CLASSES} classes"
        )
    return ids[0], (ids[1] if len(ids) > 1 else reference_labels), classes.cpu()


def _label_tensor(labels: Any, name: str) -> Tensor:
    if isinstance(labels, np.ndarray):
        try:
            return torch.from_numpy(labels)
        except TypeError as error:
            raise ValueError(f"{name} must hold numbers, got dtype {labels.dtype}") from error
    if not isinstance(labels, Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor or a NumPy array, got {type(labels).__name__}"
        )
    return labels


def _integer_labels(labels: Tensor, name: str) -> Tensor:
    """pml hands labels over as float; OPIS needs them back as int64 class ids."""
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D for OPIS, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not torch.equal(labels, labels.round()):
            raise ValueError(f"{name} must hold integer class ids")
    return labels.to(torch.int64)

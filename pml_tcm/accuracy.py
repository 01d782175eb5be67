"""OPISAccuracyCalculator: pml's AccuracyCalculator with OPIS and ε-OPIS."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from torch import Tensor

from ._sharding import check_shard_queries, query_shard, score_function
from .functional import validation
from .functional.opis import OPISResult, opis

OPIS_METRICS = ("opis", "eps_opis", "neg_opis", "neg_eps_opis")


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
            metrics, or (in ``get_accuracy``) bad embeddings or labels.
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
        super().__init__(**kwargs)
        if kwargs.get("label_comparison_fn") and self._opis_requested():
            raise ValueError(
                "label_comparison_fn: OPIS needs plain label equality; exclude 'opis' and "
                "'eps_opis' to use a custom comparison"
            )

    def _opis_requested(self) -> bool:
        return any(m in self.get_curr_metrics() for m in OPIS_METRICS)

    def get_accuracy(self, query: Any, query_labels: Any, *args: Any, **kwargs: Any) -> dict:
        """pml's ``get_accuracy``; NaN/Inf embeddings are rejected first, naming the set."""
        reference = args[0] if args else kwargs.get("reference")
        for name, embeddings in (("query", query), ("reference", reference)):
            if embeddings is not None and not bool(
                torch.isfinite(torch.as_tensor(embeddings)).all()
            ):
                raise ValueError(f"{name} contains NaN or Inf")
        return super().get_accuracy(query, query_labels, *args, **kwargs)

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
            self.last_result = opis(
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
        return self.last_result

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


def _integer_labels(labels: Tensor, name: str) -> Tensor:
    """pml hands labels over as float; OPIS needs them back as int64 class ids."""
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D for OPIS, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not torch.equal(labels, labels.round()):
            raise ValueError(f"{name} must hold integer class ids")
    return labels.to(torch.int64)

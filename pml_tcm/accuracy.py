"""OPISAccuracyCalculator: pml's AccuracyCalculator with OPIS and ε-OPIS."""

from __future__ import annotations

import dataclasses
from typing import Any

from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import EQUALITY, AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from torch import Tensor

from ._scores import needs_direction, score_function
from ._sharding import check_shard_queries, data_fingerprint, query_shard
from .functional import validation
from .functional.bootstrap import check_bootstrap_settings
from .functional.opis import OPISResult, opis_of_sets
from .functional.prepare import PreparedSets, prepare_sets

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

    With ``return_per_class=True``, ``"opis"`` is the list of ``⟨U_c⟩`` per query class
    that has a positive pair, in ascending label order: the classes and the order of
    pml's per-class lists (pml leaves out the queries without a positive, OPIS the
    classes without one), so ``zip`` with ``"precision_at_1"`` pairs the same classes;
    ``"eps_opis"`` stays a float (it is not a per-class quantity).

    Every call computes on its own inputs: the OPIS metrics of one ``get_accuracy`` call
    share one pass, and a ``calculate_opis`` call made directly (outside
    ``get_accuracy``) evaluates the sets it is given.

    Labels of any size: ``get_accuracy`` maps the labels to dense class ids before pml
    sees them (pml compares labels as float32, where integers from 2^24 on collide), so
    every metric is exact for int8…int64 (any magnitude, negative too), unsigned, bool
    and float labels; :attr:`last_result` ``.classes`` holds the labels as given.

    Groups: ``get_accuracy(..., groups=g)`` (a group id per query, e.g. the customer)
    computes the OPIS metrics across groups instead of classes (a group's pairs are the
    pairs of its queries; see :func:`pml_tcm.functional.opis`), so
    ``HookContainer(primary_metric="neg_opis")`` selects on group OPIS; pml's own metrics
    are unchanged. Inside pml's testers use :class:`pml_tcm.GroupedEmbeddingSpaceTester`,
    which takes the groups from a label column. ``bootstrap=B`` adds percentile intervals
    to :attr:`last_result` (``opis_interval``, ``eps_opis_interval``).

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
            matches when its distance is ``<= t``. Given explicitly (and no ``knn_func``),
            pml's k-NN metrics rank with it too (``CustomKNN(distance)``), so one result
            never mixes two geometries; by default pml's own ``knn_func`` is kept.
        chunk_size: query rows per streamed block (default: a block of about 2^23 scores on
            the CPU, 2^26 on an accelerator).
        shard_queries: ``False`` (default) never communicates: each process evaluates
            what it is given, with or without a process group (rank 0 alone while the
            others wait, or each rank its own shard). ``True`` splits the queries over the
            ``torch.distributed`` ranks, each streaming its contiguous share against the
            whole reference set, the counts summed so every rank gets the one-process
            result: every rank must then call ``get_accuracy`` with the same data and
            settings (checked first, in one small collective: a mismatch is a
            ``ValueError`` on every rank). ``"auto"`` is ``True`` when a group with
            several ranks is initialised.
        bootstrap: ``B`` replicates of percentile intervals on OPIS and ε-OPIS (classes,
            or groups, resampled; no second pass), ``0`` (default) for none.
        confidence: the intervals' level in (0, 1).
        seed: the bootstrap's seed.
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
        shard_queries: bool | str = False,
        bootstrap: int = 0,
        confidence: float = 0.95,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        validation.check_opis_settings(calibration_range, far_range, num_thresholds, beta, epsilon)
        if distance is not None and not isinstance(distance, BaseDistance):
            raise ValueError(f"distance must be a pml distance, got {type(distance).__name__}")
        if distance is not None and kwargs.get("knn_func") is None:
            # pml's k-NN metrics rank with the same geometry as OPIS
            kwargs["knn_func"] = CustomKNN(distance)
        if distance is None:
            distance = CosineSimilarity()
        validation.check_chunk_size(chunk_size)
        check_shard_queries(shard_queries)
        check_bootstrap_settings(bootstrap, confidence, seed)
        self.bootstrap, self.confidence, self.seed = bootstrap, confidence, seed
        self.calibration_range = calibration_range
        self.far_range = tuple(far_range)
        self.num_thresholds = num_thresholds
        self.beta = beta
        self.epsilon = epsilon
        self.distance = distance
        self.chunk_size = chunk_size
        self.shard_queries = shard_queries
        self.last_result: OPISResult | None = None
        self._sets = None
        self._call_tensors: tuple[Tensor, Tensor] | None = None
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
        groups: Any = None,
    ) -> dict:
        """pml's ``get_accuracy``, on sets prepared once for every metric.

        ``groups``: ``(N,)`` a group id per query (any label-like dtype, tensor or NumPy;
        at least two groups): the OPIS metrics are then taken across groups
        (``last_result.by == "group"``); ``return_per_class`` is refused with groups (its
        lists are per class, the OPIS rows would be groups).

        The sets go through :func:`~pml_tcm.functional.prepare.prepare_sets` first (NumPy
        or torch; 1-D, 3-D or empty sets, NaN/Inf and zero-norm rows refused naming the
        argument; ``ref_includes_query`` verified row for row). With pml's default label
        comparison (equality), query and reference labels are then replaced by their
        rank among the distinct labels of both sets before pml sees them: pml compares
        labels as float32, where integers from 2^24 on collide, and every metric (pml's
        and OPIS) then gives the values of the dense ids. Labels may be any integer,
        unsigned, bool or float dtype (``(N,)``, or ``(N, K)`` rows). With a custom
        ``label_comparison_fn`` the labels are passed on unchanged, as pml does.
        """
        if self.label_comparison_fn is not EQUALITY:
            _refuse_opis_with_custom_comparison(include)
        if groups is not None and self.return_per_class:
            raise ValueError(
                "groups: return_per_class lists per class, while with groups the OPIS "
                "rows are groups; read calculator.last_result for the per-group curves"
            )
        sets = prepare_sets(
            query,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query=ref_includes_query,
            require_direction=needs_direction(self.distance),
            groups=groups,
            names=("query", "query_labels", "reference", "reference_labels"),
        )
        if len(sets.label_values) > MAX_FLOAT32_CLASSES:
            raise ValueError(
                f"query_labels/reference_labels: {len(sets.label_values)} distinct labels; "
                f"pml compares class ids as float32, exact only up to {MAX_FLOAT32_CLASSES} "
                "classes"
            )
        self._sets, self.last_result = sets, None
        if self.label_comparison_fn is EQUALITY:
            query_labels, reference_labels = sets.query_ids, sets.reference_ids
        reference = None if sets.references_are_queries else sets.references
        if reference is None:
            reference_labels = None
        return super().get_accuracy(
            sets.queries,
            query_labels,
            reference,
            reference_labels,
            ref_includes_query,
            include,
            exclude,
        )

    def _get_accuracy(self, function_dict: dict, **kwargs: Any) -> dict:
        # the tensors pml hands every metric of this call: how a metric tells that it
        # is part of it (and may use the prepared sets) from a direct call on new data
        self._call_tensors = (kwargs["query"], kwargs["reference"])
        try:
            return super()._get_accuracy(function_dict, **kwargs)
        finally:
            self._call_tensors = None

    def _opis_result(
        self,
        query: Tensor,
        query_labels: Tensor,
        reference: Tensor,
        reference_labels: Tensor,
        ref_includes_query: bool,
    ) -> OPISResult:
        """OPIS of this ``get_accuracy`` call (one pass for all four OPIS metrics), or of
        the given sets when a metric is called directly."""
        in_call = self._call_tensors is not None and (
            query is self._call_tensors[0] and reference is self._call_tensors[1]
        )
        if in_call and self.last_result is not None:
            return self.last_result
        if in_call:
            sets = self._sets
        else:
            sets = prepare_sets(
                query,
                query_labels,
                None if ref_includes_query and reference is query else reference,
                None if ref_includes_query and reference is query else reference_labels,
                ref_includes_query=ref_includes_query,
                require_direction=needs_direction(self.distance),
                names=("query", "query_labels", "reference", "reference_labels"),
            )
        start, end, distributed = query_shard(
            sets.queries.shape[0], self.shard_queries, settings=self._settings(sets)
        )
        shard = dataclasses.replace(
            sets,
            queries=sets.queries[start:end],
            query_ids=sets.query_ids[start:end],
            self_offset=None if sets.self_offset is None else sets.self_offset + start,
            query_groups=None if sets.query_groups is None else sets.query_groups[start:end],
        )
        result = opis_of_sets(
            shard,
            calibration_range=self.calibration_range,
            far_range=self.far_range,
            num_thresholds=self.num_thresholds,
            beta=self.beta,
            epsilon=self.epsilon,
            score_fn=score_function(self.distance),
            higher_is_closer=self.distance.is_inverted,
            chunk_size=self.chunk_size,
            distributed=distributed,
            bootstrap=self.bootstrap,
            confidence=self.confidence,
            seed=self.seed,
        )
        if in_call:
            self.last_result = result
        return result

    def _settings(self, sets: PreparedSets) -> tuple:
        """What every rank must agree on before a sharded evaluation."""
        if self.shard_queries is False:
            return ()
        arrays = [sets.queries, sets.query_ids, sets.references, sets.reference_ids]
        if sets.query_groups is not None:
            arrays.append(sets.query_groups)
        return (
            data_fingerprint(*arrays),
            self.calibration_range,
            self.far_range,
            self.num_thresholds,
            self.beta,
            self.epsilon,
            type(self.distance).__name__,
            self.chunk_size,
            self.bootstrap,
            self.confidence,
            self.seed,
        )

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
            return result.mean_class_utility[~result.excluded].tolist()
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

"""GroupedEmbeddingSpaceTester: pml's global-embedding-space tester with query groups."""

from __future__ import annotations

from typing import Any

from pytorch_metric_learning.testers import GlobalEmbeddingSpaceTester

from .accuracy import OPISAccuracyCalculator


class GroupedEmbeddingSpaceTester(GlobalEmbeddingSpaceTester):
    """pml's ``GlobalEmbeddingSpaceTester`` whose datasets carry a group id per sample.

    The dataset returns label rows ``(class, ..., group)``: the ``group_column`` is
    taken off before evaluation and passed to
    :meth:`OPISAccuracyCalculator.get_accuracy` as ``groups`` (the query split's groups),
    so the OPIS metrics (and ``HookContainer(primary_metric="neg_opis")`` model
    selection) are across groups, while pml's metrics see the class columns exactly as
    with the plain tester (``label_hierarchy_level`` counts the class columns only).
    Trainers read column 0 (their ``label_hierarchy_level``) for the loss, so the
    same dataset trains and tests.

    Args:
        group_column: the label column holding the group (default: the last).
        *args: pml's ``GlobalEmbeddingSpaceTester`` arguments.
        **kwargs: pml's ``GlobalEmbeddingSpaceTester`` arguments; ``accuracy_calculator``
            must be an :class:`OPISAccuracyCalculator`.

    Raises:
        ValueError: another accuracy calculator, or labels without a group column.
    """

    def __init__(self, *args: Any, group_column: int = -1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.accuracy_calculator, OPISAccuracyCalculator):
            raise ValueError(
                "accuracy_calculator: GroupedEmbeddingSpaceTester passes groups, which only "
                f"OPISAccuracyCalculator takes (got {type(self.accuracy_calculator).__name__})"
            )
        self.group_column = group_column

    def _split_groups(self, labels: Any) -> tuple[Any, Any]:
        """``(class columns, group column)`` of ``(N, K + 1)`` label rows."""
        if labels.ndim != 2 or labels.shape[1] < 2:
            raise ValueError(
                "labels: GroupedEmbeddingSpaceTester needs label rows (class, ..., group), "
                f"got shape {tuple(labels.shape)}"
            )
        column = self.group_column % labels.shape[1]
        keep = [c for c in range(labels.shape[1]) if c != column]
        return labels[:, keep], labels[:, column]

    def do_knn_and_accuracies(
        self, accuracies, embeddings_and_labels, query_split_name, reference_split_names
    ):
        query, query_labels, reference, reference_labels = self.set_reference_and_query(
            embeddings_and_labels, query_split_name, reference_split_names
        )
        query_labels, groups = self._split_groups(query_labels)
        reference_labels, _ = self._split_groups(reference_labels)
        self.label_levels = self.label_levels_to_evaluate(query_labels)
        for level in self.label_levels:
            values = self.accuracy_calculator.get_accuracy(
                query,
                query_labels[:, level],
                reference,
                reference_labels[:, level],
                self.ref_includes_query(query_split_name, reference_split_names),
                groups=groups,
            )
            for metric, value in values.items():
                accuracies[self.accuracies_keyname(metric, label_hierarchy_level=level)] = value
        if len(self.label_levels) > 1:
            self.calculate_average_accuracies(
                accuracies, self.accuracy_calculator.get_curr_metrics(), self.label_levels
            )

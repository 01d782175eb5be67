"""``pml-tcm report``: accuracy, OPIS and a calibrated threshold for saved embeddings.

One way through: :mod:`~pml_tcm.report.inputs` checks the settings, the output folder
and the files and loads each ``.npy`` once; :func:`~pml_tcm.report.compute.compute_report`
computes every number; :mod:`~pml_tcm.report.render` lays them out as text, Markdown,
JSON and the figure; :func:`~pml_tcm.report.command.report_embeddings` runs the three and
writes the files as one set.
"""

from .command import report_embeddings
from .compute import REPORT_METRICS, EmbeddingReport, compute_report
from .inputs import ReportInputError, load_embeddings, load_groups, load_labels

__all__ = [
    "REPORT_METRICS",
    "EmbeddingReport",
    "ReportInputError",
    "compute_report",
    "load_embeddings",
    "load_groups",
    "load_labels",
    "report_embeddings",
]

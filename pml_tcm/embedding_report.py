"""The former home of ``pml-tcm report``, now :mod:`pml_tcm.report`; the names the demo
and some tests import from here stay importable."""

from .report.compute import REPORT_METRICS, compute_report

__all__ = ["REPORT_METRICS", "compute_report"]

"""pml-tcm: Threshold-Consistent Margin loss and OPIS for pytorch-metric-learning."""

# ruff: noqa: E402 (the pml version is checked before any module that imports pml's API)

_SUPPORTED_PML = ">=2.7,<3"


def _check_pml_version() -> None:
    """Refuse pml 3 with one sentence, before its missing modules fail an import below."""
    import importlib.metadata
    import re

    import pytorch_metric_learning

    # pml 2 sets __version__; pml 3 removed it, so the installed distribution tells.
    version = getattr(pytorch_metric_learning, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("pytorch-metric-learning")
        except importlib.metadata.PackageNotFoundError:
            return
    major = re.match(r"\d+", str(version))
    if major is not None and int(major.group()) >= 3:
        raise ImportError(
            f"pml-tcm supports pytorch-metric-learning {_SUPPORTED_PML}, not the installed "
            f"{version}, because pml 3 removed the trainers, testers, logging presets and "
            "recorded statistics that pml-tcm builds on and moved AccuracyCalculator to "
            "pytorch_metric_learning.evaluation (pip install "
            f"'pytorch-metric-learning{_SUPPORTED_PML}')."
        )


_check_pml_version()

from .accuracy import OPISAccuracyCalculator
from .calibration import CalibrationReport, calibrate_threshold
from .losses import ThresholdConsistentMarginLoss
from .miner import TCMMiner
from .plotting import plot_group_rates, plot_utility_curves
from .provenance import VERSION as __version__
from .regularizer import TCMRegularizer
from .testers import GroupedEmbeddingSpaceTester
from .wrapping import with_tcm

__all__ = [
    "CalibrationReport",
    "GroupedEmbeddingSpaceTester",
    "OPISAccuracyCalculator",
    "TCMMiner",
    "TCMRegularizer",
    "ThresholdConsistentMarginLoss",
    "calibrate_threshold",
    "plot_group_rates",
    "plot_utility_curves",
    "with_tcm",
    "__version__",
]

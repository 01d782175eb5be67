"""pml-tcm: Threshold-Consistent Margin loss and OPIS for pytorch-metric-learning."""

from .accuracy import OPISAccuracyCalculator
from .calibration import CalibrationReport, calibrate_threshold
from .losses import ThresholdConsistentMarginLoss
from .miner import TCMMiner
from .plotting import plot_utility_curves
from .provenance import VERSION as __version__
from .regularizer import TCMRegularizer
from .wrapping import with_tcm

__all__ = [
    "CalibrationReport",
    "OPISAccuracyCalculator",
    "TCMMiner",
    "TCMRegularizer",
    "ThresholdConsistentMarginLoss",
    "calibrate_threshold",
    "plot_utility_curves",
    "with_tcm",
    "__version__",
]

"""pml-tcm: Threshold-Consistent Margin loss and OPIS for pytorch-metric-learning."""

from .accuracy import OPISAccuracyCalculator
from .miner import TCMMiner
from .regularizer import TCMRegularizer
from .wrapping import with_tcm

__version__ = "0.1.0"

__all__ = [
    "OPISAccuracyCalculator",
    "TCMMiner",
    "TCMRegularizer",
    "with_tcm",
    "__version__",
]

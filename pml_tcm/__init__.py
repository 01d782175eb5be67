"""pml-tcm: Threshold-Consistent Margin loss and OPIS for pytorch-metric-learning."""

from .miner import TCMMiner
from .regularizer import TCMRegularizer
from .wrapping import with_tcm

__version__ = "0.1.0"

__all__ = ["TCMMiner", "TCMRegularizer", "with_tcm", "__version__"]

"""The demo's optional dependencies (the ``examples`` extra), imported with a clear error.

scikit-learn provides the digits data set, matplotlib draws the figures; neither is
needed by the library itself.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..plotting import INSTALL_HINT

INSTALL = INSTALL_HINT  # the library's figures name the same extra
PACKAGES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def import_optional(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (e.g. ``"matplotlib.figure"``) for ``purpose``.

    Raises:
        ImportError: one line naming the package and the extra to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = PACKAGES.get(module.split(".")[0], module.split(".")[0])
        raise ImportError(f"{purpose} needs {package}: {INSTALL}") from error


def missing_packages(modules: list[str]) -> list[str]:
    """The packages among ``modules`` that cannot be imported (their PyPI names)."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(PACKAGES.get(module.split(".")[0], module))
    return missing

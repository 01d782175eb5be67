"""One colour per class in every figure the demo writes.

matplotlib's ``tab10``, keyed by the class label (not by a class's position in one
figure), starting with the unseen classes 5-9: class 5 is ``tab10``'s first colour in
the utility curves and on the circle alike, and a class missing from one panel shifts
no other class's colour.
"""

from __future__ import annotations

from typing import Any

from .extras import import_optional
from .settings import UNSEEN_CLASSES


def class_colour(label: int) -> Any:
    """The RGBA colour of class ``label`` (``tab10``, classes 5, 6, ..., 9, 0, ..., 4 in
    its order; labels 10 and up repeat the cycle).

    Raises:
        ImportError: matplotlib is not installed (the ``examples`` extra).
    """
    colormaps = import_optional("matplotlib", "the demo's figures").colormaps
    return colormaps["tab10"]((int(label) - UNSEEN_CLASSES[0]) % 10)

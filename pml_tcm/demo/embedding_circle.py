"""2-D embeddings on the unit circle, coloured by class: baseline beside +TCM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .class_colours import class_colour
from .extras import import_optional

RING_STEP = 0.08
CAPTION = (
    "Unseen classes of a 2-D ArcFace embedding: each point sits at its embedding's angle; "
    "only the angle matters.\nEach class is drawn on its own ring (radius 1, {step:g} "
    "further out per class) so that overlapping classes stay visible. Lower OPIS is better,\n"
    "but OPIS measures consistency, not accuracy: a weak embedding whose classes are all about "
    "equally bad can have a tiny OPIS."
)


def embedding_circle_figure(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str] | None = None,
    caption: str | None = None,
):
    """One panel per ``(title, embeddings, labels)``, embeddings of dimension 2.

    Each embedding is normalised and drawn at its angle; every class gets its own ring
    (radius 1, 1.08, 1.16, ...) so overlapping classes stay visible, as in the paper's
    MNIST toy figure. The panels have the same size and limits, the legend is outside
    them and the caption says what the radii mean.

    Args:
        panels: ``(title, (N, 2) embeddings, (N,) labels)`` per panel.
        class_names: names indexed by label, for the legend.
        caption: the line(s) above the panels (default: what is plotted and how).

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ValueError: an embedding is not 2-D.
        ImportError: matplotlib is not installed (the ``examples`` extra).
    """
    Figure = import_optional("matplotlib.figure", "the circle figure").Figure

    all_labels = np.unique(np.concatenate([np.asarray(labels) for _, _, labels in panels]))
    rings = {int(label): 1.0 + RING_STEP * ring for ring, label in enumerate(all_labels)}
    limit = max(rings.values()) + 0.06
    figure = Figure(figsize=(4.6 * len(panels) + 1.4, 5.2), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    handles = {}
    for axis, (title, embeddings, labels) in zip(axes, panels, strict=True):
        embeddings = np.asarray(embeddings, dtype=np.float64)
        labels = np.asarray(labels)
        if embeddings.ndim != 2 or embeddings.shape[1] != 2:
            raise ValueError(
                f"embedding_circle_figure needs (N, 2) embeddings, got {embeddings.shape}"
            )
        angles = np.arctan2(embeddings[:, 1], embeddings[:, 0])
        circle = np.linspace(0.0, 2.0 * np.pi, 361)
        axis.plot(np.cos(circle), np.sin(circle), color="0.8", linewidth=1)
        for label in np.unique(labels):
            chosen = labels == label
            radius = rings[int(label)]
            name = class_names[int(label)] if class_names is not None else str(label)
            handles[int(label)] = axis.scatter(
                radius * np.cos(angles[chosen]),
                radius * np.sin(angles[chosen]),
                s=6,
                alpha=0.5,
                color=class_colour(int(label)),
                label=name,
            )
        axis.set_title(title, fontsize=10)
        axis.set_xlim(-limit, limit)
        axis.set_ylim(-limit, limit)
        axis.set_aspect("equal")
        axis.set_xticks([])
        axis.set_yticks([])
    figure.legend(
        handles=[handles[label] for label in sorted(handles)],
        loc="outside right center",
        fontsize=8,
        markerscale=2.5,
        frameon=False,
        title="class",
        title_fontsize=8,
    )
    figure.suptitle(caption if caption is not None else CAPTION.format(step=RING_STEP), fontsize=9)
    return figure

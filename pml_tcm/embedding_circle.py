"""2-D embeddings on the unit circle, coloured by class: baseline beside +TCM."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def embedding_circle_figure(
    panels: Sequence[tuple[str, np.ndarray, np.ndarray]],
    class_names: Sequence[str] | None = None,
):
    """One panel per ``(title, embeddings, labels)``, embeddings of dimension 2.

    Each embedding is normalised and drawn at its angle; every class gets its own ring
    (radius 1, 1.08, 1.16, ...) so overlapping classes stay visible, as in the paper's
    MNIST toy figure.

    Args:
        panels: ``(title, (N, 2) embeddings, (N,) labels)`` per panel.
        class_names: names indexed by label, for the legend.

    Returns:
        A matplotlib ``Figure``.

    Raises:
        ValueError: an embedding is not 2-D.
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels), 5.3), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)
    colours = colormaps["tab10"]
    for axis, (title, embeddings, labels) in zip(axes[0], panels, strict=True):
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if embeddings.ndim != 2 or embeddings.shape[1] != 2:
            raise ValueError(
                f"embedding_circle_figure needs (N, 2) embeddings, got {embeddings.shape}"
            )
        angles = np.arctan2(embeddings[:, 1], embeddings[:, 0])
        circle = np.linspace(0.0, 2.0 * np.pi, 361)
        axis.plot(np.cos(circle), np.sin(circle), color="0.8", linewidth=1)
        for ring, label in enumerate(np.unique(labels)):
            chosen = labels == label
            radius = 1.0 + 0.08 * ring
            name = class_names[int(label)] if class_names is not None else str(label)
            axis.scatter(
                radius * np.cos(angles[chosen]),
                radius * np.sin(angles[chosen]),
                s=6,
                alpha=0.5,
                color=colours(int(label) % 10),
                label=name,
            )
        axis.set_title(title)
        axis.set_aspect("equal")
        axis.set_xticks([])
        axis.set_yticks([])
        axis.legend(loc="center", fontsize=8, markerscale=2, frameon=False)
    return figure

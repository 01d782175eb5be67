"""Markdown table of the open-world experiment: mean +- std over seeds, and TCM's effect."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .experiment import METRICS, ArmResult

METRIC_HEADERS = {
    "precision_at_1": "R@1 (%)",
    "mean_average_precision_at_r": "MAP@R (%)",
    "opis": "OPIS (x1e-3)",
    "eps_opis": "ε-OPIS (x1e-3)",
}
# Shown as percentages (x100) or per mille (x1000), and how TCM's change is given.
_SCALE = {
    "precision_at_1": 100.0,
    "mean_average_precision_at_r": 100.0,
    "opis": 1000.0,
    "eps_opis": 1000.0,
}
_RELATIVE_CHANGE = {"opis", "eps_opis"}
_LOSS_TITLES = {"multisimilarity": "MultiSimilarity", "arcface": "ArcFace"}


def metric_values(results: Sequence[ArmResult], loss: str, tcm: bool) -> dict[str, np.ndarray]:
    """Each metric over the seeds of one arm, ordered by seed."""
    arm = sorted(
        (r for r in results if r.config.loss == loss and r.config.tcm == tcm),
        key=lambda r: r.config.seed,
    )
    return {m: np.array([r.metrics[m] for r in arm], dtype=np.float64) for m in METRICS}


def tcm_change(metric: str, baseline: np.ndarray, with_tcm: np.ndarray) -> str:
    """TCM's change of the mean: absolute (points) for accuracies, relative % for OPIS."""
    if baseline.size == 0 or with_tcm.size == 0:
        return "n/a"
    before, after = baseline.mean(), with_tcm.mean()
    if metric in _RELATIVE_CHANGE:
        if before == 0:
            return "n/a"
        return f"{100.0 * (after - before) / before:+.1f} %"
    return f"{_SCALE[metric] * (after - before):+.2f} pts"


def markdown_table(results: Sequence[ArmResult]) -> str:
    """The results as a Markdown table.

    One row per (loss, without/with TCM) with ``mean ± std`` over seeds (population std;
    ``± 0`` for a single seed), then a row with TCM's change: absolute points for R@1 and
    MAP@R, relative % for OPIS and ε-OPIS (lower OPIS = more threshold-consistent).
    """
    header = ["Loss", "TCM", "seeds"] + [METRIC_HEADERS[m] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    losses = list(dict.fromkeys(r.config.loss for r in results))
    for loss in losses:
        title = _LOSS_TITLES.get(loss, loss)
        arms = {tcm: metric_values(results, loss, tcm) for tcm in (False, True)}
        for tcm, values in arms.items():
            seeds = len(values[METRICS[0]])
            if seeds == 0:
                continue
            cells = [_mean_std(values[m], _SCALE[m]) for m in METRICS]
            lines.append(
                f"| {title} | {'yes' if tcm else 'no'} | {seeds} | " + " | ".join(cells) + " |"
            )
        changes = [tcm_change(m, arms[False][m], arms[True][m]) for m in METRICS]
        lines.append(f"| {title} | change | | " + " | ".join(changes) + " |")
    return "\n".join(lines)


def _mean_std(values: np.ndarray, scale: float) -> str:
    scaled = values * scale
    return f"{scaled.mean():.2f} ± {scaled.std():.2f}"

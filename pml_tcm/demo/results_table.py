"""The open-world experiment's results as a reader sees them: the Markdown table (mean ±
std over seeds, TCM's effect, flagged where TCM made a metric worse) and a plain-language
reading of it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..embedding_report import REPORT_METRICS
from .experiment import ArmResult
from .settings import LOSS_TITLES

METRIC_HEADERS = {
    "precision_at_1": "R@1 (%) ↑",
    "mean_average_precision_at_r": "MAP@R (%) ↑",
    "opis": "OPIS (x1e-3) ↓",
    "eps_opis": "ε-OPIS (x1e-3) ↓",
}
METRIC_NAMES = {
    "precision_at_1": "R@1",
    "mean_average_precision_at_r": "MAP@R",
    "opis": "OPIS",
    "eps_opis": "ε-OPIS",
}
# Shown as percentages (x100) or per mille (x1000), and how TCM's change is given.
_SCALE = {
    "precision_at_1": 100.0,
    "mean_average_precision_at_r": 100.0,
    "opis": 1000.0,
    "eps_opis": 1000.0,
}
_RELATIVE_CHANGE = {"opis", "eps_opis"}
LOWER_IS_BETTER = frozenset({"opis", "eps_opis"})
WORSE = "worse"


def table_key(single_seed: bool) -> str:
    """One line under the printed table: the arrows, ``n = 1`` (when ``single_seed``)
    and the ``worse`` flag."""
    single = "n = 1: a single run, no spread; " if single_seed else "mean ± std over n seeds; "
    return f"↑ higher is better, ↓ lower is better; {single}'{WORSE}': TCM moved it the wrong way."


TABLE_LEGEND = (
    "↑ higher is better, ↓ lower is better. Cells: mean ± std (population) over n seeds; "
    "n = 1 is a single run, which has no spread. change: TCM's effect on the mean, in "
    f"points for R@1 and MAP@R, relative % for OPIS and ε-OPIS; '{WORSE}': TCM moved the "
    "metric the wrong way."
)


def metric_values(results: Sequence[ArmResult], loss: str, tcm: bool) -> dict[str, np.ndarray]:
    """Each metric over the seeds of one arm, ordered by seed."""
    arm = sorted(
        (r for r in results if r.config.loss == loss and r.config.tcm == tcm),
        key=lambda r: r.config.seed,
    )
    return {m: np.array([r.metrics[m] for r in arm], dtype=np.float64) for m in REPORT_METRICS}


@dataclass(frozen=True)
class TCMEffect:
    """TCM's effect on one metric of one base loss.

    Attributes:
        loss: the base loss name.
        metric: one of :data:`pml_tcm.embedding_report.REPORT_METRICS`.
        baseline: ``(n,)`` values without TCM, one per seed.
        with_tcm: ``(n,)`` values with TCM.
    """

    loss: str
    metric: str
    baseline: np.ndarray
    with_tcm: np.ndarray

    @property
    def available(self) -> bool:
        return self.baseline.size > 0 and self.with_tcm.size > 0

    @property
    def difference(self) -> float:
        """Mean with TCM minus mean without, unscaled."""
        return float(self.with_tcm.mean() - self.baseline.mean())

    @property
    def relative(self) -> float | None:
        """``difference / baseline mean`` (``None`` when the baseline mean is 0)."""
        before = float(self.baseline.mean())
        return None if before == 0 else self.difference / before

    @property
    def worse(self) -> bool:
        """TCM moved the mean the wrong way for this metric."""
        if not self.available:
            return False
        return self.difference > 0 if self.metric in LOWER_IS_BETTER else self.difference < 0

    @property
    def within_spread(self) -> bool:
        """The change is smaller than the larger seed-to-seed std (needs n >= 2)."""
        spread = max(float(self.baseline.std()), float(self.with_tcm.std()))
        return min(self.baseline.size, self.with_tcm.size) >= 2 and abs(self.difference) < spread

    def change_text(self) -> str:
        """The change as in the table: points for accuracies, relative % for OPIS."""
        if not self.available:
            return "n/a"
        if self.metric in _RELATIVE_CHANGE:
            relative = self.relative
            if relative is None:
                return "n/a"
            return f"{100.0 * relative:+.1f} %"
        return f"{_SCALE[self.metric] * self.difference:+.2f} pts"


def tcm_effects(results: Sequence[ArmResult], loss: str) -> dict[str, TCMEffect]:
    """TCM's effect on every metric of one base loss."""
    baseline, with_tcm = metric_values(results, loss, False), metric_values(results, loss, True)
    return {m: TCMEffect(loss, m, baseline[m], with_tcm[m]) for m in REPORT_METRICS}


def tcm_change(metric: str, baseline: np.ndarray, with_tcm: np.ndarray) -> str:
    """TCM's change of the mean: absolute (points) for accuracies, relative % for OPIS."""
    return TCMEffect("", metric, baseline, with_tcm).change_text()


def markdown_table(results: Sequence[ArmResult]) -> str:
    """The results as a Markdown table, columns padded so it reads in a terminal too.

    One row per (loss, without/with TCM): ``mean ± std`` over the ``n`` seeds
    (population std); with one seed only the value (``n`` = 1: no spread to show). Then
    a row with TCM's change: absolute points for R@1 and MAP@R, relative % for OPIS and
    ε-OPIS, followed by ``worse`` where TCM moved the metric the wrong way (lower OPIS
    is better, higher R@1 and MAP@R are).
    """
    rows = [["Loss", "TCM", "n"] + [METRIC_HEADERS[m] for m in REPORT_METRICS]]
    for loss in dict.fromkeys(r.config.loss for r in results):
        title = LOSS_TITLES.get(loss, loss)
        for tcm in (False, True):
            values = metric_values(results, loss, tcm)
            seeds = len(values[REPORT_METRICS[0]])
            if seeds:
                cells = [_mean_std(values[m], _SCALE[m]) for m in REPORT_METRICS]
                rows.append([title, "yes" if tcm else "no", str(seeds), *cells])
        effects = tcm_effects(results, loss).values()
        changes = [e.change_text() + (f" {WORSE}" if e.worse else "") for e in effects]
        rows.append([title, "change", "", *changes])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [_row(rows[0], widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [_row(row, widths) for row in rows[1:]]
    return "\n".join(lines)


def plain_reading(results: Sequence[ArmResult], width: int = 100) -> str:
    """A short paragraph that says in words what the table shows, wrapped at ``width``.

    Per base loss: whether TCM lowered OPIS or made it worse (with the words "TCM made
    OPIS worse here"), ε-OPIS's direction and the cost or gain in R@1; then a caution
    about the number of seeds.
    """
    sentences = [
        "OPIS measures how unevenly one similarity threshold treats the unseen classes "
        "(lower is better)."
    ]
    seeds = set()
    for loss in dict.fromkeys(r.config.loss for r in results):
        effects = tcm_effects(results, loss)
        opis, eps, r_at_1 = effects["opis"], effects["eps_opis"], effects["precision_at_1"]
        if not opis.available:
            continue
        seeds.add(min(opis.baseline.size, opis.with_tcm.size))
        title = LOSS_TITLES.get(loss, loss)
        spread = ", within the seed-to-seed spread" if opis.within_spread else ""
        eps_part = f"ε-OPIS {eps.change_text()}"
        if opis.worse:
            opis_part = f"TCM made OPIS worse here ({opis.change_text()}{spread}; {eps_part})"
        elif opis.difference < 0:
            lowered = opis.change_text().lstrip("-")
            opis_part = f"TCM lowered OPIS by {lowered} ({eps_part}{spread.replace(',', ';')})"
        else:
            opis_part = f"TCM left OPIS unchanged ({eps_part})"
        points = _SCALE["precision_at_1"] * r_at_1.difference
        if points < 0:
            accuracy = f"at a cost of {-points:.2f} points of R@1"
        elif points > 0:
            accuracy = f"while R@1 rose by {points:.2f} points"
        else:
            accuracy = "and R@1 did not move"
        sentences.append(f"With {title}, {opis_part}, {accuracy}.")
    if seeds == {1}:
        sentences.append(
            "One seed per arm: changes of this size can come from the seed alone; "
            "rerun with --seeds 0 1 2 3 4 to see the spread."
        )
    elif seeds:
        sentences.append(
            f"{min(seeds)} seeds per arm: where a change is smaller than the ± spread, "
            "it is an indication, not an established effect."
        )
    return fill(" ".join(sentences), width)


def fill(text: str, width: int, indent: str = "") -> str:
    """``textwrap.fill`` that never breaks a number from its unit (``"+26.1 %"``)."""
    glued = text.replace(" %", "\0%").replace(" pts", "\0pts").replace(" points", "\0points")
    glued = glued.replace("--seeds 0 1 2 3 4", "--seeds\x000\x001\x002\x003\x004")
    wrapped = textwrap.fill(glued, width=width, subsequent_indent=indent)
    return wrapped.replace("\0", " ")


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"


def _mean_std(values: np.ndarray, scale: float) -> str:
    scaled = values * scale
    if scaled.size == 1:
        return f"{scaled[0]:.2f}"
    return f"{scaled.mean():.2f} ± {scaled.std():.2f}"

"""The open-world experiment's results as a reader sees them: the Markdown table (mean ±
std over seeds, TCM's mean change paired by seed with its 95 % t-interval, flagged where
TCM moved a metric the wrong way) and a plain-language reading of it that says which
changes are distinguishable from seed noise."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..embedding_report import REPORT_METRICS
from .experiment import ArmResult
from .seed_noise import CONFIDENCE, PairedChange
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


OPIS_MEANING = (
    "OPIS measures how unevenly one similarity threshold treats the unseen classes (lower is "
    "better): consistency, not accuracy."
)
CPU_NOTE = (
    "Exact numbers depend on the CPU: reruns on one machine are bit-identical, but another "
    "CPU (or torch build) can give different numbers, and with one seed even a different "
    "sign of TCM's change."
)
_LEVEL = f"{100 * CONFIDENCE:g} %"
_INTERVAL = f"{100 * CONFIDENCE:g}% CI"  # as wide as "change": the columns stay as narrow


def table_key(seeds: int) -> str:
    """One line under the printed table for ``seeds`` seeds per arm: the arrows, the
    spread and the interval (or ``n = 1``)."""
    if seeds == 1:
        return "↑/↓: higher/lower is better; n = 1: a single run, no spread, no interval."
    return (
        f"↑/↓: higher/lower is better; ±: std over {seeds} seeds; CI: t-interval of the "
        "change, paired by seed."
    )


TABLE_LEGEND = (
    "↑ higher is better, ↓ lower is better. Cells: mean ± std (population) over n seeds; "
    "n = 1 is a single run, which has no spread. change: TCM's mean change, paired by seed "
    "(with TCM minus without, same seed), in points for R@1 and MAP@R, relative to the mean "
    f"without TCM for OPIS and ε-OPIS; '{WORSE}': TCM moved the mean the wrong way. "
    f"{_INTERVAL} (n >= 2), in the change's unit: Student's t-interval of that mean change "
    "over the n paired differences (n - 1 degrees of freedom; symmetric, so for OPIS it can "
    "reach below -100 %); where it excludes 0 the change is distinguishable from seed "
    "noise, where it includes 0 it is not."
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
    """TCM's effect on one metric of one base loss, paired by seed.

    Attributes:
        loss: the base loss name.
        metric: one of :data:`pml_tcm.embedding_report.REPORT_METRICS`.
        seeds: the seeds run both without and with TCM, in order.
        baseline: ``(n,)`` values without TCM, one per seed of ``seeds``.
        with_tcm: ``(n,)`` values with TCM, same seeds.
    """

    loss: str
    metric: str
    seeds: tuple[int, ...]
    baseline: np.ndarray
    with_tcm: np.ndarray

    @property
    def n(self) -> int:
        """The number of seed pairs."""
        return len(self.seeds)

    @property
    def available(self) -> bool:
        return self.n > 0

    @property
    def paired(self) -> PairedChange:
        """The per-seed differences (with TCM minus without) and their t-interval."""
        return PairedChange(self.with_tcm - self.baseline)

    @property
    def difference(self) -> float:
        """The mean paired change (with TCM minus without), unscaled."""
        return self.paired.mean

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
    def distinguishable(self) -> bool | None:
        """The t-interval of the mean change excludes 0; ``None`` with one seed."""
        return self.paired.distinguishable if self.available else None

    def change_text(self) -> str:
        """The change as in the table: points for accuracies, relative % for OPIS."""
        if not self.available:
            return "n/a"
        return self._shown(self.difference)

    def interval_text(self) -> str:
        """The t-interval in the change's unit, without it, e.g. ``"-20.1 to +47.5"``;
        ``"n/a"`` with one seed."""
        interval = self.paired.interval if self.available else None
        if interval is None:
            return "n/a"
        low, high = (self._shown(value).split()[0] for value in interval)
        return f"{low} to {high}"

    def _shown(self, value: float) -> str:
        if self.metric in _RELATIVE_CHANGE:
            before = float(self.baseline.mean())
            return "n/a" if before == 0 else f"{100.0 * value / before:+.1f} %"
        return f"{_SCALE[self.metric] * value:+.2f} pts"


def tcm_effects(results: Sequence[ArmResult], loss: str) -> dict[str, TCMEffect]:
    """TCM's effect on every metric of one base loss, over the seeds run both without
    and with TCM."""
    arms = {(r.config.tcm, r.config.seed): r.metrics for r in results if r.config.loss == loss}
    seeds = tuple(sorted({s for tcm, s in arms if not tcm} & {s for tcm, s in arms if tcm}))

    def values(tcm: bool, metric: str) -> np.ndarray:
        return np.array([arms[tcm, seed][metric] for seed in seeds], dtype=np.float64)

    return {m: TCMEffect(loss, m, seeds, values(False, m), values(True, m)) for m in REPORT_METRICS}


def markdown_table(results: Sequence[ArmResult]) -> str:
    """The results as a Markdown table, columns padded so it reads in a terminal too.

    One row per (loss, without/with TCM): ``mean ± std`` over the ``n`` seeds
    (population std); with one seed only the value (``n`` = 1: no spread to show). Then
    a row with TCM's mean change paired by seed: absolute points for R@1 and MAP@R,
    relative % for OPIS and ε-OPIS, followed by ``worse`` where TCM moved the metric the
    wrong way (lower OPIS is better, higher R@1 and MAP@R are); with two seeds or more a
    row with the change's 95 % t-interval over the paired differences.
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
        if min(e.n for e in effects) >= 2:
            rows.append([title, _INTERVAL, "", *(e.interval_text() for e in effects)])
    return _table(rows)


def per_seed_table(results: Sequence[ArmResult]) -> str:
    """Every arm's own values, one row per (arm, seed), in the table's units: the pairs
    behind the changes and their intervals."""
    rows = [["Arm", "seed"] + [METRIC_HEADERS[m] for m in REPORT_METRICS]]
    losses = list(dict.fromkeys(r.config.loss for r in results))  # the table's order
    for result in sorted(
        results,
        key=lambda r: (
            r.config.embedding_size == 2,
            losses.index(r.config.loss),
            r.config.tcm,
            r.config.seed,
        ),
    ):
        cells = [f"{_SCALE[m] * result.metrics[m]:.2f}" for m in REPORT_METRICS]
        rows.append([result.config.arm_title, str(result.config.seed), *cells])
    return _table(rows)


def plain_reading(
    results: Sequence[ArmResult],
    circle_results: Sequence[ArmResult] = (),
    width: int = 100,
) -> str:
    """A short paragraph that says in words what the table shows, wrapped at ``width``.

    What OPIS measures; per base loss, whether TCM lowered OPIS or made it worse (with
    the words "TCM made OPIS worse here"), ε-OPIS's direction and how R@1 and MAP@R
    moved; then, in plain words, which changes are distinguishable from seed noise (the
    95 % t-interval of the paired mean change excludes 0) and which are not, or, with one
    seed, that a single seed cannot separate an effect from noise. ``circle_results``
    (the 2-D ArcFace arms of the circle figure) get a sentence of their own.
    """
    sentences = [OPIS_MEANING]
    seeds, told, noise = set(), {}, {}
    for loss in dict.fromkeys(r.config.loss for r in results):
        effects = tcm_effects(results, loss)
        if not effects["opis"].available:
            continue
        seeds.add(effects["opis"].n)
        title = LOSS_TITLES.get(loss, loss)
        sentences.append(_loss_sentence(title, effects))
        for metric, effect in effects.items():
            if effect.distinguishable is not None:
                verdict = told if effect.distinguishable else noise
                verdict.setdefault(title, []).append(METRIC_NAMES[metric])
    if seeds == {1}:
        sentences.append(
            "A single seed per arm cannot separate TCM's effect from seed noise: another "
            "seed, or another CPU, can change even its sign. Run the default five seeds "
            "(--seeds 0 1 2 3 4) for a mean change with an interval."
        )
    elif seeds:
        test = f"{_LEVEL} t-interval of the change, paired by seed over {min(seeds)} seeds"
        if not noise:
            sentences.append(
                f"Every change is distinguishable from seed noise (its {test}, excludes 0)."
            )
        elif not told:
            sentences.append(
                f"No change is distinguishable from seed noise (its {test}, includes 0)."
            )
        else:
            sentences.append(
                f"Distinguishable from seed noise (the {test}, excludes 0): {_listed(told)}. "
                "Every other change is not distinguishable from seed noise."
            )
    if circle_results:
        sentences.append(_circle_sentence(results, circle_results))
    return fill(" ".join(sentences), width)


def _loss_sentence(title: str, effects: dict[str, TCMEffect]) -> str:
    opis, eps = effects["opis"], effects["eps_opis"]
    eps_part = f"ε-OPIS {eps.change_text()}"
    if opis.worse:
        opis_part = f"TCM made OPIS worse here ({opis.change_text()}; {eps_part})"
    elif opis.difference < 0:
        opis_part = f"TCM lowered OPIS by {opis.change_text().lstrip('-')} ({eps_part})"
    else:
        opis_part = f"TCM left OPIS unchanged ({eps_part})"
    points = [
        (METRIC_NAMES[m], _SCALE[m] * effects[m].difference)
        for m in ("precision_at_1", "mean_average_precision_at_r")
    ]
    (first, a), (second, b) = points
    if a == 0 and b == 0:
        moves = f"{first} and {second} did not move"
    elif (a > 0) == (b > 0) and a != 0 and b != 0:
        moves = f"{first} {_verb(a)} by {abs(a):.2f} and {second} by {abs(b):.2f} points"
    else:
        moves = " and ".join(
            f"{name} {_verb(value)} by {abs(value):.2f} points" if value else f"{name} did not move"
            for name, value in points
        )
    return f"With {title}, {opis_part}, while {moves}."


def _verb(change: float) -> str:
    return "rose" if change > 0 else "fell"


def _listed(verdicts: dict[str, list[str]]) -> str:
    return "; ".join(f"{title} {', '.join(names)}" for title, names in verdicts.items())


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _circle_sentence(results: Sequence[ArmResult], circle_results: Sequence[ArmResult]) -> str:
    # The 2-D runs of the circle figure: why their OPIS can be far lower than the
    # table's although their embedding is far weaker.
    r_at_1 = max(r.metrics["precision_at_1"] for r in circle_results)
    chance = _chance_r_at_1(circle_results[0].labels)
    text = (
        f"2-D ArcFace (circle figure): R@1 at most {100 * r_at_1:.2f} % (chance "
        f"{100 * chance:.1f} %)"
    )
    if results and r_at_1 < min(r.metrics["precision_at_1"] for r in results):
        if max(r.metrics["opis"] for r in circle_results) < min(r.metrics["opis"] for r in results):
            return (
                f"{text}, yet a lower OPIS than every {results[0].config.embedding_size}-D "
                "run, as its classes are all about equally bad."
            )
    return f"{text}."


def _chance_r_at_1(labels: np.ndarray) -> float:
    # R@1 of a random ranking: the chance that another random sample shares the class.
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    total = counts.sum()
    return float((counts * (counts - 1)).sum() / (total * (total - 1))) if total > 1 else 0.0


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [_row(rows[0], widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [_row(row, widths) for row in rows[1:]]
    return "\n".join(lines)


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

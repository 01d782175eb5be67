"""Is TCM's change larger than seed noise? A t-interval over differences paired by seed.

An arm without TCM and the arm with TCM of the same seed start from the same initial
weights and see the batches in the same order, so the demo compares them seed by seed:
``d_s = metric(with TCM, seed s) - metric(without TCM, seed s)``. The mean change is
``mean(d)``; its 95 % interval is Student's t-interval ``mean(d) ± t · sd(d) / sqrt(n)``
with ``n - 1`` degrees of freedom (``sd`` with ``n - 1`` in the denominator). A change
is *distinguishable from seed noise* when that interval excludes 0. With one seed
there is no interval: a single seed cannot separate an effect from noise.

Pure Python and numpy (no scipy): the t quantile comes from the closed form of
Student's t distribution for whole degrees of freedom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def t_central_probability(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's ``T`` with ``df`` (a whole number >= 1) degrees of
    freedom, from its closed form (Abramowitz & Stegun 26.7.3 and 26.7.4).

    Raises:
        ValueError: ``df`` is not a whole number >= 1, or ``t`` is negative or NaN.
    """
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a whole number >= 1, got {df!r}")
    if not t >= 0:
        raise ValueError(f"t must be >= 0, got {t!r}")
    df = int(df)
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= 2 * j / (2 * j + 1) * cos2
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= (2 * j - 1) / (2 * j) * cos2
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The ``t`` with ``P(|T| <= t) = confidence`` (two-sided), e.g. 4.303 for 0.95 and
    ``df = 2``.

    Raises:
        ValueError: ``confidence`` outside (0, 1), or a bad ``df``.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    low, high = 0.0, 1.0
    while t_central_probability(high, df) < confidence:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection to float precision
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if t_central_probability(middle, df) < confidence:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedChange:
    """TCM's change of one metric over seeds, paired by seed.

    Attributes:
        differences: ``(n,)`` with-TCM minus without-TCM values, one per seed.
        confidence: the interval's coverage (0.95).
    """

    differences: np.ndarray
    confidence: float = CONFIDENCE

    @property
    def n(self) -> int:
        return int(self.differences.size)

    @property
    def mean(self) -> float:
        """The mean change (``nan`` without pairs)."""
        return float(self.differences.mean()) if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float] | None:
        """The t-interval of the mean change; ``None`` with fewer than two seeds."""
        if self.n < 2:
            return None
        half = (
            t_quantile(self.confidence, self.n - 1)
            * float(self.differences.std(ddof=1))
            / math.sqrt(self.n)
        )
        return self.mean - half, self.mean + half

    @property
    def distinguishable(self) -> bool | None:
        """The interval excludes 0; ``None`` when there is no interval (one seed)."""
        interval = self.interval
        if interval is None:
            return None
        low, high = interval
        return low > 0 or high < 0


def paired_change(
    baseline: dict[int, float], with_tcm: dict[int, float], confidence: float = CONFIDENCE
) -> PairedChange:
    """TCM's change over the seeds present in both ``{seed: value}`` mappings, ordered by
    seed."""
    seeds = sorted(set(baseline) & set(with_tcm))
    differences = np.array([with_tcm[s] - baseline[s] for s in seeds], dtype=np.float64)
    return PairedChange(differences, confidence)

"""Report of ``tcm_sweep.py``: selection on validation, paired test differences, Pareto figure.

Called by ``tcm_sweep.py`` when its runs are done (or with ``--report-only``). Writes, under
the sweep's ``--out`` folder: ``report.md`` (the tables), ``summary.json`` (every number
of the tables) and ``tcm_sweep_pareto.png`` (the figure).
"""

from __future__ import annotations

import json
import math
import shutil
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from sweep_runs import load_run

METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")
SHORT = {
    "precision_at_1": "R@1",
    "mean_average_precision_at_r": "MAP@R",
    "opis": "OPIS",
    "eps_opis": "ε-OPIS",
}
NAMES = {
    "multisimilarity": "MultiSimilarity",
    "arcface": "ArcFace",
    "contrastive": "Contrastive",
    "digits": "digits",
    "fashion_mnist": "Fashion-MNIST",
}
# The selection rule, fixed before any test number was looked at: among the weights
# (0 included) whose mean validation R@1 is at most R1_TOLERANCE below the no-TCM mean,
# the lowest mean validation OPIS.
R1_TOLERANCE = 0.01

Point = tuple[str, str, str, float, float, float]  # dataset, phase, loss, weight, m+, m-


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``treated - baseline`` with a two-sided t CI."""

    n: int
    mean: float
    low: float
    high: float
    baseline_mean: float

    @property
    def relative(self) -> float:
        """``mean / baseline_mean`` (fraction); nan when the baseline mean is 0."""
        return self.mean / self.baseline_mean if self.baseline_mean else math.nan


def paired_difference(
    treated: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
) -> PairedDifference:
    """Paired t confidence interval of ``mean(treated - baseline)``.

    Args:
        treated: one value per seed, shape ``(n,)``.
        baseline: the same seeds' values without the treatment, shape ``(n,)``.
        confidence: the interval's coverage.

    Raises:
        ValueError: different lengths or fewer than 2 pairs.
    """
    treated = np.asarray(treated, dtype=float)
    baseline = np.asarray(baseline, dtype=float)
    if treated.shape != baseline.shape or treated.ndim != 1:
        raise ValueError("treated and baseline must be 1-D and of the same length")
    n = len(treated)
    if n < 2:
        raise ValueError(f"a paired CI needs at least 2 pairs, got {n}")
    diff = treated - baseline
    mean = float(diff.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diff.std(ddof=1) / math.sqrt(n))
    return PairedDifference(n, mean, mean - half, mean + half, float(baseline.mean()))


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """``(mean, half-width of the t CI of the mean)``; half-width 0 for one value."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1)
    return float(values.mean()), float(half / math.sqrt(len(values)))


def load_results(configs: Sequence[Any], out: Path) -> dict[Point, dict[int, dict[str, float]]]:
    """``{point: {seed: metrics}}`` of the finished, successful runs among ``configs``."""
    table: dict[Point, dict[int, dict[str, float]]] = defaultdict(dict)
    for config in configs:
        result = load_run(config.path(out), config)
        if result is None or result.get("metrics") is None:
            continue
        point = (
            config.dataset,
            config.phase,
            config.loss,
            config.weight,
            config.pos_margin,
            config.neg_margin,
        )
        table[point][config.seed] = result["metrics"]
    return dict(table)


def _in_order(results: dict[Point, Any], spec: Any) -> list[tuple[Point, Any]]:
    """The points of ``spec``'s dataset: by loss (the spec's order), margins, weight."""
    margins = [tuple(m) for m in spec.margins]

    def key(item: tuple[Point, Any]) -> tuple:
        point = item[0]
        loss_rank = list(spec.losses).index(point[2]) if point[2] in spec.losses else 99
        margin_rank = margins.index(point[4:]) if point[4:] in margins else 99
        return (point[1], loss_rank, margin_rank if point[3] else -1, point[3])

    return sorted(((p, r) for p, r in results.items() if p[0] == spec.dataset), key=key)


def baseline_point(point: Point, margins0: tuple[float, float]) -> Point:
    """The no-TCM point a point is compared with (weight 0 lives at the first margins)."""
    return (point[0], point[1], point[2], 0.0, *margins0)


def select_weight(
    results: dict[Point, dict[int, dict[str, float]]],
    dataset: str,
    loss: str,
    margins0: tuple[float, float],
) -> Point | None:
    """The validation-chosen point of ``(dataset, loss)`` by the rule of :data:`R1_TOLERANCE`.

    Returns None when the no-TCM validation point has no finished run.
    """
    base = results.get((dataset, "val", loss, 0.0, *margins0))
    if not base:
        return None
    base_r1 = np.mean([m["precision_at_1"] for m in base.values()])
    best, best_opis = None, math.inf
    for point, runs in sorted(results.items()):
        if point[:3] != (dataset, "val", loss) or not runs:
            continue
        r1 = np.mean([m["precision_at_1"] for m in runs.values()])
        opis = np.mean([m["opis"] for m in runs.values()])
        if r1 >= base_r1 - R1_TOLERANCE and opis < best_opis:
            best, best_opis = point, opis
    return best


def _paired(
    results: dict[Point, dict[int, dict[str, float]]],
    point: Point,
    margins0: tuple[float, float],
    metric: str,
) -> PairedDifference | None:
    treated = results.get(point, {})
    base = results.get(baseline_point(point, margins0), {})
    seeds = sorted(set(treated) & set(base))
    if len(seeds) < 2:
        return None
    return paired_difference([treated[s][metric] for s in seeds], [base[s][metric] for s in seeds])


def _scale(metric: str) -> tuple[float, str]:
    return (
        (100.0, "pts")
        if metric in ("precision_at_1", "mean_average_precision_at_r")
        else (
            1e3,
            "e-3",
        )
    )


def _fmt_diff(d: PairedDifference | None, metric: str) -> str:
    if d is None:
        return "–"
    k, _ = _scale(metric)
    text = f"{k * d.mean:+.2f} [{k * d.low:+.2f}, {k * d.high:+.2f}]"
    if metric in ("opis", "eps_opis"):
        text += f" ({100 * d.relative:+.0f} %)"
    return text


def _weight_label(point: Point, margins0: tuple[float, float]) -> str:
    if point[3] == 0:
        return "0 (no TCM)"
    suffix = "" if point[4:] == margins0 else f", m±=({point[4]:g}, {point[5]:g})"
    return f"{point[3]:g}{suffix}"


def build_summary(
    specs: Sequence[Any], results: dict[Point, dict[int, dict[str, float]]]
) -> dict[str, Any]:
    """Every number of the report, JSON-ready."""
    summary: dict[str, Any] = {"r1_tolerance": R1_TOLERANCE, "datasets": {}}
    for spec in specs:
        margins0 = tuple(spec.margins[0])
        ds: dict[str, Any] = {"points": [], "selection": {}}
        for point, runs in _in_order(results, spec):
            entry: dict[str, Any] = {
                "phase": point[1],
                "loss": point[2],
                "weight": point[3],
                "margins": list(point[4:]),
                "n": len(runs),
            }
            for metric in METRICS:
                values = [m[metric] for m in runs.values()]
                entry[metric] = {
                    "mean": float(np.mean(values)),
                    "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "ci95": mean_ci(values)[1],
                }
                if point[3] > 0:
                    d = _paired(results, point, margins0, metric)
                    entry[metric]["paired_vs_no_tcm"] = None if d is None else vars(d)
            ds["points"].append(entry)
        for loss in spec.losses:
            chosen = select_weight(results, spec.dataset, loss, margins0)
            if chosen is None:
                continue
            test_point = ("test", *chosen[2:])
            sel: dict[str, Any] = {
                "weight": chosen[3],
                "margins": list(chosen[4:]),
                "n_val": len(results[chosen]),
            }
            if chosen[3] > 0:
                for metric in METRICS:
                    d = _paired(results, (spec.dataset, *test_point), margins0, metric)
                    sel[metric] = None if d is None else vars(d)
            ds["selection"][loss] = sel
        summary["datasets"][spec.dataset] = ds
    return summary


def markdown_report(specs: Sequence[Any], results: dict[Point, dict[int, dict[str, float]]]) -> str:
    """The tables: validation grid, selection with paired test differences, test grid."""
    lines = [
        "# TCM sweep report",
        "",
        f"Selection rule: lowest mean validation OPIS among the settings whose mean validation "
        f"R@1 is at most {100 * R1_TOLERANCE:g} pt below no TCM (no TCM is a candidate). "
        "Paired differences: TCM minus no TCM, same seeds, mean [95 % t CI]; "
        "R@1 and MAP@R in points, OPIS and ε-OPIS in 1e-3 (relative change in brackets).",
    ]
    for spec in specs:
        margins0 = tuple(spec.margins[0])
        lines += ["", f"## {NAMES[spec.dataset]}", ""]
        lines += [
            f"{spec.epochs} epochs, MLP {spec.hidden}-{spec.embedding_size}, "
            f"train/eval per class: {spec.train_per_class or 'all'}/"
            f"{spec.eval_per_class or 'all'}.",
            "",
            "### Chosen on validation (train 0-2, validate 3-4), measured on 5-9",
            "",
            "| Loss | chosen weight | n val | n test pairs | ΔR@1 (pts) | ΔMAP@R (pts) "
            "| ΔOPIS (1e-3) | Δε-OPIS (1e-3) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for loss in spec.losses:
            chosen = select_weight(results, spec.dataset, loss, margins0)
            if chosen is None:
                lines.append(f"| {NAMES[loss]} | (no validation runs yet) | | | | | | |")
                continue
            label = _weight_label(chosen, margins0)
            n_val = len(results[chosen])
            if chosen[3] == 0:
                lines.append(f"| {NAMES[loss]} | {label} | {n_val} | – | – | – | – | – |")
                continue
            test_point = (spec.dataset, "test", *chosen[2:])
            diffs = [_paired(results, test_point, margins0, m) for m in METRICS]
            n_test = diffs[0].n if diffs[0] is not None else 0
            cells = " | ".join(_fmt_diff(d, m) for d, m in zip(diffs, METRICS, strict=True))
            lines.append(f"| {NAMES[loss]} | {label} | {n_val} | {n_test} | {cells} |")
        for phase, title in (
            ("val", "Validation grid (train 0-2, evaluate 3-4): mean ± std over seeds"),
            (
                "test",
                "Test grid (train 0-4, evaluate unseen 5-9): mean ± std over seeds, "
                "paired differences to no TCM (Δ, mean [95 % CI])",
            ),
        ):
            lines += [
                "",
                f"### {title}",
                "",
                "| Loss | weight | n | R@1 (%) | MAP@R (%) | OPIS (1e-3) | ε-OPIS (1e-3) "
                + (
                    "| ΔR@1 (pts) | ΔMAP@R (pts) | ΔOPIS (1e-3) | Δε-OPIS (1e-3) |"
                    if phase == "test"
                    else "|"
                ),
                "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if phase == "test" else ""),
            ]
            for point, runs in _in_order(results, spec):
                if point[1] != phase:
                    continue
                cells = [NAMES[point[2]], _weight_label(point, margins0), str(len(runs))]
                for metric in METRICS:
                    k, _ = _scale(metric)
                    values = np.array([m[metric] for m in runs.values()]) * k
                    std = values.std(ddof=1) if len(values) > 1 else 0.0
                    cells.append(f"{values.mean():.2f} ± {std:.2f}")
                if phase == "test":
                    for metric in METRICS:
                        paired = (
                            None if point[3] == 0 else _paired(results, point, margins0, metric)
                        )
                        cells.append(_fmt_diff(paired, metric))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


COLOURS = {"multisimilarity": "tab:blue", "arcface": "tab:orange", "contrastive": "tab:green"}
MARKERS = ["o", "s", "^", "D"]


def pareto_figure(specs: Sequence[Any], results: dict[Point, dict[int, dict[str, float]]]) -> Any:
    """R@1 (x) against OPIS and ε-OPIS (y) on the unseen test classes, one row per dataset.

    Each (loss, weight, margins) point is the mean over seeds with 95 % t-CI error bars;
    the weights of one loss and margin pair are joined in increasing order, the no-TCM
    point is a black-edged star and the validation-chosen point is ringed.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5 * len(specs)), layout="constrained")
    axes = fig.subplots(len(specs), 2, squeeze=False)
    for row, spec in zip(axes, specs, strict=True):
        margins0 = tuple(spec.margins[0])
        n_seeds = len(spec.test_seeds)
        for ax, metric in zip(row, ("opis", "eps_opis"), strict=True):
            for loss in spec.losses:
                colour = COLOURS.get(loss, None)
                chosen = select_weight(results, spec.dataset, loss, margins0)
                base = (spec.dataset, "test", loss, 0.0, *margins0)
                for mi, margins in enumerate(spec.margins):
                    margins = tuple(margins)
                    pts = [base] + [
                        (spec.dataset, "test", loss, float(w), *margins)
                        for w in spec.weights
                        if w > 0
                    ]
                    pts = [p for p in pts if results.get(p)]
                    if not any(p[3] > 0 for p in pts) and mi > 0:
                        continue  # the no-TCM point alone is drawn with the first margins
                    if not pts:
                        continue
                    xs, xe, ys, ye = [], [], [], []
                    for p in pts:
                        runs = results[p].values()
                        x, dx = mean_ci([100 * m["precision_at_1"] for m in runs])
                        y, dy = mean_ci([1e3 * m[metric] for m in runs])
                        xs.append(x), xe.append(dx), ys.append(y), ye.append(dy)
                    style = "-" if mi == 0 else "--"
                    label = NAMES[loss] + (
                        "" if mi == 0 else f" m±=({margins[0]:g}, {margins[1]:g})"
                    )
                    ax.errorbar(
                        xs,
                        ys,
                        xerr=xe,
                        yerr=ye,
                        fmt=MARKERS[mi % len(MARKERS)] + style,
                        color=colour,
                        alpha=0.8,
                        capsize=2,
                        markersize=5,
                        label=label,
                    )
                    for p, x, y in zip(pts, xs, ys, strict=True):
                        if p[3] > 0:
                            ax.annotate(
                                f"{p[3]:g}",
                                (x, y),
                                textcoords="offset points",
                                xytext=(4, 3),
                                fontsize=7,
                                color=colour,
                            )
                        if chosen is not None and p[3] > 0 and p[2:] == chosen[2:]:
                            ax.scatter(
                                [x],
                                [y],
                                s=260,
                                facecolors="none",
                                edgecolors=colour,
                                linewidths=1.8,
                                zorder=5,
                            )
                    if mi == 0:
                        ax.scatter(
                            [xs[0]],
                            [ys[0]],
                            marker="*",
                            s=300,
                            color=colour,
                            edgecolors="black",
                            linewidths=1.2,
                            zorder=6,
                        )
            ax.set_xlabel("R@1 on unseen classes 5-9 (%)  →  better")
            ax.set_ylabel(f"{SHORT[metric]} (1e-3)  ↓  better")
            ax.set_title(f"{NAMES[spec.dataset]}: R@1 vs {SHORT[metric]} (test, {n_seeds} seeds)")
            ax.text(
                0.98,
                0.02,
                "lower-right is better",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=10,
                style="italic",
                bbox=dict(boxstyle="round", facecolor="white", alpha=0.8),
            )
            ax.grid(alpha=0.3)
        handles, labels = row[0].get_legend_handles_labels()
        from matplotlib.lines import Line2D

        handles += [
            Line2D(
                [],
                [],
                marker="*",
                color="grey",
                markeredgecolor="black",
                markersize=14,
                linestyle="none",
            ),
            Line2D(
                [],
                [],
                marker="o",
                color="grey",
                markerfacecolor="none",
                markersize=14,
                linestyle="none",
            ),
        ]
        labels += ["no TCM (weight 0)", "chosen on validation"]
        row[0].legend(handles, labels, fontsize=8, loc="best")
    fig.suptitle(
        "TCM weight sweep: mean over seeds, 95 % CI error bars; numbers = embedding_reg_weight"
    )
    return fig


def write_report(
    specs: Sequence[Any], configs: Sequence[Any], out: Path, figure_copy: Path | None = None
) -> dict[str, Any]:
    """Write ``report.md``, ``summary.json`` and ``tcm_sweep_pareto.png`` under ``out``."""
    out = Path(out)
    results = load_results(configs, out)
    summary = build_summary(specs, results)
    done = sum(len(r) for r in results.values())
    summary["runs_finished"] = done
    summary["runs_total"] = len(configs)
    out.mkdir(parents=True, exist_ok=True)
    report = markdown_report(specs, results)
    report += f"\nRuns finished: {done} of {len(configs)}.\n"
    (out / "report.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if results:
        fig = pareto_figure(specs, results)
        fig.savefig(out / "tcm_sweep_pareto.png", dpi=110)
        if figure_copy is not None:
            Path(figure_copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "tcm_sweep_pareto.png", figure_copy)
    print(report)
    return summary

"""Report of ``pretrained_sweep.py``: selection on rotated validation folds, paired test
differences, validation-test rank correlation, Pareto figure.

Writes, under the run folder: ``report.md``, ``summary.json`` and ``pretrained_pareto.png``.
The statistics and the figure are those of ``tcm_sweep_report`` (imported, not copied).
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tcm_sweep
import tcm_sweep_report as base
from scipy import stats

METRICS = base.METRICS
Results = dict[base.Point, dict[Any, dict[str, float]]]


def load_results(configs: Sequence[Any], out: Path) -> Results:
    """``{point: {key: metrics}}``; key = ``(fold, seed)`` for validation, ``seed`` for test."""
    table: Results = defaultdict(dict)
    for config in configs:
        result = tcm_sweep.load_run(config.path(out), config)
        if result is None or result.get("metrics") is None:
            continue
        point = (
            config.dataset if hasattr(config, "dataset") else "fashion_mnist",
            config.phase,
            config.loss,
            config.weight,
            config.pos_margin,
            config.neg_margin,
        )
        key = (config.fold, config.seed) if config.phase == "val" else config.seed
        table[point][key] = result["metrics"]
    return dict(table)


def rank_correlations(results: Results, spec: Any) -> dict[str, dict[str, float]]:
    """Per loss: Spearman correlation over the settings between mean validation and mean test
    OPIS (and R@1); nan with fewer than 3 settings measured in both phases."""
    out: dict[str, dict[str, float]] = {}
    for loss in spec.losses:
        val, test = [], []
        for point, runs in results.items():
            if point[1:3] != ("val", loss) or not runs:
                continue
            test_runs = results.get((point[0], "test", *point[2:]))
            if test_runs:
                val.append(runs)
                test.append(test_runs)
        entry = {"n_settings": len(val)}
        for metric in ("opis", "precision_at_1"):
            if len(val) < 3:
                entry[metric] = float("nan")
                continue
            v = [np.mean([m[metric] for m in r.values()]) for r in val]
            t = [np.mean([m[metric] for m in r.values()]) for r in test]
            entry[metric] = float(stats.spearmanr(v, t).statistic)
        out[loss] = entry
    return out


def _grid_rows(results: Results, spec: Any, phase: str, margins0: tuple) -> list[str]:
    rows = []
    for point, runs in base._in_order(results, spec):
        if point[1] != phase:
            continue
        cells = [base.NAMES[point[2]], base._weight_label(point, margins0), str(len(runs))]
        for metric in METRICS:
            k, _ = base._scale(metric)
            values = np.array([m[metric] for m in runs.values()]) * k
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.2f} ± {std:.2f}")
        for metric in METRICS:
            d = None if point[3] == 0 else base._paired(results, point, margins0, metric)
            cells.append(base._fmt_diff(d, metric))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def markdown_report(spec: Any, results: Results, raw: dict[str, dict[str, float]]) -> str:
    margins0 = tuple(spec.margins[0])
    folds = ", ".join(
        f"{'-'.join(map(str, tr))}→{'-'.join(map(str, ev))}" for tr, ev in spec.fold_splits
    )
    head = (
        "| Loss | weight | n | R@1 (%) | MAP@R (%) | OPIS (1e-3) | ε-OPIS (1e-3) "
        "| ΔR@1 (pts) | ΔMAP@R (pts) | ΔOPIS (1e-3) | Δε-OPIS (1e-3) |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    lines = [
        "# Pretrained-backbone TCM report",
        "",
        f"Features: `{spec.features}`. Head MLP {spec.hidden}-{spec.embedding_size}, "
        f"{spec.epochs} epochs, Adam lr {spec.lr:g}. Validation folds (train→validate): {folds}. "
        f"Selection rule: lowest mean validation OPIS among the settings whose mean "
        f"validation R@1 is at most {100 * base.R1_TOLERANCE:g} pt below no TCM. Paired "
        "differences: TCM minus no TCM, same seeds (validation: same fold and seed), "
        "mean [95 % t CI].",
        "",
        *(
            f"Frozen features without a head ({where}): "
            + ", ".join(
                f"{base.SHORT[m]} {base._scale(m)[0] * raw[phase][m]:.2f}"
                + (" %" if m in ("precision_at_1", "mean_average_precision_at_r") else "e-3")
                for m in METRICS
            )
            + ".  "
            for phase, where in (("test", "test classes 5-9"), ("val", "mean over the folds"))
        ),
        "",
        "## Chosen on validation, measured on the unseen test classes 5-9",
        "",
        "| Loss | chosen weight | n val | n test pairs | ΔR@1 (pts) | ΔMAP@R (pts) "
        "| ΔOPIS (1e-3) | Δε-OPIS (1e-3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for loss in spec.losses:
        chosen = base.select_weight(results, spec.dataset, loss, margins0)
        if chosen is None:
            lines.append(f"| {base.NAMES[loss]} | (no validation runs yet) | | | | | | |")
            continue
        label = base._weight_label(chosen, margins0)
        n_val = len(results[chosen])
        if chosen[3] == 0:
            lines.append(f"| {base.NAMES[loss]} | {label} | {n_val} | – | – | – | – | – |")
            continue
        test_point = (spec.dataset, "test", *chosen[2:])
        diffs = [base._paired(results, test_point, margins0, m) for m in METRICS]
        n_test = diffs[0].n if diffs[0] is not None else 0
        cells = " | ".join(base._fmt_diff(d, m) for d, m in zip(diffs, METRICS, strict=True))
        lines.append(f"| {base.NAMES[loss]} | {label} | {n_val} | {n_test} | {cells} |")
    lines += [
        "",
        "## How well validation predicted test (Spearman over the settings of a loss)",
        "",
        "| Loss | settings | ρ(val OPIS, test OPIS) | ρ(val R@1, test R@1) |",
        "|---|---|---|---|",
    ]
    for loss, entry in rank_correlations(results, spec).items():
        lines.append(
            f"| {base.NAMES[loss]} | {entry['n_settings']} | {entry['opis']:.2f} "
            f"| {entry['precision_at_1']:.2f} |"
        )
    for phase, title in (
        ("test", "Test grid (train 0-4, evaluate unseen 5-9), mean ± std over seeds"),
        ("val", "Validation grid (all folds), mean ± std over (fold, seed)"),
    ):
        lines += ["", f"## {title}", "", head, sep, *_grid_rows(results, spec, phase, margins0)]
    return "\n".join(lines) + "\n"


def build_summary(spec: Any, results: Results, raw: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Every number of the report, JSON-ready."""
    margins0 = tuple(spec.margins[0])
    summary: dict[str, Any] = {
        "features": spec.features,
        "raw_feature_metrics": raw,
        "r1_tolerance": base.R1_TOLERANCE,
        "points": [],
        "selection": {},
        "rank_correlations": rank_correlations(results, spec),
    }
    for point, runs in base._in_order(results, spec):
        entry: dict[str, Any] = {
            "phase": point[1],
            "loss": point[2],
            "weight": point[3],
            "margins": list(point[4:]),
            "n": len(runs),
        }
        for metric in METRICS:
            values = [m[metric] for m in runs.values()]
            entry[metric] = {"mean": float(np.mean(values)), "ci95": base.mean_ci(values)[1]}
            if point[3] > 0:
                d = base._paired(results, point, margins0, metric)
                entry[metric]["paired_vs_no_tcm"] = None if d is None else vars(d)
        summary["points"].append(entry)
    for loss in spec.losses:
        chosen = base.select_weight(results, spec.dataset, loss, margins0)
        if chosen is None:
            continue
        sel: dict[str, Any] = {"weight": chosen[3], "margins": list(chosen[4:])}
        if chosen[3] > 0:
            for metric in METRICS:
                d = base._paired(results, (spec.dataset, "test", *chosen[2:]), margins0, metric)
                sel[metric] = None if d is None else vars(d)
        summary["selection"][loss] = sel
    return summary


def write_report(
    spec: Any,
    configs: Sequence[Any],
    out: Path,
    raw: dict[str, dict[str, float]],
    figure_copy: Path | None = None,
    frozen_point: bool = True,
) -> dict[str, Any]:
    """Write ``report.md``, ``summary.json`` and ``pretrained_pareto.png`` under ``out``.

    ``frozen_point``: draw the frozen features (no head) as a point; False writes its
    values as a note instead, so that the axes zoom on the trained heads.
    """
    out = Path(out)
    results = load_results(configs, out)
    summary = build_summary(spec, results, raw)
    done = sum(len(r) for r in results.values())
    summary["runs_finished"], summary["runs_total"] = done, len(configs)
    report = markdown_report(spec, results, raw) + f"\nRuns finished: {done} of {len(configs)}.\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if any(p[1] == "test" for p in results):
        fig = base.pareto_figure([spec], results)
        n = len(spec.test_seeds)
        for ax, metric in zip(fig.axes, ("opis", "eps_opis"), strict=False):
            ax.set_title(f"R@1 vs {base.SHORT[metric]} (test classes 5-9, {n} seeds)")
            if not frozen_point:
                ax.text(
                    0.02,
                    0.02,
                    f"frozen features, no head (off the axes): R@1 "
                    f"{100 * raw['test']['precision_at_1']:.1f} %, {base.SHORT[metric]} "
                    f"{1e3 * raw['test'][metric]:.1f}e-3",
                    transform=ax.transAxes,
                    fontsize=8,
                )
                continue
            ax.scatter(
                [100 * raw["test"]["precision_at_1"]],
                [1e3 * raw["test"][metric]],
                marker="X",
                s=120,
                color="black",
                zorder=6,
                label="frozen features, no head",
            )
        legend = fig.axes[0].get_legend() if frozen_point else None
        if legend is not None:
            handles = list(legend.legend_handles) + [fig.axes[0].collections[-1]]
            labels = [t.get_text() for t in legend.get_texts()] + ["frozen features, no head"]
            fig.axes[0].legend(handles, labels, fontsize=8, loc="upper left")
        fig.suptitle(
            f"Fashion-MNIST, frozen EfficientNet-Lite0 + trained head (lr {spec.lr:g}, "
            f"{spec.epochs} epochs): mean over seeds, 95 % CI; numbers = TCM weight"
        )
        fig.savefig(out / "pretrained_pareto.png", dpi=110)
        if figure_copy is not None:
            Path(figure_copy).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "pretrained_pareto.png", figure_copy)
    print(report)
    return summary

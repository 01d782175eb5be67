"""The open-world benchmark end to end: arms, results table and figures in one folder.

Used by ``pml-tcm demo`` and ``examples/open_world.py``. Writes into ``out``:

* ``results.md``: the Markdown table of :func:`pml_tcm.results_table.markdown_table`;
* ``utility_curves_<loss>.png``: per-class utility vs threshold on the unseen classes,
  baseline beside +TCM (first seed);
* ``embedding_circle.png``: ArcFace with a 2-D embedding, unseen classes on the unit
  circle, baseline beside +TCM (when ``circle``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .data import OpenWorldSplit
from .embedding_circle import embedding_circle_figure
from .experiment import ArmConfig, ArmResult, run_arm, run_arms
from .results_table import markdown_table
from .utility_figure import utility_comparison_figure


@dataclass
class BenchmarkOutput:
    """What :func:`run_benchmark` produced.

    Attributes:
        results: every evaluated arm (empty when only training).
        table: the Markdown table.
        files: the files written.
    """

    results: list[ArmResult]
    table: str
    files: list[Path]


def run_benchmark(
    split: OpenWorldSplit,
    base: ArmConfig,
    out: str | Path,
    loss_names: Sequence[str],
    seeds: Sequence[int],
    circle: bool = True,
    checkpoint_dir: str | Path | None = None,
    train_only: bool = False,
    log: Callable[[str], None] = print,
) -> BenchmarkOutput:
    """Run every arm, then write the table and figures into ``out``.

    Args:
        split: the data.
        base: settings shared by the arms (epochs, batch size, TCM margins...).
        out: output folder (created).
        loss_names: base losses (see :data:`pml_tcm.experiment.LOSS_NAMES`).
        seeds: seeds, one run per (loss, without/with TCM, seed).
        circle: also train 2-D ArcFace (first seed, without/with TCM) for the circle
            figure.
        checkpoint_dir: keep/reuse trained weights there (see
            :func:`pml_tcm.experiment.run_arm`).
        train_only: train (and checkpoint) every arm, evaluate nothing, write nothing.
        log: receives one line per finished arm.
    """
    out = Path(out)
    results = run_arms(split, base, loss_names, seeds, log, checkpoint_dir, not train_only)
    circle_configs = [
        replace(base, loss="arcface", tcm=tcm, seed=seeds[0], embedding_size=2)
        for tcm in (False, True)
    ]
    circle_results = []
    if circle:
        for config in circle_configs:
            result = run_arm(config, split, checkpoint_dir, not train_only)
            log(f"2-D {config.arm_name}: {'trained' if result is None else 'done'}")
            if result is not None:
                circle_results.append(result)
    if train_only:
        return BenchmarkOutput([], "", [])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    files = [out / "results.md"]
    files[0].write_text(table + "\n")
    for loss_name in loss_names:
        first_seed = [r for r in results if r.config.loss == loss_name][:2]
        panels = [
            (f"{r.config.arm_name} (seed {r.config.seed})", r.opis_result) for r in first_seed
        ]
        figure = utility_comparison_figure(panels)
        files.append(out / f"utility_curves_{loss_name}.png")
        figure.savefig(files[-1], dpi=120)
    if circle_results:
        panels = [
            (
                f"ArcFace 2-D{' + TCM' if r.config.tcm else ''} (OPIS {r.metrics['opis']:.2e})",
                r.embeddings,
                r.labels,
            )
            for r in circle_results
        ]
        figure = embedding_circle_figure(panels, split.class_names)
        files.append(out / "embedding_circle.png")
        figure.savefig(files[-1], dpi=120)
    return BenchmarkOutput(results + circle_results, table, files)

"""The open-world benchmark end to end: arms, results table and figures in one folder.

Used by ``pml-tcm demo`` and ``examples/open_world.py``. Writes into ``out``:

* ``results.md``: the settings (the TCM setting of each loss and where it comes from),
  the Markdown table of :func:`pml_tcm.demo.results_table.markdown_table` and its
  plain-language reading;
* ``utility_curves_<loss>.png``: per-class utility vs threshold on the unseen classes,
  baseline beside +TCM (first seed), the threshold calibrated for ``target_far`` marked;
* ``embedding_circle.png``: ArcFace with a 2-D embedding, unseen classes on the unit
  circle, baseline beside +TCM (when ``circle``).

Each file is written under a temporary name and renamed when complete: a failure never
leaves a half-written file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..calibration import calibrate_threshold
from ..output_files import write_whole
from .data import OpenWorldSplit
from .embedding_circle import embedding_circle_figure
from .experiment import ArmConfig, ArmResult, arm_configs, run_arm
from .progress import ArmProgress
from .results_table import TABLE_LEGEND, markdown_table, plain_reading
from .settings import LOSS_TITLES, TCMSetting, describe_tcm, tcm_paragraph
from .utility_figure import utility_caption, utility_comparison_figure

DATASET_TITLES = {"digits": "scikit-learn digits (8x8)", "fashion-mnist": "Fashion-MNIST"}
FILE_DESCRIPTIONS = {
    "results.md": "this table with the settings and the reading (Markdown)",
    "utility_curves": "per-class utility curves, {title} without | with TCM",
    "embedding_circle.png": "2-D ArcFace embeddings of the unseen classes on a circle",
}


@dataclass
class BenchmarkOutput:
    """What :func:`run_benchmark` produced.

    Attributes:
        results: every evaluated arm (empty when only training).
        table: the Markdown table.
        reading: the plain-language reading of the table.
        files: the files written.
    """

    results: list[ArmResult]
    table: str
    files: list[Path]
    reading: str = ""

    def file_descriptions(self) -> list[tuple[Path, str]]:
        """``(path, what it is)`` for every written file."""
        described = []
        for path in self.files:
            if path.name.startswith("utility_curves_"):
                loss = path.stem.removeprefix("utility_curves_")
                title = LOSS_TITLES.get(loss, loss)
                described.append((path, FILE_DESCRIPTIONS["utility_curves"].format(title=title)))
            else:
                described.append((path, FILE_DESCRIPTIONS.get(path.name, "")))
        return described


def describe_split(split: OpenWorldSplit) -> str:
    """One line: the data set, the training classes and the unseen evaluation classes."""
    seen, unseen = sorted(set(split.train_y.tolist())), sorted(set(split.eval_y.tolist()))
    return (
        f"{DATASET_TITLES.get(split.name, split.name)}: train on classes {_span(seen)} "
        f"({len(split.train_y)} images), test on unseen {_span(unseen)} ({len(split.eval_y)})"
    )


def describe_settings(base: ArmConfig, seeds: Sequence[int]) -> str:
    """One line: training length, model size, OPIS range, seeds, device (TCM's settings:
    :func:`pml_tcm.demo.settings.describe_tcm`)."""
    batches = "" if base.max_batches is None else f"at most {base.max_batches} "
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {' '.join(map(str, seeds))}"
    return (
        f"{base.epochs} epoch{'s' if base.epochs != 1 else ''} of {batches}batches of "
        f"{base.batch_size}, {base.embedding_size}-D embedding, Adam {base.lr:g}; OPIS over "
        f"FAR {base.far_range[0]:g} to {base.far_range[1]:g}; {seed_text}; {base.device}"
    )


def benchmark_configs(
    base: ArmConfig,
    loss_names: Sequence[str],
    seeds: Sequence[int],
    circle: bool = True,
    tcm: Mapping[str, TCMSetting] | None = None,
) -> list[ArmConfig]:
    """The arms :func:`run_benchmark` runs, in order: every (loss, seed, without/with
    TCM), then 2-D ArcFace without and with TCM on the first seed when ``circle``.

    ``tcm`` gives a loss its own TCM weight and margins (default: ``base``'s)."""
    configs = arm_configs(base, loss_names, seeds)
    if circle:
        configs += [
            replace(base, loss="arcface", tcm=with_tcm, seed=seeds[0], embedding_size=2)
            for with_tcm in (False, True)
        ]
    if tcm is not None:
        configs = [_with_setting(config, tcm.get(config.loss)) for config in configs]
    return configs


def _with_setting(config: ArmConfig, setting: TCMSetting | None) -> ArmConfig:
    if setting is None:
        return config
    return replace(
        config,
        tcm_weight=setting.weight,
        pos_margin=setting.pos_margin,
        neg_margin=setting.neg_margin,
    )


def arm_label(config: ArmConfig) -> str:
    """How the progress line names an arm, e.g. ``"ArcFace + TCM, seed 0"``."""
    return f"{config.arm_title}, seed {config.seed}"


def run_benchmark(
    split: OpenWorldSplit,
    base: ArmConfig,
    out: str | Path,
    loss_names: Sequence[str],
    seeds: Sequence[int],
    circle: bool = True,
    checkpoint_dir: str | Path | None = None,
    train_only: bool = False,
    progress: ArmProgress | None = None,
    target_far: float = 1e-3,
    tcm: Mapping[str, TCMSetting] | None = None,
) -> BenchmarkOutput:
    """Run every arm, then write the table, its reading and the figures into ``out``.

    Args:
        split: the data.
        base: settings shared by the arms (epochs, batch size, TCM margins...).
        out: output folder (created).
        loss_names: base losses (see :data:`pml_tcm.demo.settings.LOSS_NAMES`).
        seeds: seeds, one run per (loss, without/with TCM, seed).
        circle: also train 2-D ArcFace (first seed, without/with TCM) for the circle
            figure.
        checkpoint_dir: keep/reuse trained weights there (see
            :func:`pml_tcm.demo.experiment.run_arm`).
        train_only: train (and checkpoint) every arm, evaluate nothing, write nothing.
        progress: shows one line per arm (see :class:`pml_tcm.demo.progress.ArmProgress`);
            ``None`` shows nothing.
        target_far: the utility figures mark the global threshold calibrated for this
            FAR on the unseen classes (:func:`pml_tcm.calibrate_threshold`).
        tcm: each loss's TCM setting (:func:`pml_tcm.demo.settings.resolve_tcm`), said
            in ``results.md``; default: ``base``'s for every loss.
    """
    out = Path(out)
    configs = benchmark_configs(base, loss_names, seeds, circle, tcm)
    results, circle_results = [], []
    for config in configs:
        if progress is not None:
            progress.start(arm_label(config), config.epochs)
        result = run_arm(
            config,
            split,
            checkpoint_dir,
            not train_only,
            progress=None if progress is None else progress.update,
        )
        if progress is not None:
            progress.finish(_outcome(result))
        if result is not None:
            (circle_results if config.embedding_size == 2 and circle else results).append(result)
    if train_only:
        return BenchmarkOutput([], "", [])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    reading = plain_reading(results)
    files = [out / "results.md"]
    for loss_name in loss_names:
        first_seed = [r for r in results if r.config.loss == loss_name][:2]
        panels = [
            (f"{r.config.arm_title} (seed {r.config.seed})", r.opis_result) for r in first_seed
        ]
        thresholds = [_calibrated_threshold(r, target_far) for r in first_seed]
        figure = utility_comparison_figure(
            panels,
            thresholds,
            threshold_label=f"threshold at FAR {target_far:g}:",
            class_names=split.class_names,
            caption=utility_caption(base.far_range, target_far),
        )
        files.append(out / f"utility_curves_{loss_name}.png")
        write_whole(files[-1], lambda path, figure=figure: figure.savefig(path, dpi=120))
    if circle_results:
        panels = [
            (
                f"{r.config.arm_title}\nOPIS {r.metrics['opis']:.2e}   "
                f"ε-OPIS {r.metrics['eps_opis']:.2e}",
                r.embeddings,
                r.labels,
            )
            for r in circle_results
        ]
        figure = embedding_circle_figure(panels, split.class_names)
        files.append(out / "embedding_circle.png")
        write_whole(files[-1], lambda path: figure.savefig(path, dpi=120))
    output = BenchmarkOutput(results + circle_results, table, files, reading)
    if tcm is None:
        tcm = {name: _setting_of(base) for name in loss_names}
    markdown = _results_markdown(split, base, seeds, output, target_far, tcm)
    write_whole(files[0], lambda path: path.write_text(markdown))
    return output


def _setting_of(config: ArmConfig) -> TCMSetting:
    given = frozenset({"weight", "pos_margin", "neg_margin"})
    return TCMSetting(config.tcm_weight, config.pos_margin, config.neg_margin, given)


def _results_markdown(
    split: OpenWorldSplit,
    base: ArmConfig,
    seeds: Sequence[int],
    output: BenchmarkOutput,
    target_far: float,
    tcm: Mapping[str, TCMSetting],
) -> str:
    lines = [
        f"# Open-world results: {split.name}",
        "",
        describe_split(split) + " (query = reference, self pairs excluded).",
        "",
        "Settings: " + describe_settings(base, seeds) + ".",
        "",
        "TCM: " + describe_tcm(tcm, base.tcm_miner) + ".",
        "",
        output.table,
        "",
        TABLE_LEGEND,
        "",
        "## Reading",
        "",
        output.reading,
        "",
        "## TCM settings",
        "",
        tcm_paragraph(split.name, tcm),
        "",
        "## Files",
        "",
    ]
    for path, what in output.file_descriptions():
        lines.append(f"- `{path.name}`: {what}")
    lines += [
        "",
        f"The utility figures show seed {seeds[0]} and mark the global threshold calibrated "
        f"for FAR {target_far:g} on the unseen classes.",
    ]
    return "\n".join(lines) + "\n"


def _calibrated_threshold(result: ArmResult, target_far: float) -> float:
    report = calibrate_threshold(
        torch.from_numpy(result.embeddings),
        torch.from_numpy(result.labels),
        target_far=target_far,
    )
    return report.threshold


def _outcome(result: ArmResult | None) -> str:
    if result is None:
        return "trained"
    metrics = result.metrics
    return (
        f"R@1 {100 * metrics['precision_at_1']:.2f} %  OPIS {1000 * metrics['opis']:.2f}e-3  "
        f"ε-OPIS {1000 * metrics['eps_opis']:.2f}e-3"
    )


def _span(labels: Sequence[int]) -> str:
    if labels and labels == list(range(labels[0], labels[-1] + 1)) and len(labels) > 2:
        return f"{labels[0]}-{labels[-1]}"
    return ", ".join(map(str, labels))

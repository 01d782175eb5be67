"""The open-world benchmark end to end: arms, results table and figures in one folder.

Used by ``pml-tcm demo``. Writes into ``out``:

* ``results.md``: the settings (the TCM setting of each loss and where it comes from),
  the Markdown table of :func:`pml_tcm.demo.results_table.markdown_table` (TCM's mean
  change paired by seed, with its t-interval), its plain-language reading, every run's
  own values and a note that exact numbers depend on the CPU;
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
from .experiment import ArmConfig, ArmResult, run_arm
from .progress import ArmProgress
from .results_table import (
    CPU_NOTE,
    TABLE_LEGEND,
    markdown_table,
    per_seed_table,
    plain_reading,
)
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


def describe_settings(base: ArmConfig, seeds: Sequence[int] | None = None) -> str:
    """One line: training length, model size, OPIS range, the seeds (unless ``None``),
    device (TCM's settings: :func:`pml_tcm.demo.settings.describe_tcm`)."""
    batches = "" if base.max_batches is None else f"at most {base.max_batches} "
    seed_text = "" if seeds is None else f"{_seed_text(seeds)}; "
    return (
        f"{base.epochs} epoch{'s' if base.epochs != 1 else ''} of {batches}batches of "
        f"{base.batch_size}, {base.embedding_size}-D embedding, Adam {base.lr:g}; OPIS over "
        f"FAR {base.far_range[0]:g}-{base.far_range[1]:g}; {seed_text}{base.device}"
    )


def describe_runs(
    configs: Sequence[ArmConfig], loss_names: Sequence[str], seeds: Sequence[int], circle: bool
) -> str:
    """One line: how many runs, of which losses, on which seeds."""
    losses = " and ".join(LOSS_TITLES.get(name, name) for name in loss_names)
    circle_text = ", 2-D ArcFace for a figure" if circle else ""
    return f"{len(configs)}: {losses} without/with TCM on {_seed_text(seeds)}{circle_text}"


def benchmark_configs(
    base: ArmConfig,
    loss_names: Sequence[str],
    seeds: Sequence[int],
    circle: bool = True,
    tcm: Mapping[str, TCMSetting] | None = None,
) -> list[ArmConfig]:
    """The runs :func:`run_benchmark` trains, in order: every (loss, without/with TCM,
    seed), then 2-D ArcFace without and with TCM on the first seed when ``circle``.

    ``tcm`` gives a loss its own TCM weight and margins (default: ``base``'s)."""
    configs = [
        replace(base, loss=loss_name, tcm=with_tcm, seed=seed)
        for loss_name in loss_names
        for with_tcm in (False, True)
        for seed in seeds
    ]
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


def arm_groups(configs: Sequence[ArmConfig]) -> list[list[ArmConfig]]:
    """``configs`` grouped into arms, in order: the runs of one (loss, without/with TCM,
    embedding size) that differ only by seed. Each arm gets one progress line."""
    groups: dict[tuple[str, bool, int], list[ArmConfig]] = {}
    for config in configs:
        groups.setdefault((config.loss, config.tcm, config.embedding_size), []).append(config)
    return list(groups.values())


def arm_label(configs: Sequence[ArmConfig]) -> str:
    """How the progress line names an arm, e.g. ``"ArcFace + TCM, seeds 0-4"``."""
    seeds = [config.seed for config in configs]
    return f"{configs[0].arm_title}, {_seed_text(seeds)}"


def _seed_text(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"seeds {_span(list(seeds))}"


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
    for group in arm_groups(configs):
        if progress is not None:
            progress.start(arm_label(group), group[0].epochs, runs=len(group))
        group_results = []
        for config in group:
            if progress is not None:
                progress.next_run(f"seed {config.seed}")
            result = run_arm(
                config,
                split,
                checkpoint_dir,
                not train_only,
                progress=None if progress is None else progress.update,
            )
            if result is not None:
                group_results.append(result)
                is_circle = config.embedding_size == 2 and circle
                (circle_results if is_circle else results).append(result)
        if progress is not None:
            progress.finish(_outcome(group_results))
    if train_only:
        return BenchmarkOutput([], "", [])
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    reading = plain_reading(results, circle_results)
    files = [out / "results.md"]
    for loss_name in loss_names:
        first_seed = sorted(
            (r for r in results if r.config.loss == loss_name and r.config.seed == seeds[0]),
            key=lambda r: r.config.tcm,
        )
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
        "## Per seed",
        "",
        "Every run's own values; the changes above pair the runs without and with TCM of "
        "the same seed (same initial weights, same batch order).",
        "",
        per_seed_table(output.results),
        "",
        CPU_NOTE,
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


def _outcome(results: Sequence[ArmResult]) -> str:
    # An arm's progress line: its metrics, the mean over its seeds when it has several.
    if not results:
        return "trained"

    def mean(name: str) -> float:
        return sum(r.metrics[name] for r in results) / len(results)

    return (
        f"{'mean ' if len(results) > 1 else ''}R@1 {100 * mean('precision_at_1'):.2f} %  "
        f"OPIS {1000 * mean('opis'):.2f}e-3  ε-OPIS {1000 * mean('eps_opis'):.2f}e-3"
    )


def _span(labels: Sequence[int]) -> str:
    if labels and labels == list(range(labels[0], labels[-1] + 1)) and len(labels) > 2:
        return f"{labels[0]}-{labels[-1]}"
    return ", ".join(map(str, labels))

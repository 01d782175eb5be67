"""The open-world experiment: train on seen classes with pml, evaluate OPIS on unseen ones.

One *arm* is one (base loss, with or without TCM, seed) run. The base losses are
``losses.MultiSimilarityLoss`` (``"multisimilarity"``) and ``losses.ArcFaceLoss``
(``"arcface"``), both trained with ``trainers.MetricLossOnly``: ArcFaceLoss is a pml
metric loss that owns its class-weight matrix, trained through a
``metric_loss_optimizer``. (``trainers.TrainWithClassifier`` adds a *separate*
``classifier`` model with a ``classifier_loss`` on its logits, e.g. cross-entropy;
without one it is MetricLossOnly.)

TCM is added by :func:`pml_tcm.with_tcm` (and optionally :class:`pml_tcm.TCMMiner` as the
trainer's ``tuple_miner``). Batches come from pml's ``MPerClassSampler`` driven by a
seeded ``c_f.NUMPY_RANDOM``, so a seed fixes the data order and the initial weights.
Evaluation uses ``testers.GlobalEmbeddingSpaceTester`` with
:class:`pml_tcm.OPISAccuracyCalculator` on the unseen classes (query = reference).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import losses, samplers, testers, trainers
from pytorch_metric_learning.utils import common_functions as c_f

from ..accuracy import OPISAccuracyCalculator
from ..embedding_report import REPORT_METRICS
from ..functional.opis import OPISResult
from ..miner import TCMMiner
from ..wrapping import with_tcm
from .data import OpenWorldSplit
from .models import make_embedder, make_trunk
from .settings import LOSS_NAMES, LOSS_TITLES


@dataclass(frozen=True)
class ArmConfig:
    """Everything that defines one training run.

    Attributes:
        loss: ``"multisimilarity"`` or ``"arcface"``.
        tcm: add the TCM term with :func:`pml_tcm.with_tcm`.
        seed: seeds torch, numpy, ``random`` and pml's ``c_f.NUMPY_RANDOM``.
        epochs: training epochs.
        batch_size: batch size (``batch_size / #classes`` samples per class).
        embedding_size: embedding dimension.
        feature_size: trunk output width.
        lr: Adam learning rate for every optimiser.
        max_batches: cap on iterations per epoch (quick runs); ``None`` = one pass.
        pos_margin: TCM m+.
        neg_margin: TCM m-.
        tcm_weight: the loss's ``embedding_reg_weight`` (lambda in the paper).
        tcm_miner: also use :class:`pml_tcm.TCMMiner` as the trainer's tuple miner (the
            base loss then sees only the TCM hard pairs).
        far_range: FAR range of the OPIS calibration.
        eval_batch_size: batch size of the tester.
        device: ``"cpu"`` or ``"cuda"``: where the models, the loss and the batches live
            (pml's ``data_device``); TCM and OPIS run on the embeddings' device.
    """

    loss: str = "multisimilarity"
    tcm: bool = False
    seed: int = 0
    epochs: int = 5
    batch_size: int = 100
    embedding_size: int = 64
    feature_size: int = 128
    lr: float = 1e-3
    max_batches: int | None = None
    pos_margin: float = 0.9
    neg_margin: float = 0.5
    tcm_weight: float = 1.0
    tcm_miner: bool = False
    far_range: tuple[float, float] = (1e-3, 1e-2)
    eval_batch_size: int = 256
    device: str = "cpu"

    @property
    def arm_name(self) -> str:
        return f"{self.loss}{' + TCM' if self.tcm else ''}"

    @property
    def arm_title(self) -> str:
        """The arm as a reader sees it, e.g. ``"ArcFace + TCM"`` (``"2-D"`` when the
        embedding has two dimensions)."""
        title = LOSS_TITLES.get(self.loss, self.loss)
        if self.embedding_size == 2:
            title += " 2-D"
        return f"{title}{' + TCM' if self.tcm else ''}"


@dataclass
class ArmResult:
    """What one arm produced.

    Attributes:
        config: the run's configuration.
        metrics: ``precision_at_1``, ``mean_average_precision_at_r``, ``opis``,
            ``eps_opis`` on the unseen classes.
        embeddings: ``(M, D)`` normalised embeddings of the evaluation set.
        labels: ``(M,)`` their labels.
        opis_result: the full :class:`pml_tcm.functional.opis.OPISResult` (per-class
            utility curves included).
        batch_losses: total loss of every training iteration.
        seconds: wall time of training plus evaluation.
    """

    config: ArmConfig
    metrics: dict[str, float]
    embeddings: np.ndarray
    labels: np.ndarray
    opis_result: OPISResult
    batch_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


class SafeAcosArcFaceLoss(losses.ArcFaceLoss):
    """pml's ArcFaceLoss with cosines kept inside (-1, 1) before ``acos``.

    pml clamps to [-1, 1], where ``acos`` has an infinite gradient; with a 2-D embedding
    a cosine rounds to exactly 1 within a few batches and the weights become NaN.
    """

    def get_angles(self, cosine_of_target_classes: torch.Tensor) -> torch.Tensor:
        limit = 1.0 - 1e-6
        return super().get_angles(cosine_of_target_classes.clamp(-limit, limit))


def seed_everything(seed: int) -> None:
    """Seed ``random``, numpy, torch and pml's ``c_f.NUMPY_RANDOM`` (sampler order)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)


def build_loss(config: ArmConfig, num_classes: int) -> losses.BaseMetricLossFunction:
    """The arm's base loss, with TCM attached when ``config.tcm``.

    Raises:
        ValueError: unknown loss name.
    """
    if config.loss == "multisimilarity":
        loss = losses.MultiSimilarityLoss()
    elif config.loss == "arcface":
        arcface = SafeAcosArcFaceLoss if config.embedding_size <= 3 else losses.ArcFaceLoss
        loss = arcface(num_classes=num_classes, embedding_size=config.embedding_size)
    else:
        raise ValueError(f"unknown loss {config.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
    if config.tcm:
        loss.embedding_reg_weight = config.tcm_weight
        with_tcm(loss, pos_margin=config.pos_margin, neg_margin=config.neg_margin)
    return loss


def build_trainer(
    config: ArmConfig,
    split: OpenWorldSplit,
    models: dict[str, torch.nn.Module],
    loss: losses.BaseMetricLossFunction,
    end_of_iteration_hook: Callable[[Any], Any] | None = None,
) -> trainers.BaseTrainer:
    """A pml ``MetricLossOnly`` trainer for the arm, one Adam optimiser per model and one
    for the loss's own parameters (ArcFace's class weights), batches from
    ``MPerClassSampler``."""
    dataset = split.train_dataset()
    num_classes = split.num_train_classes
    if config.batch_size % num_classes:
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of the {num_classes} classes"
        )
    sampler = samplers.MPerClassSampler(
        split.train_y,
        m=config.batch_size // num_classes,
        batch_size=config.batch_size,
        length_before_new_iter=len(dataset),
    )
    optimizers = {
        f"{name}_optimizer": torch.optim.Adam(model.parameters(), lr=config.lr)
        for name, model in models.items()
    }
    if any(p.requires_grad for p in loss.parameters()):
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss.parameters(), lr=config.lr)
    mining_funcs = {}
    if config.tcm_miner:
        mining_funcs["tuple_miner"] = TCMMiner(config.pos_margin, config.neg_margin)
    iterations = len(dataset) // config.batch_size
    if config.max_batches is not None:
        iterations = min(iterations, config.max_batches)
    return trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=config.batch_size,
        loss_funcs={"metric_loss": loss},
        dataset=dataset,
        mining_funcs=mining_funcs,
        iterations_per_epoch=iterations,
        data_device=torch.device(config.device),
        sampler=sampler,
        dataloader_num_workers=0,
        end_of_iteration_hook=end_of_iteration_hook,
    )


def make_accuracy_calculator(config: ArmConfig) -> OPISAccuracyCalculator:
    """:class:`pml_tcm.OPISAccuracyCalculator` computing the metrics of ``pml-tcm report``
    (:data:`pml_tcm.embedding_report.REPORT_METRICS`)."""
    return OPISAccuracyCalculator(
        far_range=config.far_range,
        include=REPORT_METRICS,
        k="max_bin_count",
        device=torch.device(config.device),  # pml's default would be CUDA whenever present
    )


def evaluate(
    config: ArmConfig, split: OpenWorldSplit, models: dict[str, torch.nn.Module]
) -> tuple[dict[str, float], np.ndarray, np.ndarray, OPISResult]:
    """Test on the unseen classes with ``GlobalEmbeddingSpaceTester`` (query = reference).

    Returns:
        ``(metrics, embeddings, labels, opis_result)``: the report's metrics, the normalised
        evaluation embeddings with their labels, and the OPIS result with its curves.
    """
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_embeddings(tester: testers.BaseTester) -> None:
        captured.update(tester.embeddings_and_labels)

    calculator = make_accuracy_calculator(config)
    tester = testers.GlobalEmbeddingSpaceTester(
        normalize_embeddings=True,
        batch_size=config.eval_batch_size,
        dataloader_num_workers=0,
        data_device=torch.device(config.device),
        accuracy_calculator=calculator,
        end_of_testing_hook=keep_embeddings,
    )
    accuracies = tester.test(
        {"unseen": split.eval_dataset()}, config.epochs, models["trunk"], models["embedder"]
    )["unseen"]
    metrics = {name: float(accuracies[f"{name}_level0"]) for name in REPORT_METRICS}
    embeddings, labels = captured["unseen"]
    return metrics, embeddings.cpu().numpy(), labels[:, 0].cpu().numpy(), calculator.last_result


@dataclass
class TrainedArm:
    """A trained arm before evaluation.

    Attributes:
        models: ``{"trunk": ..., "embedder": ...}``.
        batch_losses: total loss of every training iteration.
        seconds: training wall time.
    """

    models: dict[str, torch.nn.Module]
    batch_losses: list[float]
    seconds: float


def train_arm(
    config: ArmConfig,
    split: OpenWorldSplit,
    progress: Callable[[int, float], None] | None = None,
) -> TrainedArm:
    """Seed, build and train one arm.

    Args:
        config: the arm.
        split: the data.
        progress: called after every training batch with the epoch (1-based) and the
            batch's total loss.
    """
    start = time.perf_counter()
    seed_everything(config.seed)
    models = _make_models(config, split)
    loss = build_loss(config, split.num_train_classes).to(config.device)
    batch_losses: list[float] = []

    def record_loss(trainer: trainers.BaseTrainer) -> None:
        batch_losses.append(float(torch.as_tensor(trainer.losses["total_loss"]).detach()))
        if progress is not None:
            progress(trainer.epoch, batch_losses[-1])

    trainer = build_trainer(config, split, models, loss, record_loss)
    trainer.train(num_epochs=config.epochs)
    return TrainedArm(models, batch_losses, time.perf_counter() - start)


def _make_models(config: ArmConfig, split: OpenWorldSplit) -> dict[str, torch.nn.Module]:
    return {
        "trunk": make_trunk(split.input_shape, config.feature_size).to(config.device),
        "embedder": make_embedder(config.feature_size, config.embedding_size).to(config.device),
    }


def checkpoint_path(config: ArmConfig, split: OpenWorldSplit, folder: Path) -> Path:
    """Where :func:`run_arm` keeps an arm's trained weights."""
    return folder / (
        f"{split.name}_{config.loss}_{'tcm' if config.tcm else 'base'}_seed{config.seed}"
        f"_e{config.epochs}_d{config.embedding_size}.pt"
    )


def run_arm(
    config: ArmConfig,
    split: OpenWorldSplit,
    checkpoint_dir: str | Path | None = None,
    evaluate_arm: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> ArmResult | None:
    """Train (or reload) and evaluate one arm.

    Args:
        config: the arm.
        split: the data.
        checkpoint_dir: when given, trained weights are saved there and an arm whose
            checkpoint was saved with the same configuration is reloaded, not retrained.
        evaluate_arm: ``False`` trains (and saves) only, and returns ``None``.
        progress: see :func:`train_arm` (not called for a reloaded arm).
    """
    trained = _load_checkpoint(config, split, checkpoint_dir)
    if trained is None:
        trained = train_arm(config, split, progress)
        if checkpoint_dir is not None:
            path = checkpoint_path(config, split, Path(checkpoint_dir))
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "config": _training_fields(config),
                    "models": {k: m.state_dict() for k, m in trained.models.items()},
                    "batch_losses": trained.batch_losses,
                    "seconds": trained.seconds,
                },
                path,
            )
    if not evaluate_arm:
        return None
    start = time.perf_counter()
    metrics, embeddings, labels, opis_result = evaluate(config, split, trained.models)
    seconds = trained.seconds + time.perf_counter() - start
    return ArmResult(
        config, metrics, embeddings, labels, opis_result, trained.batch_losses, seconds
    )


def _training_fields(config: ArmConfig) -> dict[str, Any]:
    # What a checkpoint depends on: everything but the evaluation settings and the
    # device (weights load on any device).
    fields = asdict(config)
    for not_a_training_field in ("far_range", "eval_batch_size", "device"):
        fields.pop(not_a_training_field)
    return fields


def _load_checkpoint(
    config: ArmConfig, split: OpenWorldSplit, checkpoint_dir: str | Path | None
) -> TrainedArm | None:
    if checkpoint_dir is None:
        return None
    path = checkpoint_path(config, split, Path(checkpoint_dir))
    if not path.is_file():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if saved.get("config") != _training_fields(config):
        return None
    models = _make_models(config, split)
    for name, model in models.items():
        model.load_state_dict(saved["models"][name])
    return TrainedArm(models, list(saved["batch_losses"]), float(saved["seconds"]))


def run_arms(
    split: OpenWorldSplit,
    base: ArmConfig,
    loss_names: Sequence[str] = LOSS_NAMES,
    seeds: Sequence[int] = (0, 1, 2),
    log: Callable[[str], None] | None = None,
    checkpoint_dir: str | Path | None = None,
    evaluate_arms: bool = True,
) -> list[ArmResult]:
    """Every (loss, without/with TCM, seed) arm, in that order.

    Args:
        split: the data.
        base: the shared configuration (its ``loss``, ``tcm`` and ``seed`` are replaced).
        loss_names: base losses to run.
        seeds: seeds to run.
        log: called with one line after each arm.
        checkpoint_dir: see :func:`run_arm`.
        evaluate_arms: ``False`` trains (and saves) only, and returns ``[]``.
    """
    results = []
    for config in arm_configs(base, loss_names, seeds):
        result = run_arm(config, split, checkpoint_dir, evaluate_arms)
        if result is None:
            if log is not None:
                log(f"{config.arm_name} seed={config.seed}: trained")
            continue
        results.append(result)
        if log is not None:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items())
            log(f"{config.arm_name} seed={config.seed}: {shown} ({result.seconds:.0f}s)")
    return results


def arm_configs(
    base: ArmConfig, loss_names: Sequence[str] = LOSS_NAMES, seeds: Sequence[int] = (0, 1, 2)
) -> list[ArmConfig]:
    """Every (loss, seed, without/with TCM) arm of :func:`run_arms`, in its order."""
    return [
        replace(base, loss=loss_name, tcm=tcm, seed=seed)
        for loss_name in loss_names
        for seed in seeds
        for tcm in (False, True)
    ]

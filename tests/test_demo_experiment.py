"""Real pml training with TCM, the experiment arms and the results table."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, samplers, trainers

from pml_tcm import TCMMiner, with_tcm
from pml_tcm.demo.data import digits_split
from pml_tcm.demo.experiment import (
    ArmConfig,
    ArmResult,
    SafeAcosArcFaceLoss,
    run_arm,
    seed_everything,
)
from pml_tcm.demo.models import make_embedder, make_trunk
from pml_tcm.demo.results_table import markdown_table, plain_reading


@pytest.fixture(scope="module")
def digits():
    return digits_split()


def _models(split, embedding_size=16):
    return {
        "trunk": make_trunk(split.input_shape, 32),
        "embedder": make_embedder(32, embedding_size),
    }


def _fixed_batch_loss(models, loss_fn, x, y):
    for model in models.values():
        model.eval()
    with torch.no_grad():
        embeddings = models["embedder"](models["trunk"](x))
        return float(loss_fn(embeddings, y))


def test_metric_loss_only_with_tcm_miner_and_with_tcm_lowers_the_loss(digits):
    seed_everything(0)
    models = _models(digits)
    loss_fn = with_tcm(losses.MultiSimilarityLoss())
    miner = TCMMiner()
    x, y = torch.from_numpy(digits.train_x), torch.from_numpy(digits.train_y)
    before = _fixed_batch_loss(models, loss_fn, x, y)
    batch_losses = []
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers={
            name + "_optimizer": torch.optim.Adam(m.parameters(), lr=3e-3)
            for name, m in models.items()
        },
        batch_size=100,
        loss_funcs={"metric_loss": loss_fn},
        mining_funcs={"tuple_miner": miner},
        dataset=digits.train_dataset(),
        sampler=samplers.MPerClassSampler(digits.train_y, m=20, batch_size=100),
        iterations_per_epoch=20,
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
        end_of_iteration_hook=lambda t: batch_losses.append(float(t.losses["total_loss"])),
    )
    trainer.train(num_epochs=1)
    # The mined pairs change as training goes: judge by the first vs the last batches,
    # and by the unmined loss (all pairs) on a fixed batch.
    assert np.mean(batch_losses[-5:]) < 0.8 * np.mean(batch_losses[:5])
    after = _fixed_batch_loss(models, loss_fn, x, y)
    assert np.isfinite(after) and after < 0.9 * before


def test_train_with_classifier_arcface_with_tcm_lowers_the_loss(digits):
    seed_everything(0)
    models = _models(digits)
    models["classifier"] = torch.nn.Linear(16, 5)
    arcface = with_tcm(losses.ArcFaceLoss(num_classes=5, embedding_size=16))
    x, y = torch.from_numpy(digits.train_x), torch.from_numpy(digits.train_y)
    before = _fixed_batch_loss(models, arcface, x, y)
    optimizers = {
        name + "_optimizer": torch.optim.Adam(m.parameters(), lr=3e-3) for name, m in models.items()
    }
    optimizers["metric_loss_optimizer"] = torch.optim.Adam(arcface.parameters(), lr=3e-3)
    trainer = trainers.TrainWithClassifier(
        models=models,
        optimizers=optimizers,
        batch_size=100,
        loss_funcs={"metric_loss": arcface, "classifier_loss": torch.nn.CrossEntropyLoss()},
        loss_weights={"metric_loss": 1.0, "classifier_loss": 0.5},
        dataset=digits.train_dataset(),
        sampler=samplers.MPerClassSampler(digits.train_y, m=20, batch_size=100),
        iterations_per_epoch=20,
        data_device=torch.device("cpu"),
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=1)
    assert trainer.losses is not None
    after = _fixed_batch_loss(models, arcface, x, y)
    assert np.isfinite(after) and after < 0.9 * before


def test_safe_acos_arcface_has_finite_gradients_at_cosine_one():
    loss_fn = SafeAcosArcFaceLoss(num_classes=2, embedding_size=2)
    with torch.no_grad():
        loss_fn.W.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss_fn(embeddings, torch.tensor([0, 1])).backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(loss_fn.W.grad).all()


QUICK = ArmConfig(epochs=1, max_batches=3, embedding_size=16, feature_size=32)


@pytest.mark.parametrize("loss", ["multisimilarity", "arcface"])
def test_run_arm_is_deterministic_and_reuses_checkpoints(digits, tmp_path, loss):
    split = digits.subsample(300, 300)
    config = replace(QUICK, loss=loss, tcm=True)
    first = run_arm(config, split, checkpoint_dir=tmp_path)
    assert (
        set(first.metrics) == {"precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis"}
        and len(first.batch_losses) == 3
    )
    assert 0.0 <= first.metrics["precision_at_1"] <= 1.0 and first.metrics["opis"] >= 0.0
    assert first.embeddings.shape == (300, 16) and set(first.labels.tolist()) == {5, 6, 7, 8, 9}
    again = run_arm(config, split)
    assert again.metrics == first.metrics
    reloaded = run_arm(config, split, checkpoint_dir=tmp_path)
    assert reloaded.metrics == first.metrics
    assert reloaded.batch_losses == first.batch_losses


def _result(loss, tcm, seed, **metrics):
    return ArmResult(
        ArmConfig(loss=loss, tcm=tcm, seed=seed),
        metrics,
        np.zeros((1, 2)),
        np.zeros(1),
        opis_result=None,
    )


def _cells(line):
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_markdown_table_values():
    results = [
        _result("arcface", False, 0, precision_at_1=0.8, mean_average_precision_at_r=0.5,
                opis=0.004, eps_opis=0.010),
        _result("arcface", False, 1, precision_at_1=0.9, mean_average_precision_at_r=0.7,
                opis=0.002, eps_opis=0.010),
        _result("arcface", True, 0, precision_at_1=0.85, mean_average_precision_at_r=0.6,
                opis=0.0015, eps_opis=0.011),
        _result("arcface", True, 1, precision_at_1=0.95, mean_average_precision_at_r=0.6,
                opis=0.0015, eps_opis=0.013),
    ]  # fmt: skip
    lines = markdown_table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # padded: the columns line up
    assert _cells(lines[0])[:3] == ["Loss", "TCM", "n"]
    assert "↑" in _cells(lines[0])[3] and "↓" in _cells(lines[0])[5]
    # population std by hand: R@1 (80, 90) -> 85 ± 5, eps-OPIS (11, 13) -> 12 ± 1
    assert _cells(lines[2]) == ["ArcFace", "no", "2", "85.00 ± 5.00", "60.00 ± 10.00",
                                "3.00 ± 1.00", "10.00 ± 0.00"]  # fmt: skip
    assert _cells(lines[3]) == ["ArcFace", "yes", "2", "90.00 ± 5.00", "60.00 ± 0.00",
                                "1.50 ± 0.00", "12.00 ± 1.00"]  # fmt: skip
    # eps-OPIS went up (lower is better): flagged; the rest improved or held.
    assert _cells(lines[4]) == ["ArcFace", "change", "", "+5.00 pts", "+0.00 pts", "-50.0 %",
                                "+20.0 % worse"]  # fmt: skip


def test_single_seed_shows_n_1_and_no_zero_spread():
    results = [
        _result("multisimilarity", False, 0, precision_at_1=0.846, mean_average_precision_at_r=0.27,
                opis=0.00288, eps_opis=0.0046),
        _result("multisimilarity", True, 0, precision_at_1=0.887, mean_average_precision_at_r=0.28,
                opis=0.00363, eps_opis=0.0052),
    ]  # fmt: skip
    table = markdown_table(results)
    assert "±" not in table
    rows = [_cells(line) for line in table.splitlines()[2:]]
    assert rows[0] == ["MultiSimilarity", "no", "1", "84.60", "27.00", "2.88", "4.60"]
    # OPIS 2.88 -> 3.63 is +26.0 %: worse; R@1 and MAP@R rose: not flagged
    assert rows[2] == ["MultiSimilarity", "change", "", "+4.10 pts", "+1.00 pts",
                       "+26.0 % worse", "+13.0 % worse"]  # fmt: skip
    reading = " ".join(plain_reading(results).split())
    assert "With MultiSimilarity, TCM made OPIS worse here (+26.0 %" in reading
    assert "R@1 rose by 4.10 points" in reading and "One seed per arm" in reading


def test_reading_says_lowered_when_tcm_lowered_opis():
    results = [
        _result("arcface", tcm, seed, precision_at_1=0.9 - 0.01 * tcm,
                mean_average_precision_at_r=0.4, opis=0.008 - 0.003 * tcm + 0.001 * seed,
                eps_opis=0.04)
        for tcm in (False, True) for seed in (0, 1)
    ]  # fmt: skip
    reading = " ".join(plain_reading(results).split())
    # OPIS means 8.5e-3 -> 5.5e-3: -35.3 %, larger than the 0.5e-3 seed spread
    assert "With ArcFace, TCM lowered OPIS by 35.3 %" in reading
    assert "worse" not in reading and "spread" in reading
    assert "at a cost of 1.00 points of R@1" in reading

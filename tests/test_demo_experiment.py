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
    # 95 % t-interval of the paired differences, 1 degree of freedom (t = 12.7062):
    # R@1 +5, +5 -> sd 0 -> [5, 5]; MAP@R +10, -10 -> 0 ± 12.7062 * 14.142 / sqrt(2)
    t = 12.706204736174694
    map_half = t * np.std([10.0, -10.0], ddof=1) / np.sqrt(2)
    opis_half = t * np.std([-2.5, -0.5], ddof=1) / np.sqrt(2) / 3.0 * 100  # % of mean 3
    eps_half = t * np.std([1.0, 3.0], ddof=1) / np.sqrt(2) / 10.0 * 100
    assert _cells(lines[5]) == [
        "ArcFace", "95% CI", "", "+5.00 to +5.00", f"{-map_half:+.2f} to {map_half:+.2f}",
        f"{-50 - opis_half:+.1f} to {-50 + opis_half:+.1f}",
        f"{20 - eps_half:+.1f} to {20 + eps_half:+.1f}",
    ]  # fmt: skip


def test_changes_are_paired_by_seed():
    # the same values, paired differently: seed s without TCM with seed s with TCM
    base = {0: 0.010, 1: 0.020, 2: 0.030}
    tcm = {0: 0.011, 1: 0.021, 2: 0.031}  # +1e-3 on every seed: a clear effect
    results = [
        _result("arcface", flag, seed, precision_at_1=0.9, mean_average_precision_at_r=0.5,
                opis=values[seed], eps_opis=0.01)
        for flag, values in ((False, base), (True, tcm)) for seed in (2, 0, 1)
    ]  # fmt: skip
    rows = [_cells(line) for line in markdown_table(results).splitlines()]
    interval = next(row for row in rows if row[1] == "95% CI")
    # paired: every difference is +1e-3, sd 0 -> the interval is the point +5.0 %
    assert interval[5] == "+5.0 to +5.0"
    reading = " ".join(plain_reading(results).split())
    assert (
        "Distinguishable from seed noise (the 95 % t-interval of the change, paired by "
        "seed over 3 seeds, excludes 0): ArcFace OPIS." in reading
    )


def test_single_seed_shows_n_1_and_no_zero_spread():
    results = [
        _result("multisimilarity", False, 0, precision_at_1=0.846, mean_average_precision_at_r=0.27,
                opis=0.00288, eps_opis=0.0046),
        _result("multisimilarity", True, 0, precision_at_1=0.887, mean_average_precision_at_r=0.28,
                opis=0.00363, eps_opis=0.0052),
    ]  # fmt: skip
    table = markdown_table(results)
    assert "±" not in table and "CI" not in table
    rows = [_cells(line) for line in table.splitlines()[2:]]
    assert rows[0] == ["MultiSimilarity", "no", "1", "84.60", "27.00", "2.88", "4.60"]
    # OPIS 2.88 -> 3.63 is +26.0 %: worse; R@1 and MAP@R rose: not flagged
    assert rows[2] == ["MultiSimilarity", "change", "", "+4.10 pts", "+1.00 pts",
                       "+26.0 % worse", "+13.0 % worse"]  # fmt: skip
    assert len(rows) == 3
    reading = " ".join(plain_reading(results).split())
    assert "With MultiSimilarity, TCM made OPIS worse here (+26.0 %" in reading
    assert "R@1 rose by 4.10 and MAP@R by 1.00 points" in reading
    assert "A single seed per arm cannot separate TCM's effect from seed noise" in reading
    assert "consistency, not accuracy" in reading


def test_reading_says_lowered_when_tcm_lowered_opis():
    results = [
        _result("arcface", tcm, seed, precision_at_1=0.9 - 0.01 * tcm,
                mean_average_precision_at_r=0.4 + 0.02 * tcm * seed,
                opis=0.008 - 0.003 * tcm + 0.001 * seed, eps_opis=0.04 + 0.001 * tcm * seed)
        for tcm in (False, True) for seed in (0, 1)
    ]  # fmt: skip
    reading = " ".join(plain_reading(results).split())
    # OPIS means 8.5e-3 -> 5.5e-3: -35.3 %, the same -3e-3 on both seeds
    assert "With ArcFace, TCM lowered OPIS by 35.3 %" in reading
    assert "worse" not in reading
    # R@1 -1 point on both seeds; MAP@R 0 and +2 points: it moved, and is named
    assert "R@1 fell by 1.00 points and MAP@R rose by 1.00 points" in reading
    assert (
        "seeds, excludes 0): ArcFace R@1, OPIS. Every other change is not distinguishable from "
        "seed noise" in reading
    )


def test_reading_when_nothing_is_distinguishable_from_seed_noise():
    results = [
        _result("multisimilarity", tcm, seed, precision_at_1=0.8 + 0.01 * (-1) ** (seed + tcm),
                mean_average_precision_at_r=0.3 + 0.01 * (-1) ** (seed + tcm),
                opis=0.003 + 0.001 * (-1) ** (seed + tcm),
                eps_opis=0.004 + 0.001 * (-1) ** (seed + tcm))
        for tcm in (False, True) for seed in (0, 1, 2)
    ]  # fmt: skip
    reading = " ".join(plain_reading(results).split())
    assert "No change is distinguishable from seed noise (its 95 % t-interval" in reading


def test_reading_explains_the_2d_runs_low_opis():
    labels = np.repeat(np.arange(5, 10), 4)  # 20 samples, 4 per class
    results = [
        _result("arcface", tcm, 0, precision_at_1=0.93, mean_average_precision_at_r=0.4,
                opis=0.005, eps_opis=0.02)
        for tcm in (False, True)
    ]  # fmt: skip
    circle = [
        ArmResult(
            ArmConfig(loss="arcface", tcm=tcm, embedding_size=2),
            {"precision_at_1": 0.3 + 0.05 * tcm, "mean_average_precision_at_r": 0.1,
             "opis": 0.00004, "eps_opis": 0.0001},
            np.zeros((20, 2)),
            labels,
            opis_result=None,
        )
        for tcm in (False, True)
    ]  # fmt: skip
    reading = " ".join(plain_reading(results, circle).split())
    # chance R@1: 5 classes of 4 -> 3/19 of the other samples share the class
    assert f"R@1 at most 35.00 % (chance {100 * 3 / 19:.1f} %)" in reading
    assert "yet a lower OPIS than every 64-D run" in reading
    assert "equally bad" in reading and "consistency, not accuracy" in reading

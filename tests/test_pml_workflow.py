"""pml's standard training set-up with a with_tcm loss: MetricLossOnly + logging_presets'
HookContainer (record-keeper) + GlobalEmbeddingSpaceTester, best model by OPIS."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses, miners, testers, trainers
from pytorch_metric_learning.utils import logging_presets

from pml_tcm import (
    GroupedEmbeddingSpaceTester,
    OPISAccuracyCalculator,
    TCMRegularizer,
    with_tcm,
)
from pml_tcm.functional import opis

pytest.importorskip("record_keeper")
pytest.importorskip("tensorboard")


def _clusters(classes: range, per_class: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, 16, generator=torch.Generator().manual_seed(99))
    labels = torch.tensor([c for c in classes for _ in range(per_class)])
    x = centres[labels] + 0.9 * torch.randn(len(labels), 16, generator=g)
    return torch.utils.data.TensorDataset(x, labels)


def _with_groups(dataset: torch.utils.data.TensorDataset) -> torch.utils.data.TensorDataset:
    """The same samples with label rows (class, group): three customers."""
    x, labels = dataset.tensors
    groups = torch.arange(len(labels)) % 3 * 10
    return torch.utils.data.TensorDataset(x, torch.stack([labels, groups], dim=1))


def _train(tmp_path: Path, primary_metric: str, epochs: int, patience: int | None, grouped=False):
    torch.manual_seed(0)
    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(tmp_path / "logs"), str(tmp_path / "tensorboard")
    )
    hooks = logging_presets.get_hook_container(
        record_keeper, primary_metric=primary_metric, log_freq=1
    )
    calculator = OPISAccuracyCalculator(
        include=("precision_at_1", "opis", "eps_opis", "neg_opis", "neg_eps_opis"),
        k="max_bin_count",
        device=torch.device("cpu"),
        far_range=(1e-2, 1e-1),
    )
    tester_class = GroupedEmbeddingSpaceTester if grouped else testers.GlobalEmbeddingSpaceTester
    tester = tester_class(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=calculator,
        dataloader_num_workers=0,
        batch_size=64,
    )
    val = _clusters(range(6, 10), 30, seed=2)
    train = _clusters(range(6), 40, seed=1)
    if grouped:
        val, train = _with_groups(val), _with_groups(train)
    end_of_epoch_hook = hooks.end_of_epoch_hook(
        tester, {"val": val}, str(tmp_path / "models"), test_interval=1, patience=patience
    )
    trunk = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    loss = with_tcm(
        losses.ContrastiveLoss(),
        regularizer=TCMRegularizer(pos_margin=0.9, neg_margin=0.5, collect_stats=True),
    )
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk},
        optimizers={"trunk_optimizer": torch.optim.SGD(trunk.parameters(), lr=0.05)},
        batch_size=32,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.1)},
        dataset=train,
        dataloader_num_workers=0,
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    logging.getLogger("PML").setLevel(logging.WARNING)
    trainer.train(num_epochs=epochs)
    return hooks, tester, trainer


def _rows(db: Path, table: str) -> list[dict]:
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute(f"SELECT * FROM {table}")]


def _recorded_opis(db: Path) -> dict[int, float]:
    """``{epoch: opis_level0}`` of the validation split's records."""
    with sqlite3.connect(db) as connection:
        table = next(
            r[0]
            for r in connection.execute("SELECT name FROM sqlite_master")
            if r[0].endswith("VAL_vs_self")
        )
    rows = _rows(db, table)
    return {r["epoch"]: r["opis_level0"] for r in rows if r.get("opis_level0") is not None}


def test_trainer_with_hooks_records_tcm_and_keeps_the_lowest_opis_epoch(tmp_path):
    hooks, tester, trainer = _train(tmp_path, "neg_opis", epochs=4, patience=None)
    db = tmp_path / "logs" / "logs.db"
    with sqlite3.connect(db) as connection:
        tables = [r[0] for r in connection.execute("SELECT name FROM sqlite_master")]
    # TCM's stats beside the loss, per iteration
    tcm_table = next(t for t in tables if t.endswith("embedding_regularizer_TCMRegularizer"))
    rows = _rows(db, tcm_table)
    assert len(rows) >= 4 * 7  # every iteration of 4 epochs of 7 batches (log_freq=1)
    assert {"tcm_value", "num_hard_pos_pairs", "num_hard_neg_pairs"} <= set(rows[0])
    assert all(r["tcm_value"] >= 0 and r["num_hard_neg_pairs"] >= 0 for r in rows)
    assert any(r["tcm_value"] > 0 for r in rows)
    # accuracies per epoch; best epoch = argmin of the recorded OPIS
    accuracies = [t for t in tables if t.endswith("VAL_vs_self")]
    assert len(accuracies) == 1
    # (pml's tester names the columns by metric and hierarchy level)
    epochs = [r for r in _rows(db, accuracies[0]) if r.get("opis_level0") is not None]
    assert sorted(r["epoch"] for r in epochs) == [1, 2, 3, 4]
    for r in epochs:
        assert r["neg_opis_level0"] == pytest.approx(-r["opis_level0"])
        assert r["neg_eps_opis_level0"] == pytest.approx(-r["eps_opis_level0"])
    opis_by_epoch = {r["epoch"]: r["opis_level0"] for r in epochs}
    assert len(set(opis_by_epoch.values())) == 4  # the epochs differ
    best_epoch = min(opis_by_epoch, key=opis_by_epoch.get)
    assert hooks.get_best_epoch_and_accuracy(tester, "val")[0] == best_epoch
    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert f"trunk_best{best_epoch}.pth" in saved
    assert not [name for name in saved if "_best" in name and f"best{best_epoch}." not in name]


def test_patience_counts_from_the_lowest_opis_epoch(tmp_path):
    hooks, tester, trainer = _train(tmp_path, "neg_opis", epochs=8, patience=1)
    epochs = _recorded_opis(tmp_path / "logs" / "logs.db")
    last = max(epochs)
    best = min(epochs, key=epochs.get)
    # training stops once the lowest-OPIS epoch is more than `patience` epochs old
    assert trainer.epoch == last
    if last < 8:
        assert last - best == 2
    assert hooks.get_best_epoch_and_accuracy(tester, "val")[0] == best
    # the best model reloads (pml returns the epoch to resume from: best + 1)
    models = tmp_path / "models"
    resume_epoch = hooks.load_latest_saved_models(trainer, str(models), "cpu", best=True)
    assert resume_epoch == best + 1
    saved = torch.load(models / f"trunk_best{best}.pth")
    for name, value in trainer.models["trunk"].state_dict().items():
        assert torch.equal(value, saved[name])


def test_grouped_tester_in_the_training_loop_keeps_the_lowest_group_opis_epoch(tmp_path):
    hooks, tester, trainer = _train(tmp_path, "neg_opis", epochs=3, patience=None, grouped=True)
    epochs = _recorded_opis(tmp_path / "logs" / "logs.db")
    assert sorted(epochs) == [1, 2, 3]
    best = min(epochs, key=epochs.get)
    assert hooks.get_best_epoch_and_accuracy(tester, "val")[0] == best
    # the last epoch's record is the group OPIS of the trained model's embeddings
    x, rows = _with_groups(_clusters(range(6, 10), 30, seed=2)).tensors
    with torch.no_grad():
        embeddings = trainer.models["trunk"](x)
    expected = opis(embeddings, rows[:, 0], groups=rows[:, 1], far_range=(1e-2, 1e-1))
    assert epochs[3] == pytest.approx(expected.opis, rel=1e-4)
    assert expected.opis != pytest.approx(
        opis(embeddings, rows[:, 0], far_range=(1e-2, 1e-1)).opis, rel=1e-3
    )

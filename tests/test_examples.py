"""The examples run end to end: train_with_pml.py keeps the lowest-OPIS epoch,
open_world.py gives the demo's numbers."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("record_keeper")
pytest.importorskip("tensorboard")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_with_pml.py"
OPEN_WORLD = ROOT / "examples" / "open_world.py"


def test_train_with_pml_example(tmp_path):
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    best_epoch = int(re.search(r"best epoch (\d+): validation OPIS", run.stdout).group(1))
    with sqlite3.connect(tmp_path / "logs" / "logs.db") as db:
        table = next(
            name
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if name.endswith("VAL_vs_self")
        )
        rows = db.execute(f"SELECT epoch, opis_level0 FROM {table}").fetchall()
    opis_by_epoch = {epoch: value for epoch, value in rows if value is not None}
    assert sorted(opis_by_epoch) == [1, 2, 3]
    assert best_epoch == min(opis_by_epoch, key=opis_by_epoch.get)
    assert (tmp_path / "models" / f"trunk_best{best_epoch}.pth").is_file()
    for name in ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis"):
        value = float(re.search(rf"test {name}: ([0-9.e+-]+)", run.stdout).group(1))
        assert 0 <= value <= 1
    assert re.search(r"threshold [0-9.]+ for target FAR 0.01", run.stdout)


def test_open_world_example_gives_the_demos_numbers(tmp_path):
    import torch

    from pml_tcm.demo.data import digits_split
    from pml_tcm.demo.experiment import ArmConfig, run_arm

    run = subprocess.run(
        [sys.executable, str(OPEN_WORLD), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "One seed (0): it cannot separate TCM's effect from seed noise" in run.stdout
    rows = [line.strip("|").split("|") for line in run.stdout.splitlines()]
    rows = [[cell.strip() for cell in row] for row in rows if len(row) == 6][2:]
    assert [row[:2] for row in rows] == [
        ["multisimilarity", "no"],
        ["multisimilarity", "weight 3"],  # chosen on validation classes for digits
        ["arcface", "no"],
        ["arcface", "weight 1"],
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the example and the demo on digits
    try:
        split = digits_split()
        for row in rows:
            tcm = row[1] != "no"
            weight = float(row[1].split()[1]) if tcm else 1.0
            config = ArmConfig(loss=row[0], tcm=tcm, tcm_weight=weight, epochs=1)
            expected = run_arm(config, split).metrics
            names = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")
            printed = dict(zip(names, map(float, row[2:])))
            assert printed == pytest.approx(expected, abs=2e-6), row
    finally:
        torch.set_num_threads(threads)

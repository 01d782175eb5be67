"""examples/train_with_pml.py runs end to end and keeps the lowest-OPIS epoch."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("record_keeper")
pytest.importorskip("tensorboard")
pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_with_pml.py"


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

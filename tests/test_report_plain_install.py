"""``pml-tcm report`` on a plain install (no matplotlib): report.md and report.json are
written, the figure is left out with one line naming the extra. matplotlib's import is
made to fail in a subprocess (a meta-path blocker), nothing is uninstalled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HINT = "pip install 'pml-tcm[examples]' (from a checkout: pip install '.[examples]')"

BLOCKER = """
import importlib.abc, sys
class NoMatplotlib(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoMatplotlib())
"""


def _without_matplotlib(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_blocker_blocks():
    run = _without_matplotlib("import matplotlib")
    assert run.returncode == 1 and "No module named 'matplotlib'" in run.stderr


def test_report_without_matplotlib_writes_markdown_and_json_and_says_which_extra(tmp_path):
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(4), 20)
    embeddings = (rng.randn(4, 6)[labels] + 0.8 * rng.randn(labels.size, 6)).astype(np.float32)
    np.save(tmp_path / "emb.npy", embeddings)
    np.save(tmp_path / "labels.npy", labels)
    out = tmp_path / "out"
    out.mkdir()
    (out / "utility_curves.png").write_bytes(b"an older run's figure")
    args = ["report", str(tmp_path / "emb.npy"), str(tmp_path / "labels.npy"), "--out", str(out)]
    run = _without_matplotlib(
        f"from pml_tcm.cli import main\nraise SystemExit(main({args + ['--device', 'cpu']!r}))"
    )
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    # the older figure is gone with the rest of the older set: one run's files only
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    notes = [line for line in run.stdout.splitlines() if "needs matplotlib" in line]
    assert notes == [f"no utility_curves.png: the figure needs matplotlib: {HINT}"]
    markdown = (out / "report.md").read_text()
    assert "![" not in markdown and f"No figure: the figure needs matplotlib: {HINT}" in markdown
    document = json.loads((out / "report.json").read_text())
    assert list(document["files"]) == ["report.md"] and document["metrics"]["opis"] >= 0
    assert "matplotlib" in document["figure_note"]


def test_plot_utility_curves_without_matplotlib_names_the_extra():
    run = _without_matplotlib(
        "import torch\n"
        "from pml_tcm import plot_utility_curves\n"
        "from pml_tcm.functional.opis import opis\n"
        "result = opis(torch.randn(40, 3), torch.arange(40) % 4, num_thresholds=5)\n"
        "try:\n"
        "    plot_utility_curves(result)\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"plot_utility_curves needs matplotlib: {HINT}"

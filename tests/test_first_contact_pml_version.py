"""pml 3 is refused at import with one sentence; pyproject.toml pins pml below 3."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_with(fake: str) -> subprocess.CompletedProcess:
    """``import pml_tcm`` in a fresh interpreter after ``fake`` ran."""
    code = textwrap.dedent(fake) + "\nimport pml_tcm\nprint('imported')\n"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def _import_error(run: subprocess.CompletedProcess) -> str:
    assert run.returncode != 0, run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: "), run.stderr[-2000:]
    return last.removeprefix("ImportError: ")


def _check_message(message: str, version: str) -> None:
    assert ">=2.7,<3" in message and version in message
    for change in ("trainers", "testers", "logging presets", "recorded statistics"):
        assert change in message
    assert "pytorch_metric_learning.evaluation" in message
    # one sentence, on one line
    assert message.endswith(".") and ". " not in message and "\n" not in message


def test_pml_3_with_a_version_attribute_is_refused():
    fake = """
    import pytorch_metric_learning
    pytorch_metric_learning.__version__ = "3.0.3"
    """
    _check_message(_import_error(_import_with(fake)), "3.0.3")


def test_pml_3_without_a_version_attribute_is_refused():
    # pml 3 removed __version__: the installed distribution's version tells
    fake = """
    import importlib.metadata
    import pytorch_metric_learning
    del pytorch_metric_learning.__version__
    real = importlib.metadata.version
    importlib.metadata.version = (
        lambda name: "3.0.0rc5" if name == "pytorch-metric-learning" else real(name)
    )
    """
    _check_message(_import_error(_import_with(fake)), "3.0.0rc5")


@pytest.mark.parametrize("version", ["2.7.0", "2.9.0"])
def test_pml_2_imports(version):
    fake = f"""
    import pytorch_metric_learning
    pytorch_metric_learning.__version__ = "{version}"
    """
    run = _import_with(fake)
    assert run.returncode == 0 and run.stdout.strip() == "imported", run.stderr[-2000:]


def test_pyproject_pins_pml_below_3_and_lints_for_python_311():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "pytorch-metric-learning>=2.7,<3" in project["project"]["dependencies"]
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"

"""The demo's settings: every bad setting refused before anything is loaded, trained or
written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pml_tcm.cli import main
from pml_tcm.demo import benchmark, data
from pml_tcm.demo.benchmark import _write_whole

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert captured.out == "", captured.out  # no header: nothing started
    return lines[0]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if the demo loads data or trains."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo started before its settings were checked")

    monkeypatch.setattr(data, "load_split", refuse)
    monkeypatch.setattr(benchmark, "run_arm", refuse)


BAD_SETTINGS = [
    (["--tcm-weight", "-1"], "--tcm-weight"),
    (["--tcm-weight", "nan"], "--tcm-weight"),
    (["--tcm-weight", "inf"], "--tcm-weight"),
    (["--tcm-weight", "0"], "--tcm-weight"),
    (["--pos-margin", "1.5"], "--pos-margin"),
    (["--neg-margin", "nan"], "--neg-margin"),
    (["--pos-margin", "0.3", "--neg-margin", "0.5"], "--pos-margin"),
    (["--pos-margin", "0.4"], "--neg-margin"),  # below the default m- 0.5
    (["--lr", "nan"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "98"], "--batch-size"),
    (["--epochs", "0"], "--epochs"),
    (["--embedding-size", "-3"], "--embedding-size"),
    (["--max-batches", "0"], "--max-batches"),
    (["--threads", "0"], "--threads"),
    (["--far-range", "0.1", "0.01"], "--far-range"),
    (["--far-range", "nan", "0.1"], "--far-range"),
    (["--far-range", "0", "0.1"], "--far-range"),
    (["--target-far", "0"], "--target-far"),
    (["--target-far", "nan"], "--target-far"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", str(2**32)], "--seeds"),
    (["--seeds", "0", "1", "0"], "--seeds"),
    (["--losses", "arcface", "arcface"], "--losses"),
]


@pytest.mark.parametrize("extra, option", BAD_SETTINGS, ids=[" ".join(c[0]) for c in BAD_SETTINGS])
def test_a_bad_setting_stops_the_demo_before_anything_runs(
    extra, option, tmp_path, capsys, nothing_runs
):
    out = tmp_path / "demo_out"
    assert main(["demo", "--out", str(out), *extra]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("pml-tcm demo: error:") and option in line, line
    assert not out.exists()


@pytest.mark.parametrize("where", ["file", "under a file", "checkpoint under a file"])
def test_an_unusable_output_folder_stops_the_demo_before_anything_runs(
    where, tmp_path, capsys, nothing_runs
):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    options = {
        "file": ["--out", str(a_file)],
        "under a file": ["--out", str(a_file / "out")],
        "checkpoint under a file": [
            "--out",
            str(tmp_path / "out"),
            "--checkpoint-dir",
            str(a_file / "c"),
        ],
    }[where]
    assert main(["demo", *options]) == 2
    line = _one_error_line(capsys)
    assert "a_file" in line and ("--out" in line or "--checkpoint-dir" in line), line
    assert a_file.read_text() == "keep me" and not (tmp_path / "out").exists()


def test_a_batch_larger_than_the_training_set_stops_the_demo_before_training(
    tmp_path, capsys, monkeypatch
):
    def refuse(*args, **kwargs):
        raise AssertionError("trained")

    monkeypatch.setattr(benchmark, "run_arm", refuse)
    assert main(["demo", "--quick", "--batch-size", "1000", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert "--batch-size 1000" in line and "500 training images" in line, line


@pytest.mark.parametrize(
    "module, package", [("matplotlib.figure", "matplotlib"), ("sklearn.datasets", "scikit-learn")]
)
def test_a_missing_extra_is_named_before_anything_runs(
    module, package, tmp_path, capsys, monkeypatch, nothing_runs
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["demo", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert package in line and "pip install 'pml-tcm[examples]'" in line, line


def test_the_optional_imports_name_the_extra(monkeypatch):
    from pml_tcm.demo.utility_figure import utility_comparison_figure

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"scikit-learn: pip install 'pml-tcm\[examples\]'"):
        data.digits_split()
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"matplotlib: pip install 'pml-tcm\[examples\]'"):
        utility_comparison_figure([])


def test_a_failed_write_leaves_no_half_written_file(tmp_path):
    target = tmp_path / "results.md"
    target.write_text("previous run")

    def fails_midway(path: Path) -> None:
        path.write_text("half of the")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _write_whole(target, fails_midway)
    assert target.read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
    _write_whole(target, lambda path: path.write_text("new run"))
    assert target.read_text() == "new run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]


def test_report_does_not_import_the_demo():
    code = (
        "import sys; from pml_tcm.cli import build_parser; "
        "build_parser().parse_args(['report', 'e.npy', 'l.npy']); "
        "print('\\n'.join(m for m in sys.modules if m.startswith('pml_tcm')))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    loaded = run.stdout.split()
    assert "pml_tcm.cli" in loaded
    assert "pml_tcm.demo.data" not in loaded and "pml_tcm.demo.experiment" not in loaded

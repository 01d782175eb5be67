"""The demo's settings: the validated TCM defaults, and every bad setting refused before
anything is loaded, trained or written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pytorch_metric_learning import losses

from pml_tcm import with_tcm
from pml_tcm.cli import main
from pml_tcm.demo import benchmark, data
from pml_tcm.demo.benchmark import benchmark_configs
from pml_tcm.demo.experiment import ArmConfig, build_loss
from pml_tcm.demo.settings import (
    LOSS_NAMES,
    SWEEP_CHOICES,
    default_tcm,
    describe_tcm,
    resolve_tcm,
    tcm_paragraph,
)
from pml_tcm.output_files import write_whole

ROOT = Path(__file__).resolve().parents[1]
SWEEP_PAGE = ROOT / "docs" / "benchmarks" / "tcm_sweep.md"
TITLES = {"MultiSimilarity": "multisimilarity", "ArcFace": "arcface"}
DATASET_SECTIONS = {"Fashion-MNIST": "fashion-mnist", "Digits": "digits"}


def _recorded_choices() -> dict[tuple[str, str], tuple[float, float, float]]:
    """(dataset, loss) -> (weight, m+, m-) from the sweep page's 'chosen weight' tables."""
    choices = {}
    sections = re.split(r"^### ", SWEEP_PAGE.read_text(), flags=re.M)[1:]
    for section in sections:
        dataset = DATASET_SECTIONS.get(section.splitlines()[0].strip())
        if dataset is None:
            continue
        table = section[section.index("| Loss | chosen weight |") :]
        for line in table.splitlines()[2:]:
            if not line.startswith("|"):
                break
            loss, chosen = [cell.strip() for cell in line.strip("|").split("|")][:2]
            if loss not in TITLES:
                continue
            margins = re.search(r"m±=\(([-\d.]+), ([-\d.]+)\)", chosen)
            pos, neg = (float(margins[1]), float(margins[2])) if margins else (0.9, 0.5)
            choices[dataset, TITLES[loss]] = (float(chosen.split()[0].rstrip(",")), pos, neg)
    return choices


def test_the_demo_defaults_are_the_choices_recorded_by_the_validated_sweep():
    recorded = _recorded_choices()
    assert recorded == {
        key: (c.weight, c.pos_margin, c.neg_margin) for key, c in SWEEP_CHOICES.items()
    }
    for (dataset, loss), (weight, pos, neg) in recorded.items():
        setting = default_tcm(dataset, loss)
        if weight == 0:  # validation preferred no TCM: the TCM arm keeps the paper's
            assert (setting.weight, setting.pos_margin, setting.neg_margin) == (1.0, 0.9, 0.5)
            assert setting.validation_chose_no_tcm
        else:
            assert (setting.weight, setting.pos_margin, setting.neg_margin) == (weight, pos, neg)
            assert not setting.validation_chose_no_tcm


def test_with_tcm_keeps_the_papers_defaults():
    loss = with_tcm(losses.MultiSimilarityLoss())
    tcm = loss.embedding_regularizer
    assert (tcm.pos_margin, tcm.neg_margin, tcm.pos_weight, tcm.neg_weight) == (0.9, 0.5, 1, 1)
    assert loss.embedding_reg_weight == 1


def test_each_arm_trains_with_its_loss_setting():
    tcm = resolve_tcm("digits", LOSS_NAMES)
    configs = benchmark_configs(ArmConfig(), LOSS_NAMES, [0, 1], circle=True, tcm=tcm)
    for config in configs:
        expected = 3.0 if config.loss == "multisimilarity" else 1.0
        assert config.tcm_weight == expected, config
        loss = build_loss(config, num_classes=5)
        if config.tcm:
            assert loss.embedding_reg_weight == expected
            assert (
                loss.embedding_regularizer.pos_margin,
                loss.embedding_regularizer.neg_margin,
            ) == (
                0.9,
                0.5,
            )
        else:
            assert loss.embedding_regularizer is None


def test_a_value_given_on_the_command_line_replaces_only_that_default():
    weight = resolve_tcm("digits", LOSS_NAMES, weight=0.5)
    assert [(s.weight, s.pos_margin, s.neg_margin) for s in weight.values()] == [
        (0.5, 0.9, 0.5)
    ] * 2
    margin = resolve_tcm("digits", LOSS_NAMES, pos_margin=0.8)
    assert [(s.weight, s.pos_margin) for s in margin.values()] == [(3.0, 0.8), (1.0, 0.8)]
    assert "as given (--pos-margin)" in tcm_paragraph("digits", margin)
    everything = resolve_tcm("digits", LOSS_NAMES, 2.0, 0.8, 0.3)
    assert describe_tcm(everything) == "m+ 0.8, m- 0.3, weight 2"


def test_the_header_and_results_say_where_the_defaults_come_from():
    digits = describe_tcm(resolve_tcm("digits", LOSS_NAMES))
    assert digits == (
        "m+ 0.9, m- 0.5, weight 3 for MultiSimilarity, 1 for ArcFace: chosen on validation "
        "classes (docs/benchmarks/tcm_sweep.md)"
    )
    fashion = resolve_tcm("fashion-mnist", LOSS_NAMES)
    assert "for ArcFace validation preferred no TCM: its TCM arm keeps the paper's weight 1" in (
        describe_tcm(fashion)
    )
    paragraph = tcm_paragraph("fashion-mnist", fashion)
    assert "- ArcFace: weight 1, m+ 0.9, m- 0.5: the paper's default; on validation" in paragraph
    assert "docs/benchmarks/tcm_sweep.md" in paragraph


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
        write_whole(target, fails_midway)
    assert target.read_text() == "previous run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
    write_whole(target, lambda path: path.write_text("new run"))
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

"""The pml-tcm command line: demo code path, report values, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from _opis_reference import naive_opis

from pml_tcm.cli import main
from pml_tcm.embedding_report import compute_report


@pytest.fixture(scope="module")
def saved_embeddings(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emb")
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(6), 30)
    centres = rng.randn(6, 8)
    embeddings = (centres[labels] + 0.9 * rng.randn(labels.size, 8)).astype(np.float32)
    np.save(folder / "emb.npy", embeddings)
    np.save(folder / "labels.npy", labels)
    return folder, embeddings, labels


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    return lines[0]


def _brute_force_r_at_1(embeddings, labels, reference=None, reference_labels=None):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    if reference is None:
        sims = unit @ unit.T
        np.fill_diagonal(sims, -np.inf)
        reference_labels = labels
    else:
        ref = reference / np.linalg.norm(reference, axis=1, keepdims=True)
        sims = unit @ ref.T
    return float(np.mean(reference_labels[sims.argmax(axis=1)] == labels))


def _brute_force_far_threshold(embeddings, labels, target_far):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = unit @ unit.T
    negatives = np.sort(sims[labels[:, None] != labels[None, :]])[::-1]
    k = max(1, int(np.ceil(target_far * negatives.size - 1e-9)))
    return negatives[k - 1]


def test_report_values_match_brute_force(saved_embeddings, tmp_path, capsys):
    folder, embeddings, labels = saved_embeddings
    code = main(
        ["report", str(folder / "emb.npy"), str(folder / "labels.npy"), "--out", str(tmp_path)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    expected = _brute_force_r_at_1(embeddings, labels)
    assert f"R@1       {expected:.4f}" in printed
    assert "worst classes" in printed and "threshold" in printed
    assert (tmp_path / "utility_curves.png").stat().st_size > 0
    assert (tmp_path / "report.md").read_text().startswith("# pml-tcm report")

    report = compute_report(embeddings, labels, target_far=0.01)
    assert report.metrics["precision_at_1"] == pytest.approx(expected)
    assert report.calibration.threshold == pytest.approx(
        _brute_force_far_threshold(embeddings, labels, 0.01), abs=1e-5
    )
    assert report.metrics["opis"] >= 0.0 and report.metrics["eps_opis"] >= 0.0
    worst = report.worst_classes(3)
    utilities = [row[1] for row in worst]
    assert utilities == sorted(utilities) and len(worst) == 3


def _table(markdown: str, heading: str) -> list[list[str]]:
    """The rows (header and separator left out) of the first table under ``heading``."""
    section = markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_report_files_hold_the_printed_numbers_inputs_settings_and_versions(
    saved_embeddings, tmp_path, capsys
):
    import hashlib
    import json
    from datetime import UTC, datetime
    from importlib import metadata

    folder, embeddings, labels = saved_embeddings
    emb, lab = folder / "emb.npy", folder / "labels.npy"
    args = ["report", str(emb), str(lab), "--out", str(tmp_path), "--target-far", "0.01"]
    assert main(args + ["--worst", "3", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    markdown = (tmp_path / "report.md").read_text()
    document = json.loads(
        (tmp_path / "report.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"report.json holds {name}"),
    )
    for heading in ("Metrics", "Calibrated threshold", "Worst classes", "Inputs", "Settings"):
        assert f"\n## {heading}\n" in markdown, heading
    # the same numbers as the terminal, and R@1 / the threshold as brute force gives them
    metrics = {row[0]: row[1] for row in _table(markdown, "Metrics")}
    expected_r_at_1 = _brute_force_r_at_1(embeddings, labels)
    assert metrics["R@1"] == f"{expected_r_at_1:.4f}" and f"R@1       {metrics['R@1']}" in printed
    assert f"OPIS      {metrics['OPIS']}" in printed
    assert f"eps-OPIS  {metrics['ε-OPIS']}" in printed
    assert f"MAP@R     {metrics['MAP@R']}" in printed
    assert document["metrics"]["precision_at_1"] == pytest.approx(expected_r_at_1)
    assert f"{document['metrics']['opis']:.4g}" == metrics["OPIS"]
    threshold = _brute_force_far_threshold(embeddings, labels, 0.01)
    assert document["calibration"]["threshold"] == pytest.approx(threshold, abs=1e-5)
    threshold_line = f"threshold {document['calibration']['threshold']:.6g} for target FAR 0.01"
    assert threshold_line in printed and f"- {threshold_line}" in markdown
    worst = _table(markdown, "Worst classes")
    assert len(worst) == 3 and all(f"| {' | '.join(row)} |" in printed for row in worst)
    assert [str(row["label"]) for row in document["worst_classes"]] == [row[0] for row in worst]
    # inputs: shapes and checksums of the files as given
    inputs = {row[0]: row for row in _table(markdown, "Inputs")}
    for role, path, shape in (("embeddings", emb, "180 × 8"), ("labels", lab, "180")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert inputs[role][1] == f"`{path}`" and inputs[role][2] == shape
        assert inputs[role][4] == f"`{digest}`"
        assert {"role": role, "sha256": digest}.items() <= next(
            item for item in document["inputs"] if item["role"] == role
        ).items()
    settings = {row[0]: row[1] for row in _table(markdown, "Settings")}
    assert settings["target_far"] == "0.01 (1%)" and settings["worst"] == "3"
    assert document["settings"]["far_range"] == [1e-3, 1e-2]
    # versions and time
    for name in ("pytorch-metric-learning", "torch"):
        assert document["versions"][name] == metadata.version(name)
        assert f"{name} {metadata.version(name)}" in markdown
    created = datetime.strptime(document["created"], "%Y-%m-%dT%H:%M:%SZ")
    age = datetime.now(UTC).replace(tzinfo=None) - created
    assert 0 <= age.total_seconds() < 600 and document["created"] in markdown


def test_report_with_reference_set(saved_embeddings, tmp_path, capsys):
    folder, embeddings, labels = saved_embeddings
    query, reference = embeddings[::2], embeddings[1::2]
    np.save(tmp_path / "q.npy", query)
    np.save(tmp_path / "ql.npy", labels[::2])
    np.save(tmp_path / "r.npy", reference)
    np.save(tmp_path / "rl.npy", labels[1::2])
    args = ["report", str(tmp_path / "q.npy"), str(tmp_path / "ql.npy")]
    args += ["--reference", str(tmp_path / "r.npy"), "--reference-labels", str(tmp_path / "rl.npy")]
    assert main(args + ["--out", str(tmp_path / "out"), "--target-far", "0.01"]) == 0
    expected = _brute_force_r_at_1(query, labels[::2], reference, labels[1::2])
    assert f"R@1       {expected:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "to_labels",
    [
        lambda y: y.astype(np.int64) + 2**62,  # one float32 value for all six classes
        lambda y: np.uint64(2**63) + y.astype(np.uint64),
        lambda y: y * 0.5 - 0.25,  # non-integral floats
    ],
)
def test_report_with_labels_of_any_size(saved_embeddings, tmp_path, capsys, to_labels):
    folder, embeddings, small = saved_embeddings
    labels = to_labels(small)
    np.save(tmp_path / "labels.npy", labels)
    args = ["report", str(folder / "emb.npy"), str(tmp_path / "labels.npy")]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert f"R@1       {_brute_force_r_at_1(embeddings, labels):.4f}" in printed
    report = compute_report(embeddings, np.load(tmp_path / "labels.npy"), target_far=0.01)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    expected = naive_opis((unit @ unit.T).astype(np.float64), labels, labels, 0)
    assert report.metrics["opis"] == pytest.approx(expected["opis"], rel=1e-4)
    assert report.calibration.threshold == pytest.approx(
        _brute_force_far_threshold(embeddings, labels, 0.01), abs=1e-5
    )
    assert {row[0] for row in report.worst_classes(6)} == set(labels.tolist())


def _bad_inputs(tmp_path, embeddings, labels):
    """(name, files written, extra args, phrase expected in the error)."""
    nan = embeddings.copy()
    nan[3, 1] = np.nan
    return [
        ("missing", {}, [], "does not exist"),
        ("not_npy", {"emb.npy": b"not a numpy file"}, [], "cannot read"),
        ("wrong_shape", {"emb.npy": embeddings[:, 0]}, [], "(N, D)"),
        ("nan", {"emb.npy": nan}, [], "NaN"),
        ("length", {"labels.npy": labels[:-1]}, [], "labels"),
        ("nan_labels", {"labels.npy": np.where(labels == 2, np.nan, labels)}, [], "NaN"),
        ("text_array", {"emb.npy": np.array([["a", "b"]])}, [], "numbers"),
        ("reference_alone", {}, ["--reference", "REF"], "together"),
        ("bad_far", {}, ["--target-far", "2"], "--target-far"),
        (
            "corrupt_header",
            {"emb.npy": _npy_header(b"{'descr': '<f4', 'fortran_order'")},
            [],
            "cannot read",
        ),
        ("huge_header", {"emb.npy": _npy_header(_header_dict((10**12, 8)))}, [], "cannot read"),
        ("no_shared_class", {"ref_labels": labels + 100}, ["--reference", "REF"], "no class"),
        ("singletons", {"labels.npy": np.arange(len(labels))}, [], "single sample"),
        ("out_is_file", {"taken": b"x"}, ["--out", "OUT_FILE"], "is a file"),
        ("out_under_file", {"taken": b"x"}, ["--out", "OUT_UNDER"], "lies under the file"),
    ]


def _header_dict(shape) -> bytes:
    return repr({"descr": "<f4", "fortran_order": False, "shape": shape}).encode()


def _npy_header(header: bytes) -> bytes:
    """A .npy file (format 1.0) with the given header and no data."""
    header = header + b" " * (-(len(header) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


@pytest.mark.parametrize("case", range(15))
def test_report_bad_input_is_one_line_and_exit_2(saved_embeddings, tmp_path, capsys, case):
    folder, embeddings, labels = saved_embeddings
    name, files, extra, phrase = _bad_inputs(tmp_path, embeddings, labels)[case]
    emb, lab = folder / "emb.npy", folder / "labels.npy"
    ref_labels = lab
    if name == "missing":
        emb = tmp_path / "absent.npy"
    for filename, content in files.items():
        path = tmp_path / filename
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path = path.with_suffix(".npy")
            np.save(path, content)
        if filename == "emb.npy":
            emb = path
        elif filename == "labels.npy":
            lab = path
        elif filename == "ref_labels":
            ref_labels = path
    replace = {"OUT_FILE": tmp_path / "taken", "OUT_UNDER": tmp_path / "taken" / "out"}
    extra = [str(replace.get(a, a)) for a in extra]
    if "REF" in extra:
        extra[extra.index("REF")] = str(folder / "emb.npy")
        if "ref_labels" in files:
            extra += ["--reference-labels", str(ref_labels)]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "out")]
    code = main(["report", str(emb), str(lab), *out, *extra])
    assert code == 2, name
    line = _one_error_line(capsys)
    assert line.startswith("pml-tcm report: error:") and phrase in line, line
    if name.startswith("out_"):
        assert not (tmp_path / "taken").is_dir()


def test_report_reads_a_fortran_order_npy(saved_embeddings, tmp_path, capsys):
    folder, embeddings, labels = saved_embeddings
    np.save(tmp_path / "emb_f.npy", np.asfortranarray(embeddings))
    assert np.load(tmp_path / "emb_f.npy").flags.f_contiguous
    lab = str(folder / "labels.npy")
    assert main(["report", str(folder / "emb.npy"), lab, "--out", str(tmp_path / "c")]) == 0
    plain = capsys.readouterr().out.split("wrote")[0]
    assert main(["report", str(tmp_path / "emb_f.npy"), lab, "--out", str(tmp_path / "f")]) == 0
    assert capsys.readouterr().out.split("wrote")[0] == plain


def test_missing_dataset_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["demo", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)])
    assert code == 2
    line = _one_error_line(capsys)
    assert "apt-get install dataset-fashion-mnist" in line and "--data-dir" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_demo_device_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    code = main(["demo", "--quick", "--device", "cuda"])
    assert code == 2
    assert "--device cuda" in _one_error_line(capsys)


@pytest.mark.parametrize(
    "device",
    [
        "auto",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_demo_quick_on_a_chosen_device(tmp_path, capsys, device):
    code = main(
        [
            "demo",
            "--quick",
            "--losses",
            "arcface",
            "--no-circle",
            "--device",
            device,
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "| ArcFace | change |" in capsys.readouterr().out


def test_demo_quick_on_digits_writes_table_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--embedding-size", "16", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in printed.splitlines()]
    changes = [row[0] for row in rows if len(row) > 1 and row[1] == "change"]
    assert changes == ["MultiSimilarity", "ArcFace"]
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Open-world results: digits")
    assert "## Reading" in markdown and "1 epoch of" in markdown and "1 epochs" not in markdown
    table = markdown.split("## Reading")[0]  # the results table (not the per-seed one)
    table_lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(table_lines) == 10 and "OPIS" in table_lines[0]  # 4 rows per loss, 5 seeds
    for name in ("utility_curves_multisimilarity", "utility_curves_arcface", "embedding_circle"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"{name}.png" in printed and f"{name}.png" in markdown
    # the TCM settings chosen on validation classes, said where they come from
    header = " ".join(printed.split())
    assert "weight 3 for MultiSimilarity, 1 for ArcFace: chosen on validation classes" in header
    assert "docs/benchmarks/tcm_sweep.md" in header
    assert "## TCM settings" in markdown and "- MultiSimilarity: weight 3, m+ 0.9" in markdown


def test_demo_tcm_options_replace_the_validated_defaults(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--quick", "--no-circle", "--losses", "multisimilarity", "--out", str(out)]
    assert main(["demo", *args, "--tcm-weight", "0.5"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "TCM m+ 0.9, m- 0.5, weight 0.5: m+, m- chosen on validation classes" in printed
    markdown = (out / "results.md").read_text()
    assert "- MultiSimilarity: weight 0.5 as given (--tcm-weight); m+ 0.9, m- 0.5" in markdown


def test_python_dash_m_entry_point():
    completed = subprocess.run(
        [sys.executable, "-m", "pml_tcm", "--help"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0 and "demo" in completed.stdout and "report" in completed.stdout


def test_bare_command_lists_the_commands_and_exits_0():
    completed = subprocess.run(
        [sys.executable, "-m", "pml_tcm"], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert "demo" in completed.stdout and "report" in completed.stdout
    assert "examples:" in completed.stdout and completed.stderr == ""


def test_version_names_pml_tcm_pml_and_torch(capsys):
    from importlib import metadata

    import pml_tcm

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"pml-tcm {pml_tcm.__version__} ")
    assert f"pytorch-metric-learning {metadata.version('pytorch-metric-learning')}" in printed
    assert f"torch {metadata.version('torch')}" in printed


def _option_blocks(help_text: str) -> dict[str, str]:
    """Each option's help as argparse prints it, keyed by its first option string."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.split("options:", 1)[1].split("examples:", 1)[0].splitlines():
        stripped = line.strip()
        if stripped.startswith("-") and line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            blocks[current] = stripped
        elif current is not None and stripped:
            blocks[current] += " " + stripped
    return blocks


@pytest.mark.parametrize("command", ["demo", "report"])
def test_every_option_has_help_with_its_default_and_examples(command):
    from pml_tcm.cli import build_parser

    parser = build_parser()
    subparser = next(a for a in parser._actions if a.dest == "command").choices[command]
    help_text = subparser.format_help()
    blocks = _option_blocks(help_text)
    options = [a.option_strings[0] for a in subparser._actions if a.option_strings]
    assert set(blocks) == set(options)
    for option, block in blocks.items():
        if option == "-h":
            continue
        assert "default" in block, f"{command} {option}: no default in {block!r}"
        assert "None" not in block and "[" not in block.split("default", 1)[1], block
    assert f"examples:\n  pml-tcm {command}" in help_text


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--epochs", "2.5"],
        ["demo", "--tcm-weight", "abc"],
        ["report", "x.npy"],
        ["report", "x.npy", "y.npy", "--far-range", "0.1"],
        ["bogus"],
    ],
)
def test_argument_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pml-tcm") and "error:" in err


@pytest.mark.parametrize(
    "extra, phrase",
    [
        (["--target-far", "2"], "--target-far must be a fraction in (0, 1]"),
        (["--target-far", "0"], "--target-far must be a fraction in (0, 1]"),
        (["--target-far", "nan"], "--target-far takes finite numbers"),
        (["--far-range", "0.1", "0.01"], "LO must not exceed HI"),
        (["--far-range", "0", "0.01"], "fractions in (0, 1]"),
        (["--far-range", "0.001", "5"], "fractions in (0, 1]"),
        (["--worst", "0"], "--worst must be a positive integer"),
    ],
)
def test_report_settings_are_refused_before_any_work(
    saved_embeddings, tmp_path, capsys, monkeypatch, extra, phrase
):
    import pml_tcm.report.command as command

    monkeypatch.setattr(command, "load_embeddings", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(command, "compute_report", lambda *a, **k: pytest.fail("computed"))
    folder, _, _ = saved_embeddings
    args = ["report", str(folder / "emb.npy"), str(folder / "labels.npy")]
    assert main(args + ["--out", str(tmp_path / "out"), *extra]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("pml-tcm report: error:") and phrase in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "path, phrase",
    [("/dev/zero", "is a device, not a regular .npy file"), ("FOLDER", "is a folder")],
)
def test_report_input_that_is_not_a_regular_file(saved_embeddings, tmp_path, capsys, path, phrase):
    folder, _, _ = saved_embeddings
    path = str(tmp_path) if path == "FOLDER" else path
    assert main(["report", path, str(folder / "labels.npy"), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert f"embeddings file {path} {phrase}" in line and "does not exist" not in line, line


def test_an_internal_error_says_so_exits_1_and_shows_its_traceback_on_request(
    saved_embeddings, tmp_path, capsys, monkeypatch
):
    import pml_tcm.report.command as command

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(command, "compute_report", broken)
    folder, _, _ = saved_embeddings
    args = ["report", str(folder / "emb.npy"), str(folder / "labels.npy")]
    args += ["--out", str(tmp_path / "out")]
    monkeypatch.delenv("PML_TCM_DEBUG", raising=False)
    assert main(args) == 1
    line = _one_error_line(capsys)
    assert line.startswith("pml-tcm report: internal error (a bug in pml-tcm"), line
    assert "ValueError: operands could not be broadcast together" in line
    assert "PML_TCM_DEBUG=1" in line
    monkeypatch.setenv("PML_TCM_DEBUG", "1")
    with pytest.raises(ValueError, match="broadcast"):
        main(args)

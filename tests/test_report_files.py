"""The report folder holds one run's files, whatever happens: concurrent runs, Ctrl-C,
SIGTERM, a failed write; and every --out problem is refused before any work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pml_tcm.cli import main
from pml_tcm.output_files import write_file_set, write_whole

ROOT = Path(__file__).resolve().parents[1]
SET = ("report.md", "utility_curves.png", "report.json")


def _writers(tag: str, pause: threading.Event | None = None, fail_at: str | None = None):
    def writer(name):
        def write(path: Path) -> None:
            if name == fail_at:
                path.write_text("half")
                raise KeyboardInterrupt
            path.write_text(f"{tag}:{name}")
            if pause is not None and name == SET[0]:
                pause.wait(30)

        return write

    return {name: writer(name) for name in SET}


def _contents(folder: Path, staging_allowed: bool = False) -> dict[str, str]:
    """Every entry of ``folder`` and its text (a run still writing has its own hidden
    staging folder, which ``staging_allowed`` skips)."""
    return {
        path.name: path.read_text()
        for path in sorted(folder.iterdir())
        if not (staging_allowed and path.name.startswith(".partial-") and path.is_dir())
    }


def test_two_runs_at_once_leave_the_files_of_one_run(tmp_path):
    # run A writes its first file, then waits while run B writes and publishes its whole
    # set; A then finishes: the folder must hold A's set alone, nothing of B beside it
    go_on = threading.Event()
    first = threading.Thread(target=write_file_set, args=(tmp_path, _writers("A", go_on)))
    first.start()
    write_file_set(tmp_path, _writers("B"))
    assert _contents(tmp_path, staging_allowed=True) == {name: f"B:{name}" for name in SET}
    go_on.set()
    first.join(30)
    assert _contents(tmp_path) == {name: f"A:{name}" for name in SET}


def test_an_interrupt_while_writing_keeps_the_previous_set_and_no_partial_files(tmp_path):
    write_file_set(tmp_path, _writers("old"))
    with pytest.raises(KeyboardInterrupt):
        write_file_set(tmp_path, _writers("new", fail_at="utility_curves.png"))
    assert _contents(tmp_path) == {name: f"old:{name}" for name in SET}


def test_files_left_from_an_earlier_run_can_be_removed_with_the_set(tmp_path):
    write_file_set(tmp_path, _writers("old"))
    writers = _writers("new")
    del writers["utility_curves.png"]
    write_file_set(tmp_path, writers, remove=["utility_curves.png"])
    assert _contents(tmp_path) == {"report.json": "new:report.json", "report.md": "new:report.md"}


def test_write_whole_uses_a_temporary_name_of_its_own(tmp_path):
    target = tmp_path / "results.md"
    seen = []
    write_whole(target, lambda path: seen.append(path.name) or path.write_text("a"))
    write_whole(target, lambda path: seen.append(path.name) or path.write_text("b"))
    assert target.read_text() == "b" and seen[0] != seen[1]
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    rng = np.random.RandomState(0)
    labels = np.repeat(np.arange(5), 24)
    embeddings = (rng.randn(5, 8)[labels] + 0.8 * rng.randn(labels.size, 8)).astype(np.float32)
    np.save(folder / "emb.npy", embeddings)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "emb2.npy", embeddings[::-1].copy())
    np.save(folder / "labels2.npy", labels[::-1].copy())
    return folder


def _run_ids(out: Path) -> set[str]:
    """The run id each file of the set records (the JSON is the manifest: it also lists
    the other files' SHA-256, which must match)."""
    from PIL import Image

    document = json.loads((out / "report.json").read_text())
    for name, digest in document["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name
    markdown = (out / "report.md").read_text()
    run_in_markdown = markdown.rsplit("run `", 1)[1].split("`", 1)[0]
    png_title = Image.open(out / "utility_curves.png").text["Title"]
    return {document["run"], run_in_markdown, png_title.rsplit("run ", 1)[1]}


def test_two_report_processes_into_one_folder_leave_one_consistent_set(saved, tmp_path):
    out = tmp_path / "out"
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "pml_tcm", "report", str(saved / emb), str(saved / lab)]
            + ["--out", str(out), "--device", "cpu"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        for emb, lab in (("emb.npy", "labels.npy"), ("emb2.npy", "labels2.npy"))
    ]
    for run in runs:
        assert run.wait(300) == 0, run.stderr.read()
    assert sorted(p.name for p in out.iterdir()) == sorted(SET)
    assert len(_run_ids(out)) == 1


def test_sigterm_while_writing_leaves_the_previous_set_and_no_partial_files(saved, tmp_path):
    out = tmp_path / "out"
    args = ["report", str(saved / "emb.npy"), str(saved / "labels.npy"), "--out", str(out)]
    assert main(args + ["--device", "cpu"]) == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    script = (
        "import os, signal, sys, time\n"
        "from pml_tcm.report import render\n"
        "drawing = render.figure\n"
        "class Killed:\n"
        "    def __init__(self, figure): self.figure = figure\n"
        "    def savefig(self, path, **kwargs):\n"
        "        self.figure.savefig(path, **kwargs)\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
        "render.figure = lambda *a, **k: Killed(drawing(*a, **k))\n"
        "from pml_tcm.cli import main\n"
        f"sys.exit(main({args + ['--device', 'cpu']!r}))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 143, run.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize("case", ["dangling", "under_dangling", "file", "device"])
def test_out_problems_are_one_line_and_exit_2_before_any_work(
    saved, tmp_path, capsys, monkeypatch, case
):
    import pml_tcm.report.command as command

    monkeypatch.setattr(command, "load_embeddings", lambda *a: pytest.fail("loaded"))
    (tmp_path / "taken").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    out, phrase = {
        "dangling": (tmp_path / "link", "symlink to"),
        "under_dangling": (tmp_path / "link" / "sub", "symlink to"),
        "file": (tmp_path / "taken", "is a file"),
        "device": (Path("/dev/null"), "is a device"),
    }[case]
    args = ["report", str(saved / "emb.npy"), str(saved / "labels.npy"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and phrase in err[0] and "--out" in err[0], err
    assert not (tmp_path / "nowhere").exists()

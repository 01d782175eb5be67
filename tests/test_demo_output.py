"""What a newcomer sees when running ``pml-tcm demo``: a short, readable terminal output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 40


def _environment() -> dict[str, str]:
    # this checkout's pml_tcm, also when it is not the installed one
    paths = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def _run_demo(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pml_tcm", "demo", *args]
    return subprocess.run(command, env=_environment(), check=False, **kwargs)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def test_default_demo_output_is_short_and_says_what_happened(tmp_path):
    out = tmp_path / "demo_out"
    completed = _run_demo(
        ["--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    text = completed.stdout
    assert completed.returncode == 0, text
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{text}"
    # pml's per-iteration bars and torch's warning about them are gone
    assert "it/s" not in text and "Warning" not in text and "\r" not in text
    # header: what is trained, on what, where the outputs go
    assert lines[0].startswith("pml-tcm demo:")
    assert "digits" in text and "unseen 5-9" in text and f"{out}/" in text
    # the TCM settings and where they come from
    flat = " ".join(text.split())
    assert "weight 3 for MultiSimilarity" in flat and "docs/benchmarks/tcm_sweep.md" in flat
    # one plain line per arm (not a terminal): 4 arms + 2 for the circle figure
    arm_lines = [line for line in lines if re.match(r"\[\d/6\] ", line)]
    assert [line[:5] for line in arm_lines] == [f"[{i}/6]" for i in range(1, 7)]
    # the table, the reading and the files
    rows = {(c[0], c[1]): c for c in (_cells(line) for line in lines if line.startswith("| "))}
    for name in ("results.md", "utility_curves_multisimilarity.png", "embedding_circle.png"):
        assert (out / name).is_file() and name in text
    for loss in ("MultiSimilarity", "ArcFace"):
        baseline, with_tcm = float(rows[(loss, "no")][5]), float(rows[(loss, "yes")][5])
        sentence = f"With {loss}, TCM made OPIS worse here"
        assert (sentence in " ".join(text.split())) == (with_tcm > baseline), loss
        assert rows[(loss, "no")][2] == "1" and "±" not in " ".join(rows[(loss, "no")])
    assert "n = 1" in text
    assert lines[-1].startswith("Done in ")


def test_demo_on_a_terminal_redraws_one_line_per_arm(tmp_path):
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "pml_tcm", "demo", "--quick", "--no-circle", "--out", str(tmp_path)],
        stdout=follower,
        stderr=follower,
        env=_environment(),
    )
    os.close(follower)  # read while it runs: a full pty would block the demo
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the demo exited and closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    returncode = process.wait(timeout=600)
    raw = b"".join(chunks).decode()
    assert returncode == 0, raw
    assert "\r" in raw  # progress redrawn in place
    screen = [line.rsplit("\r", 1)[-1] for line in raw.replace("\r\n", "\n").split("\n")]
    arm_lines = [line for line in screen if re.match(r"\[\d/4\] ", line)]
    assert len(arm_lines) == 4 and all("R@1" in line for line in arm_lines)

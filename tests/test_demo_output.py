"""What a newcomer sees when running ``pml-tcm demo``: a short, readable terminal output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 44  # about 40: five seeds add an interval row per loss


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
    flat = " ".join(text.split())
    assert "without/with TCM on seeds 0-4" in flat  # five seeds by default
    # the TCM settings and where they come from
    assert "weight 3 for MultiSimilarity" in flat and "docs/benchmarks/tcm_sweep.md" in flat
    # one plain line per arm (not a terminal), its seeds together: 4 arms of five seeds,
    # then 2 single runs for the circle figure
    arm_lines = [line for line in lines if re.match(r"\[\d/6\] ", line)]
    assert [line[:5] for line in arm_lines] == [f"[{i}/6]" for i in range(1, 7)]
    assert all("seeds 0-4" in line for line in arm_lines[:4])
    # the table, the reading and the files
    rows = {(c[0], c[1]): c for c in (_cells(line) for line in lines if line.startswith("| "))}
    for name in ("results.md", "utility_curves_multisimilarity.png", "embedding_circle.png"):
        assert (out / name).is_file() and name in text
    assert "OPIS measures how unevenly" in flat and "consistency, not accuracy" in flat
    told = _distinguishable(flat)
    for loss in ("MultiSimilarity", "ArcFace"):
        assert rows[(loss, "no")][2] == "5" and "±" in rows[(loss, "no")][5]
        baseline = float(rows[(loss, "no")][5].split()[0])
        with_tcm = float(rows[(loss, "yes")][5].split()[0])
        sentence = f"With {loss}, TCM made OPIS worse here"
        if abs(with_tcm - baseline) > 0.01:  # the means as shown, rounded to 0.01
            assert (sentence in flat) == (with_tcm > baseline), loss
        # the words agree with the interval: distinguishable exactly where it excludes 0
        for header, cell in zip(rows[("Loss", "TCM")][3:], rows[(loss, "95% CI")][3:]):
            low, high = (float(v) for v in cell.split(" to "))
            outside = low > 0 or high < 0
            assert (header.split()[0] in told.get(loss, [])) == outside, (loss, header, cell)
    assert "distinguishable from seed noise" in flat
    assert "2-D ArcFace (circle figure)" in flat
    markdown = (out / "results.md").read_text()
    assert "Exact numbers depend on the CPU" in markdown and "bit-identical" in markdown
    per_seed = markdown.split("## Per seed")[1].split("##")[0]
    assert len([line for line in per_seed.splitlines() if line.startswith("| ")]) == 1 + 22
    assert lines[-1].startswith("Done in ")


def _distinguishable(reading: str) -> dict[str, list[str]]:
    """The metrics the reading calls distinguishable from seed noise, per loss."""
    if "No change is distinguishable" in reading:
        return {}
    if "Every change is distinguishable" in reading:
        every = ["R@1", "MAP@R", "OPIS", "ε-OPIS"]
        return {"MultiSimilarity": every, "ArcFace": every}
    listed = reading.split("seeds, excludes 0): ")[1].split(". Every")[0]
    return {part.split(" ", 1)[0]: part.split(" ", 1)[1].split(", ") for part in listed.split("; ")}


def test_one_seed_says_it_cannot_separate_effect_from_noise(tmp_path):
    completed = _run_demo(
        ["--quick", "--seeds", "0", "--no-circle", "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert completed.returncode == 0, completed.stdout
    flat = " ".join(completed.stdout.split())
    assert "A single seed per arm cannot separate TCM's effect from seed noise" in flat
    assert "n = 1" in flat and "95% CI" not in flat and "±" not in flat


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

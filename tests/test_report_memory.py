"""The report holds the embeddings file in memory once, plus its unit rows: no stacked
copies. The peak resident set is measured in a fresh subprocess (Linux): ``VmHWM``, reset
just before the measurement through ``/proc/self/clear_refs`` (``ru_maxrss`` would not do:
a child inherits the parent's high-water mark through fork and exec)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
import torch
from pml_tcm.report.compute import _unit_rows
from pml_tcm.report.inputs import load_embeddings

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def peak_mb():
    return status_mb("VmHWM")

_unit_rows(torch.ones(4, 4).numpy(), torch.device("cpu"))  # torch's kernels loaded first
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the high-water mark starts again from the current resident set
before = status_mb("VmRSS")
embeddings = load_embeddings(Path(sys.argv[1]), "embeddings")
loaded = peak_mb()
unit = _unit_rows(embeddings, torch.device("cpu"))
print(json.dumps({"load": loaded - before, "load_and_unit": peak_mb() - before}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fortran", [False, True])
def test_the_embeddings_are_in_memory_once_plus_their_unit_rows(tmp_path, fortran):
    rng = np.random.default_rng(0)
    embeddings = rng.standard_normal((3000, 8192), dtype=np.float32)  # 94 MiB
    np.save(tmp_path / "emb.npy", np.asfortranarray(embeddings) if fortran else embeddings)
    del embeddings
    size = os.path.getsize(tmp_path / "emb.npy") / 2**20
    run = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "emb.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    growth = json.loads(run.stdout.strip().splitlines()[-1])
    slack = 48  # MiB: allocator and small temporaries, independent of the file's size
    if not fortran:  # read straight into its array: the file's data once
        assert growth["load"] <= size + slack, (growth, size)
    assert growth["load_and_unit"] <= 2 * size + slack, (growth, size)


MEASURE = """
import json, sys
import numpy as np
import torch

def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

setup, work = sys.argv[1], sys.argv[2]
scope = {"np": np, "torch": torch}
exec(setup, scope)
exec(work.replace("WORK", "warm"), scope)  # modules and kernels loaded first
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status_mb("VmRSS")
exec(work.replace("WORK", "data"), scope)
print(json.dumps({"growth": status_mb("VmHWM") - before}))
"""


def _growth(setup: str, work: str) -> float:
    """Peak resident growth (MiB) of ``work`` in a fresh process, after ``setup`` (which
    defines ``data`` and ``warm``; ``work`` names one of them as ``WORK``) and one
    warm-up run of ``work`` on ``warm``."""
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, setup, work],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,  # (``-c`` puts the working directory first on the path)
        check=True,
    )
    return json.loads(run.stdout.strip().splitlines()[-1])["growth"]


WIDE_SET = """
gen = torch.Generator().manual_seed(0)
data = torch.nn.functional.normalize(torch.randn(1000, 32768, generator=gen), dim=1)  # 125 MiB
labels = torch.arange(1000) % 10
warm = data[:64].clone()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_value_check_of_a_set_needs_no_set_sized_temporaries():
    # torch.isfinite of the whole (N, D) set allocated about 1.75x the set
    growth = _growth(
        WIDE_SET,
        "from pml_tcm.functional.validation import check_embeddings_values\n"
        "check_embeddings_values(WORK)",
    )
    assert growth < 100, growth  # MiB, for a 125 MiB set (218 before)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_retrieval_of_wide_unit_rows_copies_no_chunk_of_them():
    # the chunk's query rows were gathered (a copy of the whole set when it fits one chunk)
    setup = WIDE_SET.replace("32768", "65536") + (  # 250 MiB
        "from pml_tcm.functional.prepare import prepare_sets\n"
        "data, warm = prepare_sets(data, labels), prepare_sets(warm, labels[:64])\n"
    )
    growth = _growth(
        setup,
        "from pml_tcm.functional.retrieval import retrieval_of_sets\n"
        "retrieval_of_sets(WORK, rows_are_unit=True)",
    )
    # MiB, for a 250 MiB set: a 4 MiB score buffer and the ranking threads' allocations
    # (which vary by tens of MiB from run to run); a copy of the rows alone is 250
    assert growth < 160, growth


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_rate_bootstrap_draws_in_bounded_blocks():
    # 1000 replicates x 20 000 queries: 4M draws at a time, about 320 MiB, before
    growth = _growth(
        "gen = torch.Generator().manual_seed(0)\n"
        "def counts(n):\n"
        "    c = [torch.randint(0, 50, (n,), generator=gen) for _ in range(4)]\n"
        "    return (c, torch.randint(0, 8, (n,), generator=gen))\n"
        "data, warm = counts(20000), counts(100)\n",
        "from pml_tcm.functional.bootstrap import rate_replicates\n"
        "rate_replicates(WORK[0], WORK[1], 8, replicates=1000, seed=0)",
    )
    assert growth < 180, growth  # MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_the_report_command_peaks_at_about_the_size_of_a_wide_embeddings_file(tmp_path):
    # N = 500 x D = 131072 float32 (250 MiB): 2.75x the file before (a copy of each
    # chunk's query rows for the ranking, set-sized temporaries in the value check);
    # measured after a first report on a small file (imports and first use, a fixed cost)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 20, 500)
    centres = rng.standard_normal((20, 131072), dtype=np.float32)
    embeddings = centres[labels] + 3 * rng.standard_normal((500, 131072), dtype=np.float32)
    np.save(tmp_path / "emb.npy", embeddings)
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "small.npy", embeddings[:200, :16])
    np.save(tmp_path / "small_labels.npy", labels[:200])
    del embeddings, centres
    size = os.path.getsize(tmp_path / "emb.npy") / 2**20
    work = (
        "import contextlib, io\n"
        "from pml_tcm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['report', *WORK]) == 0\n"
    )
    folder = str(tmp_path)
    setup = (
        f"data = ['{folder}/emb.npy', '{folder}/labels.npy', '--out', '{folder}/out']\n"
        f"warm = ['{folder}/small.npy', '{folder}/small_labels.npy', '--out', '{folder}/o']\n"
    )
    growth = _growth(setup, work)
    assert growth <= 1.6 * size, (growth, size)  # the file, and work buffers of 1/4 of it

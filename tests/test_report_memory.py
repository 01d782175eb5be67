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

"""Open-world benchmark on Fashion-MNIST: train on classes 0-4, evaluate on unseen 5-9.

Runs MultiSimilarityLoss and ArcFaceLoss, each without and with TCM, over three seeds,
and writes the R@1 / MAP@R / OPIS / eps-OPIS table and the figures to --out. Any
``pml-tcm demo`` option works here and overrides these defaults, e.g.::

    python examples/open_world.py --out docs/benchmarks/run --epochs 8
    python examples/open_world.py --dataset digits --seeds 0 1 2 3 4

Fashion-MNIST: ``apt-get install dataset-fashion-mnist`` or ``--data-dir DIR`` holding the
four IDX .gz files.
"""

from __future__ import annotations

import sys

from pml_tcm.cli import main

BENCHMARK_DEFAULTS = ["--dataset", "fashion-mnist", "--seeds", "0", "1", "2"]
BENCHMARK_DEFAULTS += ["--out", "open_world_out"]

if __name__ == "__main__":
    raise SystemExit(main(["demo", *BENCHMARK_DEFAULTS, *sys.argv[1:]]))

"""Time and peak memory of ``pml-tcm report``'s metrics on large sets with few classes.

Few classes are the hard case for MAP@R: ``R`` (the references sharing the query's label)
is about ``N / classes`` for every query. For each ``(N, D, classes)`` (float32, queries =
references, class centres plus Gaussian noise) these run, each in a fresh subprocess:

* ``report``: :func:`pml_tcm.report.compute.compute_report`, the whole report path
  (R@1, MAP@R, OPIS, ε-OPIS, calibration);
* ``cli``: ``pml-tcm report`` end to end (:func:`pml_tcm.report.report_embeddings`: the
  ``.npy`` file loaded, the numbers, the three files written), after a first report on a
  200 x 16 file whose growth is given apart ("first call": the modules it imports and what
  torch sets up on first use, a fixed cost whatever the file); here "growth" is also
  given as a multiple of the ``.npy`` file's size (``--cli`` adds it, or ``--cli-only``);
* ``knn``: :func:`pml_tcm.functional.retrieval.retrieval_metrics` alone (R@1 and MAP@R);
* ``pml`` (only with ``--pml``): pml's ``AccuracyCalculator`` with
  ``k="max_bin_count"`` for the same two metrics (faiss k-NN with ``k = max R`` for every
  query at once; about ``N · R · 12`` bytes, 12.5 GB at 20 000 × 64 with 2 classes).

Peak RSS is the child's whole peak resident set (``VmHWM``: interpreter, torch and the data
included; not ``ru_maxrss``, which a child inherits from its parent through fork and exec);
"growth" is the peak during the call minus the resident set just before it (the
high-water mark is reset there through ``/proc/self/clear_refs``). Linux.

Usage::

    python benchmarks/report_memory.py                        # 20k x 64 and 100k x 128, 2 classes
    python benchmarks/report_memory.py --sets 20000,64,2 --pml
    python benchmarks/report_memory.py --sets 4000,8192,20 --cli-only   # a wide .npy
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

DEFAULT_SETS = ("20000,64,2", "100000,128,2")
CLI_KINDS = ("cli",)


def make_data(n: int, dim: int, classes: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (n,), generator=gen)
    centres = torch.randn(classes, dim, generator=gen)
    embeddings = centres[labels] + 3.0 * torch.randn(n, dim, generator=gen)
    return embeddings, labels


def run_report(x, y) -> dict:
    from pml_tcm.report.compute import compute_report

    report = compute_report(x.numpy(), y.numpy())
    return dict(report.metrics)


def run_knn(x, y) -> dict:
    from pml_tcm.functional.retrieval import retrieval_metrics

    return retrieval_metrics(x, y)


def run_pml(x, y) -> dict:
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    return calculator.get_accuracy(F.normalize(x, dim=1), y)


def child_cli(n: int, dim: int, classes: int) -> None:
    import contextlib
    import io
    import os
    import tempfile

    from pml_tcm.report import report_embeddings

    folder = tempfile.mkdtemp(prefix="report_memory_")
    write_npy_in_blocks(
        os.path.join(folder, "emb.npy"), os.path.join(folder, "labels.npy"), n, dim, classes
    )
    write_npy_in_blocks(
        os.path.join(folder, "small.npy"), os.path.join(folder, "small_labels.npy"), 200, 16, 5
    )
    size_mb = os.path.getsize(os.path.join(folder, "emb.npy")) / 2**20

    def report(name: str, labels: str):
        with contextlib.redirect_stdout(io.StringIO()):
            return report_embeddings(
                os.path.join(folder, name),
                os.path.join(folder, labels),
                out=os.path.join(folder, "out"),
            )

    # a first report on a 200 x 16 file: the modules it imports (matplotlib, ...) and what
    # torch sets up on first use, a fixed cost that is not the file's
    before = rss_mb()
    report("small.npy", "small_labels.npy")
    first_call = peak_mb() - before
    before = rss_mb()
    start = time.perf_counter()
    result = report("emb.npy", "labels.npy")
    seconds = time.perf_counter() - start
    peak = peak_mb()
    info = {k: float(v) for k, v in result.metrics.items()}
    info.update(
        seconds=seconds, peak_mb=peak, growth_mb=peak - before, npy_mb=size_mb, first_mb=first_call
    )
    print(json.dumps(info))


def write_npy_in_blocks(path: str, labels_path: str, n: int, dim: int, classes: int) -> None:
    """The data of :func:`make_data`'s kind (class centres plus noise, float32), written
    a block of rows at a time through a plain file handle: writing it adds neither the
    whole array nor mapped pages to this process's peak."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    np.save(labels_path, labels)
    header = {"descr": "<f4", "fortran_order": False, "shape": (n, dim)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        for start in range(0, n, 1024):
            rows = labels[start : start + 1024]
            noise = rng.standard_normal((len(rows), dim)).astype(np.float32)
            handle.write((centres[rows] + 3.0 * noise).astype("<f4").tobytes())


def status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_mb() -> float:
    """The current resident set; the high-water mark restarts from it."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")


def peak_mb() -> float:
    return status_mb("VmHWM")


def child(kind: str, n: int, dim: int, classes: int) -> None:
    if kind == "cli":
        # the .npy files are written first and the arrays freed: the growth is the
        # command's own (the file loaded once, its unit rows, the work buffers)
        child_cli(n, dim, classes)
        return
    runs = {"report": run_report, "knn": run_knn, "pml": run_pml}
    x, y = make_data(n, dim, classes)
    before = rss_mb()
    start = time.perf_counter()
    info = runs[kind](x, y)
    seconds = time.perf_counter() - start
    peak = peak_mb()
    info = {k: float(v) for k, v in info.items()}
    info.update(seconds=seconds, peak_mb=peak, growth_mb=peak - before)
    print(json.dumps(info))


def measure(kind: str, n: int, dim: int, classes: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n), str(dim), str(classes)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        reason = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        return {"failed": reason}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="N,D,classes")
    parser.add_argument("--pml", action="store_true", help="also pml's AccuracyCalculator")
    parser.add_argument("--cli", action="store_true", help="also pml-tcm report end to end")
    parser.add_argument("--cli-only", action="store_true", help="only pml-tcm report")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(int, args.child[1:]))
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, CPU")
    print(
        "| N | D | classes | path | time (s) | peak RSS (MB) | growth (MB) | growth / .npy "
        "| first call (MB) | R@1 | MAP@R |"
    )
    print("|---" * 11 + "|")
    kinds = ("knn", "report") + (("pml",) if args.pml else ()) + (CLI_KINDS if args.cli else ())
    for spec in args.sets:
        n, dim, classes = map(int, spec.split(","))
        for kind in CLI_KINDS if args.cli_only else kinds:
            r = measure(kind, n, dim, classes)
            if "failed" in r:
                print(f"| {n} | {dim} | {classes} | {kind} | failed: {r['failed']} |||||||")
                continue
            ratio = f"{r['growth_mb'] / r['npy_mb']:.2f}" if "npy_mb" in r else ""
            first = f"{r['first_mb']:.0f}" if "first_mb" in r else ""
            print(
                f"| {n} | {dim} | {classes} | {kind} | {r['seconds']:.1f} | {r['peak_mb']:.0f} "
                f"| {r['growth_mb']:.0f} | {ratio} | {first} | {r['precision_at_1']:.4f} "
                f"| {r['mean_average_precision_at_r']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()

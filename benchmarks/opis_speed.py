"""Speed and memory of streamed OPIS + ε-OPIS (FAR-defined range) against its floor.

For each N (queries = references, D = 128, one class per 50 samples) three measurements
run, each in a fresh subprocess so that peak memory (``ru_maxrss``, minus the process's
peak before the measured call) is the measurement's own:

* ``opis``: :func:`pml_tcm.functional.opis.opis` with the defaults (FAR range
  (1e-3, 1e-2), 1000 thresholds, cosine similarity, default chunk size);
* ``floor``: one chunked ``Q · Rᵀ`` pass over the same chunks, same dtype (float32);
* ``floor_buffered``: the same pass written into one reused ``(chunk, N)`` buffer
  (``torch.mm(..., out=...)``, as :func:`~pml_tcm.functional.opis.opis` does for the
  cosine score): a stricter floor without the page faults of a fresh block per chunk;
* ``naive``: the full N × N similarity matrix, exact k-th largest negatives with
  ``kthvalue`` and per-class counts by sorting and ``searchsorted`` (only where the
  matrix fits, N <= 20k by default).

Usage::

    python benchmarks/opis_speed.py                 # N = 5k, 20k, 100k
    python benchmarks/opis_speed.py --sizes 2000 5000
    python benchmarks/opis_speed.py --device cuda   # on a GPU

On CUDA each measurement first runs once on a small set (kernel loading), times the call up
to a ``torch.cuda.synchronize()``, and reports the growth of
``torch.cuda.max_memory_allocated`` as the peak.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

D = 128
SAMPLES_PER_CLASS = 50


def make_data(n: int):
    import torch

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) // SAMPLES_PER_CLASS
    centres = torch.randn(int(labels.max()) + 1, D, generator=gen)
    embeddings = centres[labels] + 1.5 * torch.randn(n, D, generator=gen)
    return embeddings, labels


def run_opis(x, y):
    from pml_tcm.functional.opis import opis

    result = opis(x, y)
    return {"opis": result.opis, "eps_opis": result.eps_opis}


def run_floor(x, y):
    import torch.nn.functional as F

    from pml_tcm.functional.streaming import default_chunk_size

    chunk = default_chunk_size(x.shape[0], x.device)
    q = F.normalize(x, dim=1)
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        block = q[s : s + chunk] @ q.T
        total += float(block[0, 0])  # keep the block alive until computed
    return {"chunk_size": chunk}


def run_floor_buffered(x, y):
    import torch
    import torch.nn.functional as F

    from pml_tcm.functional.streaming import default_chunk_size

    chunk = default_chunk_size(x.shape[0], x.device)
    q = F.normalize(x, dim=1)
    buffer = x.new_empty(min(chunk, x.shape[0]) * x.shape[0])
    total = 0.0
    for s in range(0, x.shape[0], chunk):
        rows = min(chunk, x.shape[0] - s)
        block = torch.mm(q[s : s + rows], q.T, out=buffer[: rows * x.shape[0]].view(rows, -1))
        total += float(block[0, 0])
    return {"chunk_size": chunk}


def run_naive(x, y):
    import torch
    import torch.nn.functional as F

    q = F.normalize(x, dim=1)
    scores = q @ q.T
    scores.fill_diagonal_(float("nan"))
    same = y[:, None] == y[None, :]
    negatives = scores[~same]
    n_neg = negatives.numel()
    t_lo = float(negatives.kthvalue(n_neg - math.ceil(0.01 * n_neg) + 1).values)
    t_hi = float(negatives.kthvalue(n_neg - math.ceil(0.001 * n_neg) + 1).values)
    del negatives
    grid = torch.linspace(t_lo, t_hi, 1000, dtype=torch.float64)
    classes = torch.unique(y)
    grid = grid.to(x.device)
    tp = torch.zeros(len(classes), 1000, device=x.device)
    fp = torch.zeros(len(classes), 1000, device=x.device)
    for i, c in enumerate(classes):
        rows = scores[y == c]
        same_rows = same[y == c]
        pos = rows[same_rows & ~rows.isnan()].double().sort().values
        neg = rows[~same_rows].double().sort().values
        tp[i] = (pos.numel() - torch.searchsorted(pos, grid)).float()
        fp[i] = (neg.numel() - torch.searchsorted(neg, grid)).float()
    return {"t_lo": t_lo, "t_hi": t_hi}


def child(kind: str, n: int, device: str = "cpu") -> None:
    import torch

    runs = {
        "opis": run_opis,
        "floor": run_floor,
        "floor_buffered": run_floor_buffered,
        "naive": run_naive,
    }
    cuda = device != "cpu"
    x, y = make_data(n)
    x, y = x.to(device), y.to(device)
    torch.manual_seed(0)
    (x[:8] @ x[:8].T).sum()  # warm up the BLAS threads
    if cuda:
        runs[kind](*(t.to(device) for t in make_data(1000)))  # load the kernels
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    info = runs[kind](x, y)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    info.update(seconds=seconds, peak_mb=peak_mb)
    print(json.dumps(info))


def measure(kind: str, n: int, device: str = "cpu") -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(n), "--device", device],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--naive-max", type=int, default=20000, help="largest N for naive")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.device)
        return
    import torch

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, D={D}, float32, {where}")
    header = (
        "| N | OPIS+ε-OPIS (s) | Q·Rᵀ floor (s) | ratio | buffered floor (s) | ratio to it "
        "| OPIS peak MB | floor peak MB | naive (s) | naive peak MB | OPIS | ε-OPIS |"
    )
    print(header)
    print("|---" * 12 + "|")
    for n in args.sizes:
        o = measure("opis", n, args.device)
        f = measure("floor", n, args.device)
        b = measure("floor_buffered", n, args.device)
        naive = measure("naive", n, args.device) if n <= args.naive_max else None
        naive_s = f"{naive['seconds']:.2f}" if naive else "—"
        naive_mb = f"{naive['peak_mb']:.0f}" if naive else "—"
        print(
            f"| {n} | {o['seconds']:.2f} | {f['seconds']:.2f} | {o['seconds'] / f['seconds']:.2f} "
            f"| {b['seconds']:.2f} | {o['seconds'] / b['seconds']:.2f} "
            f"| {o['peak_mb']:.0f} | {f['peak_mb']:.0f} | {naive_s} | {naive_mb} "
            f"| {o['opis']:.4g} | {o['eps_opis']:.4g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

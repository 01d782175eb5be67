"""Cost of the evaluation entry points against one chunked Q·Rᵀ pass (the floor).

For each N (queries = references, D = 128) and each number of classes (2, N/50, N/2:
class balance from one huge class per half to pairs), the script times, in this order
and interleaved with the floor so that a busy machine shows up in every ratio:

* ``floor``: one pass of ``Q · Rᵀ`` over the default chunks, into one reused buffer;
* ``opis``: ``pml_tcm.functional.opis`` (OPIS + ε-OPIS, FAR range (1e-3, 1e-2));
* ``calibrate``: ``pml_tcm.calibrate_threshold(target_far=1e-3)``;
* ``report``: everything ``pml-tcm report`` computes (R@1, MAP@R, OPIS, calibration),
  without the files.

Each cell is ``time / floor = ratio``: the best of ``--repeats`` runs of the entry point,
interleaved with as many runs of the floor (best of those). Usage::

    python benchmarks/evaluation_speed.py                        # N = 20k, 100k
    python benchmarks/evaluation_speed.py --sizes 20000 --threads 1 2
    python benchmarks/evaluation_speed.py --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

D = 128


def make_data(n: int, classes: int, device: str):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, D, generator=gen)
    embeddings = centres[labels] + 1.5 * torch.randn(n, D, generator=gen)
    embeddings = torch.nn.functional.normalize(embeddings, dim=1)
    return embeddings.to(device), labels.to(device)


def floor_pass(x: torch.Tensor) -> None:
    from pml_tcm.functional.streaming import default_chunk_size

    chunk = default_chunk_size(x.shape[0], x.device)
    buffer = x.new_empty(chunk * x.shape[0])
    for start in range(0, x.shape[0], chunk):
        rows = x[start : start + chunk]
        torch.mm(rows, x.T, out=buffer[: rows.shape[0] * x.shape[0]].view(rows.shape[0], -1))


def run(kind: str, x: torch.Tensor, y: torch.Tensor) -> None:
    if kind == "floor":
        floor_pass(x)
    elif kind == "opis":
        from pml_tcm.functional import opis

        opis(x, y)
    elif kind == "calibrate":
        from pml_tcm import calibrate_threshold

        calibrate_threshold(x, y, target_far=1e-3)
    elif kind == "report":
        from pml_tcm.embedding_report import compute_report

        # (without the default 1000 bootstrap intervals: benchmarks/bootstrap_cost.py times them)
        compute_report(x.cpu().numpy(), y.cpu().numpy(), device=x.device, bootstrap=0)
    else:
        raise ValueError(kind)


def timed(kind: str, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(kind, x, y)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--classes", nargs="+", default=["2", "N/50", "N/2"])
    parser.add_argument("--kinds", nargs="+", default=["opis", "calibrate", "report"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print("| N | classes | threads | " + " | ".join(args.kinds) + " |")
    print("|---|---|---|" + "---|" * len(args.kinds))
    for n in args.sizes:
        for spec in args.classes:
            classes = {"2": 2, "N/50": max(2, n // 50), "N/2": max(2, n // 2)}[spec]
            x, y = make_data(n, classes, args.device)
            for threads in args.threads:
                torch.set_num_threads(threads)
                run("floor", x, y)  # warm-up: page faults of the first buffer
                cells = []
                for kind in args.kinds:
                    # floor and kind interleaved, best of each: a busy spell of a shared
                    # host then slows one run of each, not all runs of one of them
                    floor = seconds = float("inf")
                    for _ in range(args.repeats):
                        floor = min(floor, timed("floor", x, y, 1))
                        seconds = min(seconds, timed(kind, x, y, 1))
                    cells.append(f"{seconds:.2f} s / {floor:.2f} s = {seconds / floor:.2f}x")
                print(
                    f"| {n} | {spec} ({classes}) | {threads} | " + " | ".join(cells) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

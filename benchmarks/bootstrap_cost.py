"""What bootstrap intervals cost next to the pass they come from.

Prints, for clustered data (D = 128), the time of OPIS and of ``calibrate_threshold``
without intervals, with ``bootstrap=B``, and with groups, each as a ratio to the same
call without intervals, measured in the same run (best of ``--repeats``).

    python benchmarks/bootstrap_cost.py --sizes 20000 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from pml_tcm import calibrate_threshold
from pml_tcm.functional import opis


def data(n: int, num_classes: int, num_groups: int, dim: int = 128, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    centres = torch.randn(num_classes, dim, generator=gen)
    x = centres[labels] + 1.5 * torch.randn(n, dim, generator=gen)
    groups = torch.randint(0, num_groups, (n,), generator=gen)
    return x, labels, groups


def timed(function, args: tuple, kwargs: dict, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)  # best of the repeats: the machine is shared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--groups", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    b = args.bootstrap
    print(f"threads {args.threads}, bootstrap {b}, D 128, classes N/50")
    print(f"{'N':>7} {'groups':>6} {'call':<22} {'no intervals s':>14} {'with':>8} {'ratio':>6}")
    for n in args.sizes:
        for num_groups in args.groups:
            x, y, g = data(n, max(2, n // 50), num_groups)
            calls = [
                ("opis, classes", opis, {}),
                ("opis, groups", opis, {"groups": g}),
                ("calibrate, groups", calibrate_threshold, {"target_far": 1e-3, "groups": g}),
            ]
            for name, function, kwargs in calls:
                base = timed(function, (x, y), kwargs, args.repeats)
                extra = timed(function, (x, y), {**kwargs, "bootstrap": b}, args.repeats)
                print(
                    f"{n:>7} {num_groups:>6} {name:<22} {base:>14.2f} {extra:>8.2f} "
                    f"{extra / base:>6.2f}"
                )


if __name__ == "__main__":
    main()

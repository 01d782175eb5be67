"""Speed and memory of the TCM term against the cost floor and pml's own loss.

For each batch size N (D = 512, float32, 10 classes per 100 samples) it measures
forward+backward of:

* ``floor``: normalize + x @ x.T, summed, backward: the least any pairwise loss costs;
* ``pml_tcm``: ``TCMRegularizer()`` as users get it (input checks on);
* ``drop_in``: ``pml_tcm.losses.ThresholdConsistentMarginLoss()``, the drop-in for pml's
  loss (same call, pml's reducer path, no input-value checks, as pml);
* ``pml``: pml's ``losses.ThresholdConsistentMarginLoss`` (skipped where its per-pair
  gathers would not fit in memory).

Times are medians over repetitions with the methods interleaved, so background load hits
them alike; the ratio columns are against the floor of the same run, and ``pml /
drop-in`` against the drop-in timed interleaved with pml's loss. Peak memory is the
growth of the process's peak RSS (VmHWM, reset before the step) over its RSS before the
step (inputs already allocated), each method in a fresh subprocess; Linux only.

    python benchmarks/tcm_speed.py                 # the full table
    python benchmarks/tcm_speed.py --sizes 256 1024
    python benchmarks/tcm_speed.py --pml-reps 1   # fewer repetitions of pml's slow loss
    python benchmarks/tcm_speed.py --device cuda   # on a GPU: CUDA events are not needed,
                                                   # each step ends with a synchronize

On CUDA the peak memory is the growth of ``torch.cuda.max_memory_allocated`` over the
memory allocated before the step (the caching allocator's view, not the driver's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

DIM = 512
METHODS = ("floor", "pml_tcm", "drop_in", "pml")
# pml gathers two (pairs, D) float32 row sets per part plus their gradients.
PML_BYTES_PER_PAIR = DIM * 4 * 6
PML_MEMORY_LIMIT = 14e9


def make_step(method: str, n: int, device: str = "cpu"):
    import torch
    import torch.nn.functional as F
    from pytorch_metric_learning.losses import ThresholdConsistentMarginLoss

    from pml_tcm import TCMRegularizer
    from pml_tcm.losses import ThresholdConsistentMarginLoss as DropInLoss

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, DIM, generator=gen).to(device).requires_grad_()
    y = torch.randint(0, max(1, n // 10), (n,), generator=gen).to(device)
    if method == "floor":

        def loss_fn():
            xn = F.normalize(x, dim=1)
            return (xn @ xn.T).sum()

    elif method == "pml_tcm":
        reg = TCMRegularizer()

        def loss_fn():
            return reg(x, y)

    elif method == "drop_in":
        drop_in = DropInLoss()

        def loss_fn():
            return drop_in(x, y)

    else:
        pml_loss = ThresholdConsistentMarginLoss()

        def loss_fn():
            return pml_loss(x, y)

    def step():
        x.grad = None
        loss_fn().backward()
        if device != "cpu":
            torch.cuda.synchronize()

    return step


def pml_fits(n: int, device: str = "cpu") -> bool:
    if device != "cpu":
        import torch

        limit = 0.6 * torch.cuda.get_device_properties(0).total_memory
        return n * (n - 1) * PML_BYTES_PER_PAIR <= limit
    return n * (n - 1) * PML_BYTES_PER_PAIR <= PML_MEMORY_LIMIT


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(method: str, n: int) -> None:
    make_step(method, 64)()  # thread pools and kernels initialise outside the measurement
    step = make_step(method, n)
    # Reset the peak-RSS mark (Linux: clear_refs 5) so import-time peaks do not count.
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def cuda_peak_memory(method: str, n: int) -> float:
    import torch

    make_step(method, 64, "cuda")()
    step = make_step(method, n, "cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = torch.cuda.max_memory_allocated() - before
    del step
    torch.cuda.empty_cache()
    return peak


def peak_memory(method: str, n: int, device: str = "cpu") -> float:
    if device != "cpu":
        return cuda_peak_memory(method, n)
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", method, str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_bytes"]


def median_times(methods: list[str], n: int, reps: int, device: str = "cpu") -> dict[str, float]:
    steps = {m: make_step(m, n, device) for m in methods}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(reps):
        for m in methods:
            start = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048, 4096, 16384])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument(
        "--pml-reps", type=int, default=3, help="timed repetitions of pml's loss (default 3)"
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("METHOD", "N"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(args.memory_child[0], int(args.memory_child[1]))
        return

    import torch

    device = args.device
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU"
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, D={DIM}, float32, {where}")
    header = (
        "| N | floor ms | pml_tcm ms | pml_tcm / floor | drop-in ms | drop-in / floor "
        "| pml ms | pml / drop-in | floor peak MB | pml_tcm peak MB | drop-in peak MB "
        "| pml peak MB |"
    )
    print(header)
    print("|---" * 12 + "|")
    for n in args.sizes:
        ours = ["floor", "pml_tcm", "drop_in"]
        methods = ours + (["pml"] if pml_fits(n, device) else [])
        reps = 15 if n <= 1024 else 7 if n <= 4096 else 3
        if device != "cpu":
            reps = 25
        times = median_times(ours, n, reps, device)
        pml_ratio = "-"
        if "pml" in methods:
            # pml interleaved with the drop-in, so that the ratio sees one load
            paired = median_times(["drop_in", "pml"], n, args.pml_reps, device)
            times["pml"] = paired["pml"]
            pml_ratio = f"{paired['pml'] / paired['drop_in']:.0f}x"
        memory = {m: peak_memory(m, n, device) for m in methods}

        ms = {m: f"{t * 1e3:.1f}" for m, t in times.items()}
        mb = {m: f"{b / 2**20:.0f}" for m, b in memory.items()}
        print(
            f"| {n} | {ms['floor']} | {ms['pml_tcm']} | {times['pml_tcm'] / times['floor']:.2f} "
            f"| {ms['drop_in']} | {times['drop_in'] / times['floor']:.2f} "
            f"| {ms.get('pml', 'skipped (would not fit)')} | {pml_ratio} | {mb['floor']} "
            f"| {mb['pml_tcm']} | {mb['drop_in']} | {mb.get('pml', '-')} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

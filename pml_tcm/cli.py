"""The ``pml-tcm`` command line: ``demo`` (open-world experiment) and ``report`` (OPIS of
saved embeddings).

Bad input (missing data set, unreadable or malformed files) ends with one line on stderr
and exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .data import DATASETS, DatasetError

DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 8}
DEFAULT_THREADS = {"digits": 1}
QUICK_SAMPLES = 500


class InputError(Exception):
    """Bad user input; the message is the one line the user sees."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its ``demo`` and ``report`` subcommands."""
    parser = argparse.ArgumentParser(
        prog="pml-tcm",
        description="Threshold-Consistent Margin (TCM) and OPIS for pytorch-metric-learning.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(commands)
    _add_report(commands)
    return parser


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from .experiment import LOSS_NAMES

    demo = commands.add_parser(
        "demo",
        help="open-world experiment: train on classes 0-4, OPIS on unseen classes 5-9",
        description=(
            "Train each base loss without and with TCM on classes 0-4, evaluate R@1, "
            "MAP@R, OPIS and eps-OPIS on the unseen classes 5-9, print the table and "
            "write it with the figures to --out."
        ),
    )
    demo.add_argument("--dataset", choices=DATASETS, default="digits")
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the four Fashion-MNIST IDX .gz files "
        "(default /usr/share/datasets/fashion-mnist)",
    )
    demo.add_argument("--losses", nargs="+", choices=LOSS_NAMES, default=list(LOSS_NAMES))
    demo.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED")
    demo.add_argument(
        "--epochs", type=int, default=None, help="default: 30 for digits, 8 for fashion-mnist"
    )
    demo.add_argument("--batch-size", type=int, default=100)
    demo.add_argument("--embedding-size", type=int, default=64)
    demo.add_argument("--lr", type=float, default=1e-3)
    demo.add_argument(
        "--max-batches", type=int, default=None, help="cap on training iterations per epoch"
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"code-path check: 1 epoch of 2 batches, at most {QUICK_SAMPLES} train/eval samples",
    )
    demo.add_argument("--pos-margin", type=float, default=0.9, help="TCM m+ (default 0.9)")
    demo.add_argument("--neg-margin", type=float, default=0.5, help="TCM m- (default 0.5)")
    demo.add_argument(
        "--tcm-weight", type=float, default=1.0, help="embedding_reg_weight of TCM (default 1)"
    )
    demo.add_argument(
        "--tcm-miner", action="store_true", help="also use TCMMiner as the tuple miner"
    )
    demo.add_argument(
        "--far-range", nargs=2, type=float, default=(1e-3, 1e-2), metavar=("LO", "HI")
    )
    demo.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where to train and evaluate (auto: cuda when available; default cpu)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for digits, whose tiny MLP runs fastest on one "
        "thread, torch's default for fashion-mnist)",
    )
    demo.add_argument("--no-circle", action="store_true", help="skip the 2-D ArcFace figure")
    demo.add_argument("--out", type=Path, default=Path("demo_out"))
    demo.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="save/reuse trained weights here"
    )
    demo.add_argument(
        "--train-only", action="store_true", help="train and checkpoint only, no evaluation"
    )
    demo.set_defaults(handler=_run_demo)


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="R@1, MAP@R, OPIS, eps-OPIS and calibrated threshold of saved embeddings",
        description=(
            "Evaluate embeddings saved from any model (.npy). Without --reference the "
            "embeddings are their own reference set (self pairs excluded)."
        ),
    )
    report.add_argument("embeddings", type=Path, help="(N, D) float array, .npy")
    report.add_argument("labels", type=Path, help="(N,) integer array, .npy")
    report.add_argument("--reference", type=Path, default=None, help="(M, D) .npy")
    report.add_argument("--reference-labels", type=Path, default=None, help="(M,) .npy")
    report.add_argument(
        "--far-range", nargs=2, type=float, default=(1e-3, 1e-2), metavar=("LO", "HI")
    )
    report.add_argument("--target-far", type=float, default=1e-3)
    report.add_argument("--worst", type=int, default=5, help="how many worst classes to list")
    report.add_argument("--out", type=Path, default=Path("report_out"))
    report.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to compute (auto: cuda when torch sees one, else cpu; default auto)",
    )
    report.set_defaults(handler=_run_report)


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from .benchmark import run_benchmark
    from .data import load_split
    from .experiment import ArmConfig, make_accuracy_calculator

    _check_positive(args, ("batch_size", "embedding_size", "epochs", "max_batches", "threads"))
    split = load_split(args.dataset, args.data_dir)
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[args.dataset]
    max_batches = args.max_batches
    if args.quick:
        split = split.subsample(QUICK_SAMPLES, QUICK_SAMPLES)
        epochs, max_batches = 1, 2 if max_batches is None else max_batches
    base = ArmConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        embedding_size=args.embedding_size,
        lr=args.lr,
        max_batches=max_batches,
        pos_margin=args.pos_margin,
        neg_margin=args.neg_margin,
        tcm_weight=args.tcm_weight,
        tcm_miner=args.tcm_miner,
        far_range=tuple(args.far_range),
        device=_resolve_device(args.device),
    )
    make_accuracy_calculator(base)  # rejects bad OPIS settings before any training
    print(
        f"{split.name}: train on classes {sorted(set(split.train_y.tolist()))} "
        f"({len(split.train_y)} samples), evaluate on unseen classes "
        f"{sorted(set(split.eval_y.tolist()))} ({len(split.eval_y)} samples); "
        f"{epochs} epochs, seeds {args.seeds}",
        flush=True,
    )
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    threads = args.threads if args.threads is not None else DEFAULT_THREADS.get(args.dataset)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        output = run_benchmark(
            split,
            base,
            args.out,
            args.losses,
            args.seeds,
            circle=not args.no_circle,
            checkpoint_dir=args.checkpoint_dir,
            train_only=args.train_only,
            log=lambda line: print(line, flush=True),
        )
    finally:
        torch.set_num_threads(threads_before)
    if not args.train_only:
        print()
        print(output.table)
        print()
        for path in output.files:
            print(f"wrote {path}")
    print(f"total time {time.perf_counter() - start:.0f}s")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from .embedding_report import report_embeddings

    report_embeddings(
        args.embeddings,
        args.labels,
        reference=args.reference,
        reference_labels=args.reference_labels,
        far_range=tuple(args.far_range),
        target_far=args.target_far,
        worst=args.worst,
        out=args.out,
        device=_resolve_device(args.device),
    )
    return 0


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here (use cpu or auto)")
    return choice


def _check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pml-tcm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (InputError, DatasetError, ValueError) as error:
        print(f"pml-tcm {args.command}: error: {error}", file=sys.stderr)
        return 2

"""The ``pml-tcm`` command line: ``demo`` (open-world experiment, :mod:`pml_tcm.demo`)
and ``report`` (OPIS of saved embeddings).

Bad input (bad settings, missing data set, unreadable or malformed files) ends with one
line on stderr and exit code 2; no traceback. Anything else is a bug in pml-tcm (or its
dependencies): one line saying so and exit code 1; ``PML_TCM_DEBUG=1`` shows the
traceback. Ctrl-C ends with exit code 130, SIGTERM with 143, each after the files being
written are cleaned up.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn


class InputError(Exception):
    """Bad user input; the message is the one line the user sees."""


class _OneLineErrors(argparse.ArgumentParser):
    """argparse prints the whole usage before an error; pml-tcm prints one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its ``demo`` and ``report`` subcommands."""
    parser = _OneLineErrors(
        prog="pml-tcm",
        description="Threshold-Consistent Margin (TCM) and OPIS for pytorch-metric-learning.",
        epilog=(
            "examples:\n"
            "  pml-tcm demo                          # the open-world demo: seconds on a CPU\n"
            "  pml-tcm report emb.npy labels.npy     # OPIS and a threshold for your embeddings\n"
            "  pml-tcm COMMAND --help                # the options of one command"
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=version_text(), help="show the versions and exit"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    _add_demo(commands)
    _add_report(commands)
    return parser


class HelpFormatter(argparse.HelpFormatter):
    """Keeps the epilog's examples as written and ends every option's help with its
    default, like ``ArgumentDefaultsHelpFormatter`` but readable for lists, flags and
    defaults that depend on other options (those say their default themselves)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # the examples: one command a line, as written
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if (
            "%(default)" in help_text
            or "default" in help_text
            or action.default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return help_text
        if action.nargs == 0:  # a flag
            shown = "on" if action.default else "off"
        elif isinstance(action.default, (list, tuple)):
            shown = " ".join(
                f"{value:g}" if isinstance(value, float) else str(value) for value in action.default
            )
        elif isinstance(action.default, float):
            shown = f"{action.default:g}"
        else:
            shown = str(action.default)
        return f"{help_text} (default: {shown.replace('%', '%%')})"


def version_text() -> str:
    """``pml-tcm X (pytorch-metric-learning Y, torch Z)``, read without importing torch."""
    from .provenance import software_versions

    versions = software_versions()
    return (
        f"pml-tcm {versions['pml-tcm']} (pytorch-metric-learning "
        f"{versions['pytorch-metric-learning']}, torch {versions['torch']})"
    )


def _add_demo(commands: argparse._SubParsersAction) -> None:
    from .demo.settings import DATASETS, DEFAULT_SEEDS, LOSS_NAMES, QUICK_SAMPLES, SWEEP_PAGE

    demo = commands.add_parser(
        "demo",
        help="open-world experiment: train on classes 0-4, OPIS on unseen classes 5-9",
        description=(
            "Train each base loss without and with TCM on classes 0-4, evaluate R@1, "
            "MAP@R, OPIS and eps-OPIS on the unseen classes 5-9, print the table with a "
            "short reading and write it with the figures to --out."
        ),
        epilog=(
            "examples:\n"
            "  pml-tcm demo                                 # digits, 30 epochs, seeds 0-4\n"
            "  pml-tcm demo --quick                         # code-path check, seconds\n"
            "  pml-tcm demo --seeds 0 --no-circle           # one seed: fast, but no interval\n"
            "  pml-tcm demo --dataset fashion-mnist --seeds 0 1 2 --epochs 4\n"
            "  pml-tcm demo --losses arcface --tcm-weight 0.5 --pos-margin 0.85 --tcm-miner"
        ),
        formatter_class=HelpFormatter,
    )
    demo.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's bundled 8x8 digits; fashion-mnist: the IDX files in "
        "--data-dir",
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with the four Fashion-MNIST IDX .gz files "
        "(default: /usr/share/datasets/fashion-mnist)",
    )
    demo.add_argument(
        "--losses",
        nargs="+",
        choices=LOSS_NAMES,
        default=list(LOSS_NAMES),
        metavar="LOSS",
        help=f"base losses to run, each without and with TCM; any of {', '.join(LOSS_NAMES)}",
    )
    demo.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=list(DEFAULT_SEEDS),
        metavar="SEED",
        help="one run per seed and arm; TCM's change is paired by seed, with a 95 %% "
        "t-interval from two seeds on",
    )
    demo.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="training epochs (default: 30 for digits, 8 for fashion-mnist)",
    )
    demo.add_argument(
        "--batch-size", type=int, default=100, help="batch size, a multiple of the 5 classes"
    )
    demo.add_argument("--embedding-size", type=int, default=64, help="embedding dimension")
    demo.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    demo.add_argument(
        "--max-batches",
        type=int,
        default=None,
        help="cap on training iterations per epoch (default: one pass over the data)",
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"code-path check: 1 epoch of 2 batches, at most {QUICK_SAMPLES} train/eval samples",
    )
    validated = f"(default: per data set and loss, chosen on validation classes: {SWEEP_PAGE})"
    demo.add_argument("--pos-margin", type=float, default=None, help=f"TCM m+ {validated}")
    demo.add_argument("--neg-margin", type=float, default=None, help=f"TCM m- {validated}")
    demo.add_argument(
        "--tcm-weight",
        type=float,
        default=None,
        help=f"embedding_reg_weight: the weight of TCM, positive {validated}",
    )
    demo.add_argument(
        "--tcm-miner", action="store_true", help="also use TCMMiner as the tuple miner"
    )
    _add_far_range(demo)
    demo.add_argument(
        "--target-far",
        type=float,
        default=1e-3,
        help="the utility figures mark the threshold calibrated for this FAR",
    )
    demo.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="where to train and evaluate (auto: cuda when available)",
    )
    demo.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for digits, whose tiny MLP runs fastest on one "
        "thread, torch's default for fashion-mnist)",
    )
    demo.add_argument("--no-circle", action="store_true", help="skip the 2-D ArcFace figure")
    demo.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="folder for the table and figures"
    )
    demo.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=None,
        help="save trained weights here and reuse them (default: none)",
    )
    demo.add_argument(
        "--train-only", action="store_true", help="train and checkpoint only, no evaluation"
    )
    demo.set_defaults(handler=_run_demo)


def _add_far_range(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--far-range",
        nargs=2,
        type=float,
        default=(1e-3, 1e-2),
        metavar=("LO", "HI"),
        help="FAR bounds of the threshold range OPIS is measured over",
    )


def _add_report(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report",
        help="R@1, MAP@R, OPIS, eps-OPIS and calibrated threshold of saved embeddings",
        description=(
            "Evaluate embeddings saved from any model (.npy). Without --reference the "
            "embeddings are their own reference set (self pairs excluded). Prints the "
            "report with a reading of its numbers and writes report.md, report.json and "
            "(with matplotlib) utility_curves.png to --out, as one set; with --groups also "
            "per-group FAR and FRR at the threshold and group_rates.png. OPIS, eps-OPIS, "
            "FAR and FRR come with bootstrap intervals. Rates are fractions (1e-3 is 0.1%)."
        ),
        epilog=(
            "examples:\n"
            "  pml-tcm report embeddings.npy labels.npy\n"
            "  pml-tcm report embeddings.npy labels.npy --target-far 1e-4 --out my_report\n"
            "  pml-tcm report queries.npy query_labels.npy \\\n"
            "      --reference gallery.npy --reference-labels gallery_labels.npy --worst 10\n"
            "  pml-tcm report embeddings.npy labels.npy --groups customers.npy"
        ),
        formatter_class=HelpFormatter,
    )
    report.add_argument("embeddings", type=Path, help="(N, D) float array, .npy")
    report.add_argument(
        "labels", type=Path, help="(N,) class labels (integers of any size, bools or floats), .npy"
    )
    report.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="(M, D) .npy reference (gallery) embeddings (default: the embeddings themselves)",
    )
    report.add_argument(
        "--reference-labels",
        type=Path,
        default=None,
        help="(M,) .npy labels of --reference (default: none; required with --reference)",
    )
    _add_far_range(report)
    report.add_argument(
        "--target-far",
        type=float,
        default=1e-3,
        help="target FAR of the calibrated threshold, a fraction in (0, 1]",
    )
    report.add_argument(
        "--groups",
        type=Path,
        default=None,
        help="(N,) .npy group id per embedding (e.g. the customer): per-group FAR and FRR "
        "at the threshold, the worst group, worst/best ratios, group OPIS (default: none, "
        "per-class rates only)",
    )
    report.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        help="bootstrap resamples for the intervals on OPIS, eps-OPIS, FAR and FRR "
        "(0: no intervals)",
    )
    report.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="level of the intervals, in (0, 1)",
    )
    report.add_argument(
        "--worst", type=int, default=5, help="how many worst classes (and groups) to list"
    )
    report.add_argument(
        "--out", type=Path, default=Path("report_out"), help="folder for the report files"
    )
    report.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to compute (auto: cuda when torch sees one, else cpu)",
    )
    report.set_defaults(handler=_run_report)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo.command import run_demo
    from .demo.settings import DemoSettingsError

    try:
        return run_demo(args, device=_resolve_device(args.device))
    except DemoSettingsError as error:
        raise InputError(str(error)) from error


def _run_report(args: argparse.Namespace) -> int:
    from .report import ReportInputError, report_embeddings

    try:
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
            groups=args.groups,
            bootstrap=args.bootstrap,
            confidence=args.confidence,
        )
    except ReportInputError as error:
        raise InputError(str(error)) from error
    return 0


def _resolve_device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here (use cpu or auto)")
    return choice


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pml-tcm`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Without a command it prints the help (the command list) and returns 0. Exit codes:
    2 for bad input (one line on stderr), 1 for an internal error (one line; set
    ``PML_TCM_DEBUG=1`` for the traceback), 130 for Ctrl-C, 143 for SIGTERM.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    prog = f"pml-tcm {args.command}"
    try:
        with _sigterm_as_exit():
            return args.handler(args)
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        reason = str(error).splitlines()[0] if str(error) else ""
        print(
            f"{prog}: internal error (a bug in pml-tcm, please report it): "
            f"{type(error).__name__}{': ' + reason if reason else ''} "
            f"(rerun with {DEBUG_VARIABLE}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


DEBUG_VARIABLE = "PML_TCM_DEBUG"


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)``, so that cleanup (``finally``) runs, as for
    Ctrl-C; only in the main thread, where signal handlers live."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

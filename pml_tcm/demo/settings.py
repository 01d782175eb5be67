"""The demo's settings: its defaults and the checks that run before anything is loaded
or trained.

Pure Python (no torch, no optional extras), so that the command line can build its
parser from it cheaply.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

DATASETS = ("digits", "fashion-mnist")
LOSS_NAMES = ("multisimilarity", "arcface")
LOSS_TITLES = {"multisimilarity": "MultiSimilarity", "arcface": "ArcFace"}
SEEN_CLASSES = (0, 1, 2, 3, 4)
UNSEEN_CLASSES = (5, 6, 7, 8, 9)
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 8}
DEFAULT_THREADS = {"digits": 1}
QUICK_SAMPLES = 500
MAX_SEED = 2**32 - 1  # numpy's RandomState takes seeds in [0, 2**32 - 1]
MAX_TCM_WEIGHT = 1e37  # each TCM part is at most 2 * weight and must stay finite in float32


class DemoSettingsError(ValueError):
    """A demo setting is invalid; the message is one line naming the option."""


def check_settings(args: argparse.Namespace) -> None:
    """Every ``pml-tcm demo`` setting that can be checked without data: sizes, rates,
    the TCM weight and margins, the FAR values, the seeds, the losses and the output
    folders. Runs before anything is loaded, trained or written.

    Raises:
        DemoSettingsError: one line naming the option.
    """
    for name in ("batch_size", "embedding_size", "epochs", "max_batches", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise DemoSettingsError(f"{_option(name)} must be positive, got {value}")
    if args.batch_size % len(SEEN_CLASSES):
        raise DemoSettingsError(
            f"--batch-size must be a multiple of the {len(SEEN_CLASSES)} training classes, "
            f"got {args.batch_size}"
        )
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise DemoSettingsError(f"--lr must be a positive finite number, got {args.lr:g}")
    weight = args.tcm_weight
    if not (math.isfinite(weight) and 0 < weight <= MAX_TCM_WEIGHT):
        raise DemoSettingsError(
            f"--tcm-weight must be a positive finite number (at most {MAX_TCM_WEIGHT:g}), "
            f"got {weight:g}"
        )
    for name in ("pos_margin", "neg_margin"):
        value = getattr(args, name)
        if not (math.isfinite(value) and -1 <= value <= 1):
            raise DemoSettingsError(
                f"{_option(name)} must be a cosine similarity in [-1, 1], got {value:g}"
            )
    if args.pos_margin < args.neg_margin:
        raise DemoSettingsError(
            f"--pos-margin ({args.pos_margin:g}) must be >= --neg-margin ({args.neg_margin:g})"
        )
    low, high = args.far_range
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high <= 1):
        raise DemoSettingsError(f"--far-range must satisfy 0 < LO <= HI <= 1, got {low:g} {high:g}")
    if not (math.isfinite(args.target_far) and 0 < args.target_far <= 1):
        raise DemoSettingsError(f"--target-far must lie in (0, 1], got {args.target_far:g}")
    for seed in args.seeds:
        if not 0 <= seed <= MAX_SEED:
            raise DemoSettingsError(f"--seeds must lie in [0, 2**32 - 1], got {seed}")
    _check_unique("--seeds", args.seeds)
    _check_unique("--losses", args.losses)
    if not args.train_only:
        check_writable_folder(args.out, "--out")
    if args.checkpoint_dir is not None:
        check_writable_folder(args.checkpoint_dir, "--checkpoint-dir")


def check_writable_folder(path: Path, option: str) -> None:
    """``path`` is a folder that can be written to, or one that can be created.

    Raises:
        DemoSettingsError: it is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        raise DemoSettingsError(f"{option} {path} {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DemoSettingsError(f"{option} {path}: no permission to write in {existing}")


def _check_unique(option: str, values: Sequence[object]) -> None:
    repeated = sorted({str(v) for v in values if list(values).count(v) > 1})
    if repeated:
        raise DemoSettingsError(f"{option} lists {', '.join(repeated)} more than once")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")

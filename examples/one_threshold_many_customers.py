"""Will one threshold hold for every customer? Fashion-MNIST, five simulated customers.

Train a small CNN with pml's ``MultiSimilarityLoss`` on Fashion-MNIST classes 0-4 (train
split), without and with TCM (``with_tcm``), then deploy it to five customers whose images
are classes 5-9 of the test split, never seen in training. Each customer gets a disjoint
random fifth of those images, taken with its own camera (see :data:`CUSTOMERS`): clean
scans, low contrast, sensor noise, blur, overexposure. One threshold is calibrated on all
customers' pairs for a target FAR of 1e-3; the script then prints each customer's FAR and
FRR at that threshold with bootstrap intervals, the worst-to-best ratios and the OPIS
across customers with its interval. ::

    python examples/one_threshold_many_customers.py --seeds 0 1 2 3 4 --epochs 4 \
        --out runs/customers

The evaluation embeddings, labels and customer ids of every model are saved under
``--out`` as ``.npy``; ``--evaluate-only`` reuses them instead of training again. Needs
the Fashion-MNIST IDX files (Debian: ``apt-get install dataset-fashion-mnist``); nothing
is downloaded. The measured run and what it shows:
docs/how-to/one-threshold-many-customers.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning import losses

from pml_tcm import calibrate_threshold, with_tcm
from pml_tcm.demo.data import DatasetError, OpenWorldSplit, fashion_mnist_split
from pml_tcm.demo.experiment import ArmConfig, build_trainer, seed_everything
from pml_tcm.demo.models import make_embedder, make_trunk
from pml_tcm.demo.progress import quiet_pml
from pml_tcm.demo.settings import default_tcm
from pml_tcm.functional import opis

TARGET_FAR = 1e-3
ARMS = ("base", "tcm")
ARM_TITLES = {"base": "MultiSimilarity", "tcm": "MultiSimilarity + TCM"}


@dataclass(frozen=True)
class Customer:
    """One simulated deployment: how its camera changes an image in [0, 1].

    Attributes:
        name: short name shown in the tables.
        kind: ``"clean"``, ``"contrast"``, ``"noise"``, ``"blur"`` or ``"brightness"``.
        amount: the transform's parameter (see :func:`shift_images`).
        why: the real deployment it stands for.
    """

    name: str
    kind: str
    amount: float
    why: str


CUSTOMERS = (
    Customer("clean", "clean", 0.0, "scans like the training images (studio lighting)"),
    Customer("low-contrast", "contrast", 0.35, "hazy lens, flat lighting: pixels pulled to grey"),
    Customer("noisy", "noise", 0.15, "cheap sensor in low light (high ISO): Gaussian noise"),
    Customer("blurred", "blur", 1.2, "out of focus, or upscaled low-resolution photos"),
    Customer("overexposed", "brightness", 0.3, "bright backdrop, auto-exposure too high"),
)


def assign_customers(num_samples: int, num_customers: int, seed: int = 0) -> np.ndarray:
    """One customer id per sample: a random permutation cut into near-equal disjoint parts.

    Args:
        num_samples: number of evaluation samples ``N``.
        num_customers: number of customers ``U`` (at most ``N``).
        seed: seed of the permutation.

    Returns:
        ``(N,)`` int64 ids in ``0..U-1``; every customer gets ``N // U`` or ``N // U + 1``.
    """
    if not 1 <= num_customers <= num_samples:
        raise ValueError(
            f"num_customers must lie in [1, num_samples={num_samples}], got {num_customers}"
        )
    order = np.random.default_rng(seed).permutation(num_samples)
    customer_ids = np.empty(num_samples, dtype=np.int64)
    for customer, part in enumerate(np.array_split(order, num_customers)):
        customer_ids[part] = customer
    return customer_ids


def gaussian_kernel(sigma: float) -> np.ndarray:
    """``(2r + 1,)`` normalised 1-D Gaussian taps, ``r = ceil(3 sigma)``."""
    radius = int(np.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def shift_images(images: np.ndarray, customer: Customer, rng: np.random.Generator) -> np.ndarray:
    """One customer's camera applied to ``(n, 1, H, W)`` float images in [0, 1].

    * ``clean``: unchanged.
    * ``contrast``: ``0.5 + amount * (x - 0.5)`` (pulled toward mid grey).
    * ``noise``: ``clip(x + N(0, amount^2), 0, 1)``, independent per pixel.
    * ``blur``: Gaussian blur of standard deviation ``amount`` pixels, separable, zero
      padding (Fashion-MNIST's background is 0).
    * ``brightness``: ``clip(x + amount, 0, 1)``.

    Returns:
        ``(n, 1, H, W)`` float32 in [0, 1].
    """
    x = images.astype(np.float64)
    if customer.kind == "clean":
        out = x
    elif customer.kind == "contrast":
        out = 0.5 + customer.amount * (x - 0.5)
    elif customer.kind == "noise":
        out = np.clip(x + rng.normal(0.0, customer.amount, size=x.shape), 0.0, 1.0)
    elif customer.kind == "blur":
        taps = gaussian_kernel(customer.amount)
        radius = taps.size // 2
        height, width = x.shape[-2:]
        rows = np.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)))
        x = sum(w * rows[..., k : k + height, :] for k, w in enumerate(taps))
        cols = np.pad(x, ((0, 0), (0, 0), (0, 0), (radius, radius)))
        out = sum(w * cols[..., k : k + width] for k, w in enumerate(taps))
    elif customer.kind == "brightness":
        out = np.clip(x + customer.amount, 0.0, 1.0)
    else:
        raise ValueError(f"unknown customer kind {customer.kind!r}")
    return out.astype(np.float32)


def customer_images(
    images: np.ndarray, customer_ids: np.ndarray, customers=CUSTOMERS, seed: int = 0
) -> np.ndarray:
    """Every evaluation image as its customer's camera took it.

    Args:
        images: ``(N, 1, H, W)`` float images in [0, 1].
        customer_ids: ``(N,)`` ids into ``customers`` (:func:`assign_customers`).
        customers: the customers' transforms.
        seed: seed of the random parts (sensor noise).

    Returns:
        ``(N, 1, H, W)`` float32.
    """
    rng = np.random.default_rng(seed)
    shifted = np.empty(images.shape, dtype=np.float32)
    for index, customer in enumerate(customers):
        mine = customer_ids == index
        shifted[mine] = shift_images(images[mine], customer, rng)
    return shifted


def make_loss(tcm: bool) -> losses.BaseMetricLossFunction:
    """pml's MultiSimilarityLoss; with TCM at the weight and margins that the validated
    sweep chose for it on Fashion-MNIST (``pml_tcm.demo.settings.default_tcm``)."""
    loss = losses.MultiSimilarityLoss()
    if tcm:
        setting = default_tcm("fashion-mnist", "multisimilarity")
        with_tcm(
            loss,
            weight=setting.weight,
            pos_margin=setting.pos_margin,
            neg_margin=setting.neg_margin,
        )
    return loss


def train(split: OpenWorldSplit, tcm: bool, epochs: int, seed: int) -> dict[str, torch.nn.Module]:
    """Train the demo's trunk and embedder with pml's MetricLossOnly trainer."""
    config = ArmConfig(loss="multisimilarity", tcm=tcm, seed=seed, epochs=epochs)
    seed_everything(seed)  # torch, numpy, random and pml's sampler order
    models = {
        "trunk": make_trunk(split.input_shape, config.feature_size),
        "embedder": make_embedder(config.feature_size, config.embedding_size),
    }
    trainer = build_trainer(config, split, models, make_loss(tcm))
    with quiet_pml():
        trainer.train(num_epochs=epochs)
    return models


@torch.no_grad()
def embed(models: dict[str, torch.nn.Module], images: np.ndarray) -> np.ndarray:
    """``(N, 1, 28, 28)`` images -> ``(N, D)`` float32 unit-norm embeddings."""
    for model in models.values():
        model.eval()
    parts = []
    for start in range(0, len(images), 256):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + 256]))
        parts.append(models["embedder"](models["trunk"](batch)))
    return torch.nn.functional.normalize(torch.cat(parts), dim=1).numpy()


def evaluate(embeddings, labels, customer_ids, bootstrap: int) -> dict:
    """The calibrated threshold, per-customer FAR/FRR and the OPIS across customers."""
    report = calibrate_threshold(
        embeddings,
        labels,
        target_far=TARGET_FAR,
        groups=customer_ids,
        bootstrap=bootstrap,
        seed=0,
    )
    across = opis(embeddings, labels, groups=customer_ids, bootstrap=bootstrap, seed=0)
    return {"report": report, "opis": across}


# FAR in units of the target (1e-3), FRR in %: both then read with a few decimals.
SCALES = {"far": (1 / TARGET_FAR, 3), "frr": (100.0, 2)}


def _rate(field: str, value: float, interval) -> str:
    scale, digits = SCALES[field]
    if interval is None:
        return f"{scale * value:.{digits}f}"
    lo, hi = interval
    return f"{scale * value:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def _ratio(value: float) -> str:
    return "inf" if np.isinf(value) else f"{value:.3g}"


def print_seed_table(seed: int, results: dict[str, dict], names: list[str]) -> None:
    """Per customer FAR and FRR (with intervals) of both arms, then the worst/best ratios
    and the OPIS across customers."""
    base, tcm = results["base"], results["tcm"]
    print(
        f"\nseed {seed}: one threshold per model for target FAR {TARGET_FAR:g} "
        f"(base {base['report'].threshold:.4f}, TCM {tcm['report'].threshold:.4f}); "
        f"FAR in units of {TARGET_FAR:g}, FRR in %, [95 % bootstrap interval]"
    )
    print("| customer | FAR base | FAR TCM | FRR base | FRR TCM |")
    print("|---|---|---|---|---|")
    for u, name in enumerate(names):
        cells = []
        for field in ("far", "frr"):
            for arm in (base, tcm):
                rates = arm["report"].groups
                interval = getattr(rates, f"{field}_interval")
                cells.append(
                    _rate(
                        field, getattr(rates, field)[u], None if interval is None else interval[u]
                    )
                )
        print(f"| {name} | {' | '.join(cells)} |")
    pooled = [
        _rate(field, getattr(arm["report"], field), getattr(arm["report"], f"{field}_interval"))
        for field in ("far", "frr")
        for arm in (base, tcm)
    ]
    print(f"| all customers | {' | '.join(pooled)} |")
    for field in ("far", "frr"):
        cells = []
        for arm in (base, tcm):
            rates = arm["report"].groups
            worst = names[int(getattr(rates, f"worst_{field}_group"))]
            cells.append(f"{_ratio(getattr(rates, f'{field}_ratio'))} (worst: {worst})")
        print(f"| worst/best {field.upper()} | {' | '.join(cells)} |")
    cells = []
    for arm in (base, tcm):
        result = arm["opis"]
        lo, hi = result.opis_interval if result.opis_interval is not None else (np.nan,) * 2
        cells.append(f"{result.opis:.5f} [{lo:.5f}, {hi:.5f}]")
    print(f"| OPIS across customers | {cells[0]} | {cells[1]} |")


def print_summary(all_results: dict[int, dict[str, dict]]) -> None:
    """Each consistency number per seed, both arms, and TCM's change."""
    seeds = sorted(all_results)
    print(f"\nacross {len(seeds)} seed(s) (per seed: base -> TCM)")
    measures = {
        "worst/best FAR": lambda r: r["report"].groups.far_ratio,
        f"worst-customer FAR (units of {TARGET_FAR:g})": lambda r: (
            r["report"].groups.worst_far / TARGET_FAR
        ),
        "worst/best FRR": lambda r: r["report"].groups.frr_ratio,
        "OPIS across customers": lambda r: r["opis"].opis,
    }
    for title, measure in measures.items():
        pairs = [(measure(all_results[s]["base"]), measure(all_results[s]["tcm"])) for s in seeds]
        shown = ", ".join(f"{b:.4g} -> {t:.4g}" for b, t in pairs)
        lower = sum(t < b for b, t in pairs)
        print(f"{title}: {shown}  (TCM lower in {lower} of {len(pairs)})")


def build_data(data_dir, max_train, max_eval):
    """The open-world split, the customer of every evaluation image and its shifted copy.

    Raises:
        DatasetError: the Fashion-MNIST files are missing or malformed.
    """
    split = fashion_mnist_split(data_dir)
    if max_train is not None or max_eval is not None:
        split = split.subsample(max_train, max_eval, seed=0)
    customer_ids = assign_customers(len(split.eval_y), len(CUSTOMERS), seed=0)
    images = customer_images(split.eval_x, customer_ids, seed=0)
    return split, customer_ids, images


def _load(path: Path, parser: argparse.ArgumentParser) -> np.ndarray:
    if not path.is_file():
        parser.exit(2, f"error: {path} not found (run once without --evaluate-only)\n")
    return np.load(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("customers_results"))
    parser.add_argument("--data-dir", type=Path, default=None, help="the four IDX .gz files")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--max-train", type=int, default=None, help="subsample (quick runs)")
    parser.add_argument("--max-eval", type=int, default=None, help="subsample (quick runs)")
    parser.add_argument(
        "--evaluate-only", action="store_true", help="reuse the embeddings saved under --out"
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "threads"):
        if getattr(args, name) <= 0:
            parser.exit(2, f"error: --{name} must be positive, got {getattr(args, name)}\n")
    if args.bootstrap < 0:
        parser.exit(2, f"error: --bootstrap must be >= 0, got {args.bootstrap}\n")

    torch.set_num_threads(args.threads)
    names = [c.name for c in CUSTOMERS]
    out = args.out
    if args.evaluate_only:
        labels = _load(out / "labels.npy", parser)
        customer_ids = _load(out / "customers.npy", parser)
    else:
        try:
            split, customer_ids, images = build_data(args.data_dir, args.max_train, args.max_eval)
        except DatasetError as error:
            parser.exit(2, f"error: {error}\n")
        labels = split.eval_y
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "labels.npy", labels)
        np.save(out / "customers.npy", customer_ids)
        print(
            f"train on {len(split.train_y)} images of classes 0-4; {len(labels)} evaluation "
            f"images of classes 5-9 over {len(names)} customers: "
            + ", ".join(f"{n} {int((customer_ids == u).sum())}" for u, n in enumerate(names)),
            flush=True,
        )
    paths = {(s, arm): out / f"embeddings_seed{s}_{arm}.npy" for s in args.seeds for arm in ARMS}
    if not args.evaluate_only:
        for (seed, arm), path in paths.items():
            start = time.perf_counter()
            models = train(split, arm == "tcm", args.epochs, seed)
            np.save(path, embed(models, images))
            print(f"trained {ARM_TITLES[arm]}, seed {seed}: {time.perf_counter() - start:.0f} s")
    all_results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        all_results[seed] = {}
        for arm in ARMS:
            embeddings = _load(paths[seed, arm], parser)
            all_results[seed][arm] = evaluate(embeddings, labels, customer_ids, args.bootstrap)
        print_seed_table(seed, all_results[seed], names)
    print_summary(all_results)
    print(
        f"\n{len(args.seeds)} seed(s): TCM's effect is only told from seed noise over several"
        f" seeds; embeddings, labels.npy and customers.npy are in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

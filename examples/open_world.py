"""The open-world experiment of ``pml-tcm demo``, written out with pml's own classes.

Train on classes 0-4 of a data set and evaluate on the unseen classes 5-9: each pml loss
without and with TCM (``with_tcm``), trained by ``trainers.MetricLossOnly`` on
class-balanced batches and tested by ``testers.GlobalEmbeddingSpaceTester`` with
``OPISAccuracyCalculator``. The data, the small networks and each loss's TCM setting
(chosen on validation classes, see docs/benchmarks/tcm_sweep.md) come from
``pml_tcm.demo``; the numbers equal those of ``pml-tcm demo --no-circle`` with the same
settings and seed. One seed cannot separate TCM's effect from seed noise: ``pml-tcm
demo`` runs five seeds, pairs the runs by seed and gives each change a 95 % t-interval.
Exact numbers depend on the CPU (reruns on one machine are bit-identical). ::

    python examples/open_world.py                          # digits, 30 epochs, seed 0
    python examples/open_world.py --dataset fashion-mnist --epochs 8

Needs ``pip install 'pml-tcm[examples]'`` (scikit-learn for the digits).
"""

from __future__ import annotations

import argparse

import torch
from pytorch_metric_learning import losses, samplers, testers, trainers

from pml_tcm import OPISAccuracyCalculator, with_tcm
from pml_tcm.demo.data import load_split
from pml_tcm.demo.experiment import seed_everything
from pml_tcm.demo.models import make_embedder, make_trunk
from pml_tcm.demo.progress import quiet_pml
from pml_tcm.demo.settings import TCMSetting, default_tcm

METRICS = ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis")
FEATURES, EMBEDDING, BATCH, LR = 128, 64, 100, 1e-3


def make_loss(name: str, num_classes: int, tcm: TCMSetting | None) -> losses.BaseMetricLossFunction:
    """A pml loss, with the TCM term added by ``with_tcm`` when ``tcm`` is given."""
    if name == "multisimilarity":
        loss = losses.MultiSimilarityLoss()
    else:
        loss = losses.ArcFaceLoss(num_classes=num_classes, embedding_size=EMBEDDING)
    if tcm is not None:
        loss.embedding_reg_weight = tcm.weight  # lambda: loss = base + weight * TCM
        with_tcm(loss, pos_margin=tcm.pos_margin, neg_margin=tcm.neg_margin)
    return loss


def train(split, loss_name: str, tcm: TCMSetting | None, epochs: int, seed: int) -> dict:
    """Train a trunk and an embedder with pml's MetricLossOnly trainer."""
    seed_everything(seed)  # torch, numpy, random and pml's sampler order (c_f.NUMPY_RANDOM)
    models = {
        "trunk": make_trunk(split.input_shape, FEATURES),
        "embedder": make_embedder(FEATURES, EMBEDDING),
    }
    loss = make_loss(loss_name, split.num_train_classes, tcm)  # ArcFace: seeded class weights
    optimizers = {
        f"{name}_optimizer": torch.optim.Adam(m.parameters(), lr=LR) for name, m in models.items()
    }
    if any(p.requires_grad for p in loss.parameters()):  # ArcFace's class weights
        optimizers["metric_loss_optimizer"] = torch.optim.Adam(loss.parameters(), lr=LR)
    dataset = split.train_dataset()
    sampler = samplers.MPerClassSampler(
        split.train_y,
        m=BATCH // split.num_train_classes,
        batch_size=BATCH,
        length_before_new_iter=len(dataset),
    )
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=BATCH,
        loss_funcs={"metric_loss": loss},
        dataset=dataset,
        sampler=sampler,
        iterations_per_epoch=len(dataset) // BATCH,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=epochs)
    return models


def evaluate(split, models: dict) -> dict[str, float]:
    """R@1, MAP@R, OPIS and ε-OPIS on the unseen classes (query = reference)."""
    calculator = OPISAccuracyCalculator(
        include=METRICS, k="max_bin_count", device=torch.device("cpu")
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        normalize_embeddings=True,
        batch_size=256,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=calculator,
    )
    unseen = {"unseen": split.eval_dataset()}
    accuracies = tester.test(unseen, 1, models["trunk"], models["embedder"])["unseen"]
    return {name: float(accuracies[f"{name}_level0"]) for name in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.dataset == "digits":
        torch.set_num_threads(1)  # the tiny MLP runs fastest on one thread (as the demo)
    split = load_split(args.dataset)
    print(
        f"{args.dataset}: train on {len(split.train_y)} images of classes 0-4, "
        f"test on {len(split.eval_y)} of the unseen classes 5-9"
    )
    print("| loss | TCM | R@1 | MAP@R | OPIS | ε-OPIS |")
    print("|---|---|---|---|---|---|")
    for name in ("multisimilarity", "arcface"):
        setting = default_tcm(args.dataset, name)  # chosen on validation classes
        for tcm in (None, setting):
            with quiet_pml():  # no tqdm bar per epoch
                models = train(split, name, tcm, args.epochs, args.seed)
                metrics = evaluate(split, models)
            shown = "no" if tcm is None else f"weight {tcm.weight:g}"
            values = " | ".join(f"{metrics[m]:.6f}" for m in METRICS)
            print(f"| {name} | {shown} | {values} |", flush=True)
    print(
        f"One seed ({args.seed}): it cannot separate TCM's effect from seed noise; "
        "`pml-tcm demo` pairs five seeds and gives each change a 95 % t-interval."
    )


if __name__ == "__main__":
    main()

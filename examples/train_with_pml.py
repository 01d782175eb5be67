"""Train an embedding with pml's own trainer, TCM attached, and keep the most
threshold-consistent epoch.

The pml workflow, unchanged: `trainers.MetricLossOnly`, `logging_presets` hooks with
record-keeper, `testers.GlobalEmbeddingSpaceTester`. pml-tcm adds three things:

* `with_tcm(loss)` — the TCM term on top of the metric loss;
* `OPISAccuracyCalculator` — OPIS and ε-OPIS beside pml's accuracies, and `"neg_opis"`
  so that the hooks keep the epoch with the *lowest* OPIS;
* `calibrate_threshold` — the one threshold to ship, with its per-class error rates.

Data: scikit-learn's handwritten digits (bundled, no download). Train on digits 0-4,
select the epoch on 5-6, report on the unseen digits 7-9.

    pip install "pml-tcm[examples]" record-keeper tensorboard
    python examples/train_with_pml.py --epochs 5 --out runs/example
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners, samplers, testers, trainers
from pytorch_metric_learning.utils import logging_presets
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from pml_tcm import OPISAccuracyCalculator, TCMRegularizer, calibrate_threshold, with_tcm


def digits(classes: range) -> TensorDataset:
    data = load_digits()
    keep = [i for i, label in enumerate(data.target) if label in classes]
    x = torch.tensor(data.data[keep], dtype=torch.float32) / 16.0
    return TensorDataset(x, torch.tensor(data.target[keep]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="training epochs (default 5)")
    parser.add_argument("--tcm-weight", type=float, default=1.0, help="embedding_reg_weight")
    parser.add_argument("--out", type=Path, default=Path("runs/example"), help="output folder")
    args = parser.parse_args()
    logging.getLogger("PML").setLevel(logging.WARNING)
    torch.manual_seed(0)

    train, val, test = digits(range(0, 5)), digits(range(5, 7)), digits(range(7, 10))
    trunk = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU())
    embedder = torch.nn.Linear(128, 32)

    # 1. The loss: any pml loss, with the TCM term attached (stats go to the records).
    loss = with_tcm(
        losses.MultiSimilarityLoss(),
        regularizer=TCMRegularizer(pos_margin=0.9, neg_margin=0.5, collect_stats=True),
    )
    loss.embedding_reg_weight = args.tcm_weight

    # 2. pml's logging hooks; the best epoch is the one with the highest -OPIS.
    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(args.out / "logs"), str(args.out / "tensorboard")
    )
    hooks = logging_presets.get_hook_container(record_keeper, primary_metric="neg_opis")
    calculator = OPISAccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis", "neg_opis"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=calculator,
        dataloader_num_workers=0,
    )
    end_of_epoch_hook = hooks.end_of_epoch_hook(
        tester, {"val": val}, str(args.out / "models"), test_interval=1, patience=3
    )

    # 3. pml's trainer, as usual. The miner picks the base loss's pairs; TCM sees all pairs.
    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers={
            "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=1e-3),
            "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=1e-3),
        },
        batch_size=64,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner(epsilon=0.1)},
        dataset=train,
        sampler=samplers.MPerClassSampler(
            train.tensors[1], m=16, batch_size=64, length_before_new_iter=len(train)
        ),
        dataloader_num_workers=0,
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    trainer.train(num_epochs=args.epochs)

    # 4. Reload the lowest-OPIS epoch and evaluate it on the unseen digits.
    best_epoch, best = hooks.get_best_epoch_and_accuracy(tester, "val")
    hooks.load_latest_saved_models(trainer, str(args.out / "models"), "cpu", best=True)
    print(f"best epoch {best_epoch}: validation OPIS {-best:.4g}")
    metrics = tester.test({"test": test}, best_epoch, trunk, embedder)
    for name in ("precision_at_1", "mean_average_precision_at_r", "opis", "eps_opis"):
        print(f"test {name}: {metrics['test'][f'{name}_level0']:.4g}")

    # 5. The threshold to ship, with its per-class error rates on the unseen digits.
    embeddings, labels = tester.get_all_embeddings(test, trunk, embedder)
    report = calibrate_threshold(embeddings, labels.squeeze(1), target_far=1e-2)
    print(report.summary())


if __name__ == "__main__":
    main()

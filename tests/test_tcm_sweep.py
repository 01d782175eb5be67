"""benchmarks/tcm_sweep.py: a tiny sweep end to end (caching, resuming, report), and the
report's statistics against scipy and naive loops."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tcm_sweep  # noqa: E402
import tcm_sweep_report as report  # noqa: E402

from pml_tcm import TCMRegularizer  # noqa: E402

TINY = [
    "--datasets", "digits", "--losses", "contrastive", "--weights", "0", "1",
    "--margins", "0.9", "0.5", "--val-seeds", "2", "--test-seeds", "2", "--epochs", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list, list]:
    out = tmp_path_factory.mktemp("sweep")
    assert tcm_sweep.main([*TINY, "--out", str(out)]) == 0
    args = tcm_sweep.parse_args([*TINY, "--out", str(out)])
    specs = tcm_sweep.build_specs(args)
    return out, specs, tcm_sweep.all_runs(specs)


def test_every_run_is_cached_with_its_metrics(tiny_sweep: tuple[Path, list, list]) -> None:
    out, _, configs = tiny_sweep
    files = sorted(out.glob("digits/*/*.json"))
    # 2 phases x 2 weights x 2 seeds
    assert len(configs) == 8 and len(files) == 8
    for config in configs:
        result = json.loads(config.path(out).read_text())
        assert result["config"]["weight"] == config.weight
        metrics = result["metrics"]
        assert set(metrics) == set(tcm_sweep.METRICS)
        assert all(math.isfinite(v) for v in metrics.values())
        assert 0 <= metrics["precision_at_1"] <= 1 and metrics["opis"] >= 0


def test_rerun_skips_finished_runs_and_redoes_stale_ones(
    tiny_sweep: tuple[Path, list, list],
) -> None:
    out, _, configs = tiny_sweep
    mtimes = {c: c.path(out).stat().st_mtime_ns for c in configs}
    lines: list[str] = []
    counts = tcm_sweep.run_sweep(configs, out, log=lambda *a, **k: lines.append(a[0]))
    assert counts == {"cached": 8, "ran": 0}
    assert lines == ["8 runs, 8 cached, 0 to run"]
    assert all(c.path(out).stat().st_mtime_ns == mtimes[c] for c in configs)
    # A file written by another configuration (here: other epochs) is not a cache hit.
    stale = configs[0].path(out)
    payload = json.loads(stale.read_text())
    payload["config"]["epochs"] = 99
    stale.write_text(json.dumps(payload))
    lines.clear()
    counts = tcm_sweep.run_sweep(configs, out, log=lambda *a, **k: lines.append(a[0]))
    assert counts == {"cached": 7, "ran": 1}
    assert lines[1].startswith("run 1/8 digits/val/contrastive_w0_m0.9-0.5_s0: R@1 ")
    assert json.loads(stale.read_text())["config"]["epochs"] == 1


def test_splits_keep_train_validation_and_test_classes_apart() -> None:
    arrays = tcm_sweep.load_arrays("digits")
    for phase, train_classes, eval_classes in (
        ("val", {0, 1, 2}, {3, 4}),
        ("test", {0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}),
    ):
        config = tcm_sweep.RunConfig("digits", phase, "contrastive", 0.0, 0.9, 0.5, 0, 1)
        _, train_y, _, eval_y = tcm_sweep.make_split(arrays, config)
        assert set(train_y.tolist()) == train_classes
        assert set(eval_y.tolist()) == eval_classes


def test_weight_zero_is_the_plain_loss_and_positive_weights_attach_tcm() -> None:
    base = tcm_sweep.RunConfig("digits", "test", "arcface", 0.0, 0.9, 0.5, 0, 1)
    assert tcm_sweep.build_loss(base, 5).embedding_regularizer is None
    treated = tcm_sweep.RunConfig("digits", "test", "arcface", 0.3, 0.8, 0.3, 0, 1)
    loss = tcm_sweep.build_loss(treated, 5)
    assert isinstance(loss.embedding_regularizer, TCMRegularizer)
    assert loss.embedding_reg_weight == 0.3
    assert (loss.embedding_regularizer.pos_margin, loss.embedding_regularizer.neg_margin) == (
        0.8,
        0.3,
    )


def test_report_numbers_match_the_run_files(tiny_sweep: tuple[Path, list, list]) -> None:
    out, specs, configs = tiny_sweep
    summary = report.write_report(specs, configs, out)
    assert (out / "report.md").read_text().startswith("# TCM sweep report")
    assert (out / "tcm_sweep_pareto.png").stat().st_size > 10_000
    assert summary["runs_finished"] == 8
    # Recompute the weight-1 test point's paired OPIS difference from the JSON files.
    by_seed = {}
    for weight in (0.0, 1.0):
        by_seed[weight] = [
            json.loads(c.path(out).read_text())["metrics"]["opis"]
            for c in sorted(configs, key=lambda c: c.seed)
            if c.phase == "test" and c.weight == weight
        ]
    expected = stats.ttest_rel(by_seed[1.0], by_seed[0.0]).confidence_interval(0.95)
    (point,) = [
        p
        for p in summary["datasets"]["digits"]["points"]
        if p["phase"] == "test" and p["weight"] == 1.0
    ]
    paired = point["opis"]["paired_vs_no_tcm"]
    assert paired["n"] == 2
    assert paired["mean"] == pytest.approx(np.mean(by_seed[1.0]) - np.mean(by_seed[0.0]))
    assert (paired["low"], paired["high"]) == pytest.approx((expected.low, expected.high))


def test_paired_difference_matches_scipy_paired_t() -> None:
    rng = np.random.default_rng(3)
    for n in (2, 5, 10):
        a, b = rng.normal(size=n), rng.normal(size=n)
        d = report.paired_difference(a, b)
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        diffs = [x - y for x, y in zip(a, b, strict=True)]
        assert d.n == n
        assert d.mean == pytest.approx(sum(diffs) / n)
        assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
        assert d.baseline_mean == pytest.approx(sum(b) / n)
    with pytest.raises(ValueError, match="at least 2"):
        report.paired_difference([1.0], [0.0])
    with pytest.raises(ValueError, match="same length"):
        report.paired_difference([1.0, 2.0], [0.0])


def test_mean_ci_matches_scipy_one_sample_t() -> None:
    values = np.random.default_rng(4).normal(3.0, 2.0, size=7)
    mean, half = report.mean_ci(values)
    ci = stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    assert mean == pytest.approx(values.mean())
    assert (mean - half, mean + half) == pytest.approx((ci.low, ci.high))


def _naive_selection(results: dict, dataset: str, loss: str) -> tuple:
    """The rule written out: R@1 within 1 pt of no TCM, then the lowest OPIS."""
    rows = []
    for point, runs in results.items():
        if point[0] == dataset and point[1] == "val" and point[2] == loss:
            r1 = sum(m["precision_at_1"] for m in runs.values()) / len(runs)
            opis = sum(m["opis"] for m in runs.values()) / len(runs)
            rows.append((point, r1, opis))
    base_r1 = [r1 for point, r1, _ in rows if point[3] == 0][0]
    eligible = [row for row in rows if row[1] >= base_r1 - 0.01]
    return min(eligible, key=lambda row: row[2])[0]


def test_select_weight_matches_the_rule_written_out() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        results = {}
        for weight in (0.0, 0.1, 0.3, 1.0, 3.0):
            for margins in ((0.9, 0.5), (0.8, 0.3)):
                if weight == 0 and margins != (0.9, 0.5):
                    continue
                results[("d", "val", "ms", weight, *margins)] = {
                    seed: {"precision_at_1": rng.uniform(0.9, 0.93), "opis": rng.uniform(0, 1)}
                    for seed in range(3)
                }
        chosen = report.select_weight(results, "d", "ms", (0.9, 0.5))
        assert chosen == _naive_selection(results, "d", "ms")
    assert report.select_weight({}, "d", "ms", (0.9, 0.5)) is None

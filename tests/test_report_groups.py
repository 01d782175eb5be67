"""``pml-tcm report --groups`` and the intervals: per-group FAR/FRR at the threshold against
a naive float64 computation from the saved files, the group and class OPIS side by side,
readable output with many groups, the group figure in the file set, bad ``--groups``
refused before any work."""

from __future__ import annotations

import json
import math
import re

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from _opis_reference import naive_opis  # noqa: E402

from pml_tcm import calibrate_threshold  # noqa: E402
from pml_tcm.cli import main  # noqa: E402
from pml_tcm.plotting import plot_group_rates  # noqa: E402


def _customers(num_groups: int, per_group: int, classes: int = 6, seed: int = 0, dim: int = 8):
    """Queries of ``classes`` classes from ``num_groups`` customers, each customer's
    images noisier than the last (a shift the per-group rates should show)."""
    rng = np.random.RandomState(seed)
    groups = np.repeat(np.arange(num_groups), per_group)
    labels = rng.randint(0, classes, groups.size)
    noise = 0.5 + 0.6 * groups / max(1, num_groups - 1)
    centres = rng.randn(classes, dim)
    x = centres[labels] + noise[:, None] * rng.randn(groups.size, dim)
    return x.astype(np.float32), labels, groups


def _save(folder, x, y, g=None):
    np.save(folder / "emb.npy", x)
    np.save(folder / "labels.npy", y)
    args = ["report", str(folder / "emb.npy"), str(folder / "labels.npy"), "--device", "cpu"]
    if g is not None:
        np.save(folder / "groups.npy", g)
        args += ["--groups", str(folder / "groups.npy")]
    return args


def _similarities(x):
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return unit @ unit.T


def _naive_group_rates(sims, labels, groups, threshold):
    """Per-group FAR and FRR: the pairs whose query is in the group, self pairs skipped,
    a pair accepted at ``>= threshold``."""
    same = labels[:, None] == labels[None, :]
    valid = ~np.eye(len(labels), dtype=bool)
    accepted = sims >= threshold
    rates = {}
    for group in np.unique(groups):
        rows = (groups == group)[:, None]
        negative, positive = rows & ~same & valid, rows & same & valid
        rates[group.item()] = (
            accepted[negative].sum() / negative.sum(),
            (~accepted[positive]).sum() / positive.sum(),
            negative.sum(),
            positive.sum(),
        )
    return rates


def _naive_group_opis(sims, labels, groups, lo, hi, epsilon=0.1, num_thresholds=1000):
    """OPIS and ε-OPIS with the groups in place of the classes (F1 utility)."""
    grid = np.linspace(lo, hi, num_thresholds)
    same = labels[:, None] == labels[None, :]
    valid = ~np.eye(len(labels), dtype=bool)

    def curve(rows):
        pos, neg = sims[rows & same & valid], sims[rows & ~same & valid]
        tp = np.array([(pos >= t).sum() for t in grid], dtype=np.float64)
        fp = np.array([(neg >= t).sum() for t in grid], dtype=np.float64)
        den = 2 * tp + (pos.size - tp) + fp
        return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)

    def mean(values):
        return float(np.trapezoid(values, grid) / (hi - lo))

    pooled = curve(np.ones((len(labels), 1), dtype=bool))
    curves = [curve((groups == g)[:, None]) for g in np.unique(groups)]
    opis = float(np.mean([mean((u - pooled) ** 2) for u in curves]))
    order = sorted(range(len(curves)), key=lambda i: mean(curves[i]))
    worst = max(1, math.ceil(epsilon * len(curves)))
    gap = np.mean([curves[i] for i in order[:worst]], 0) - np.mean(
        [curves[i] for i in order[worst:]], 0
    )
    return opis, mean(gap**2)


def _section(markdown: str, heading: str) -> str:
    return markdown.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def _table_rows(text: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| group |")
    ]


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    x, y, g = _customers(4, 60)
    args = _save(folder, x, y, g)
    out = folder / "out"
    code = main(args + ["--out", str(out), "--target-far", "0.01", "--bootstrap", "300"])
    assert code == 0
    document = json.loads((out / "report.json").read_text())
    return x, y, g, out, document


def test_per_group_rates_match_a_naive_float64_computation(grouped_run):
    x, y, g, _, document = grouped_run
    sims = _similarities(x)
    threshold = document["calibration"]["threshold"]
    naive = _naive_group_rates(sims, y, g, threshold)
    table = {row["group"]: row for row in document["groups"]["table"]}
    assert sorted(table) == sorted(naive)
    for group, (far, frr, negatives, positives) in naive.items():
        row = table[group]
        assert (row["negatives"], row["positives"]) == (negatives, positives)
        # float32 scores: a pair or two tied with the threshold may fall either way
        assert row["far"] == pytest.approx(far, abs=2.5 / negatives)
        assert row["frr"] == pytest.approx(frr, abs=2.5 / positives)
    fars = {group: rates[0] for group, rates in naive.items()}
    frrs = {group: rates[1] for group, rates in naive.items()}
    groups = document["groups"]
    assert groups["worst_far_group"] == max(fars, key=fars.get)
    assert groups["worst_frr_group"] == max(frrs, key=frrs.get)
    assert groups["best_frr_group"] == min(frrs, key=frrs.get)
    assert groups["frr_ratio"] == pytest.approx(max(frrs.values()) / min(frrs.values()), rel=0.05)
    assert groups["num_groups"] == 4


def test_class_opis_stays_the_class_opis_and_group_opis_is_over_the_groups(grouped_run):
    x, y, g, _, document = grouped_run
    sims = _similarities(x)
    by_class = naive_opis(sims, y, y, 0)
    metrics = document["metrics"]
    assert metrics["opis"] == pytest.approx(by_class["opis"], rel=1e-3)
    assert metrics["eps_opis"] == pytest.approx(by_class["eps_opis"], rel=1e-3)
    group_opis, group_eps_opis = _naive_group_opis(sims, y, g, by_class["lo"], by_class["hi"])
    assert metrics["group_opis"] == pytest.approx(group_opis, rel=1e-3)
    assert metrics["group_eps_opis"] == pytest.approx(group_eps_opis, rel=1e-3)
    assert document["groups"]["opis"] == metrics["group_opis"]
    # the worst-classes table stays per class
    assert {row["label"] for row in document["worst_classes"]} <= set(np.unique(y).tolist())


def test_intervals_are_in_the_json_and_bracket_the_point_values(grouped_run):
    *_, document = grouped_run
    intervals, metrics = document["intervals"], document["metrics"]
    assert intervals["bootstrap"] == 300 and intervals["confidence"] == 0.95
    for name in ("opis", "eps_opis", "group_opis", "group_eps_opis"):
        lo, hi = intervals[name]
        assert lo < hi and lo <= metrics[name] <= hi, name
    calibration = document["calibration"]
    for name in ("far", "frr"):
        lo, hi = calibration[f"{name}_interval"]
        assert lo < calibration[name] < hi, name
    for row in document["groups"]["table"]:
        for name in ("far", "frr"):
            lo, hi = row[f"{name}_interval"]
            assert lo <= row[name] <= hi and lo < hi, (row["group"], name)
    assert document["settings"]["bootstrap"] == 300


def test_the_groups_section_reads_the_rates_and_the_figure_is_in_the_set(grouped_run):
    *_, out, document = grouped_run
    markdown = (out / "report.md").read_text()
    section = _section(markdown, "Groups")
    rows = _table_rows(section)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]  # 4 <= --worst: all, in order
    for row, entry in zip(rows, document["groups"]["table"]):
        assert row[1] == f"{entry['far']:.4g} ({100 * entry['far']:.4g}%)"
        lo, hi = entry["frr_interval"]
        assert row[4] == f"{lo:.4g} .. {hi:.4g} ({100 * lo:.4g}% .. {100 * hi:.4g}%)"
    verdict = document["groups"]["frr_verdict"]
    assert verdict in ("distinguishable", "within the intervals")
    worst, best = (
        next(r for r in document["groups"]["table"] if r["group"] == document["groups"][key])
        for key in ("worst_frr_group", "best_frr_group")
    )
    expected = "distinguishable" if worst["frr_interval"][0] > best["frr_interval"][1] else "within"
    assert verdict.startswith(expected)
    assert f"the gap is {verdict}" in " ".join(section.split()) or (
        verdict == "within the intervals" and "the gap is within the intervals" in section
    )
    assert "![Per-group FAR and FRR at the threshold](group_rates.png)" in section
    assert (out / "group_rates.png").read_bytes().startswith(b"\x89PNG")
    assert set(document["files"]) == {"report.md", "utility_curves.png", "group_rates.png"}


def test_many_groups_list_the_worst_few_and_keep_every_group_in_the_json(tmp_path, capsys):
    x, y, g = _customers(200, 6, classes=10)
    args = _save(tmp_path, x, y, g)
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--worst", "4", "--bootstrap", "50"]) == 0
    printed = capsys.readouterr().out
    document = json.loads((out / "report.json").read_text())
    assert len(document["groups"]["table"]) == 200
    section = _section((out / "report.md").read_text(), "Groups")
    rows = _table_rows(section)
    assert len(rows) == 8  # the 4 worst by FAR and the 4 worst by FRR
    by_far = sorted(document["groups"]["table"], key=lambda row: -row["far"])
    assert [row[0] for row in rows[:4]] == [str(row["group"]) for row in by_far[:4]]
    assert "The 4 of 200 groups with the highest FAR" in section
    groups_part = printed.split("\ngroups:\n", 1)[1].split("\nworst classes", 1)[0]
    printed_rows = [line for line in groups_part.splitlines() if re.match(r"\| \d+ \| ", line)]
    assert len(printed_rows) == 8
    assert len((out / "report.md").read_text().splitlines()) < 120


def test_without_groups_there_is_no_group_figure_and_an_older_one_is_removed(tmp_path, capsys):
    x, y, g = _customers(3, 40)
    args = _save(tmp_path, x, y, g)
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--bootstrap", "20"]) == 0
    assert (out / "group_rates.png").exists()
    plain = args[: args.index("--groups")]
    assert main(plain + ["--out", str(out), "--bootstrap", "20"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "report.json",
        "report.md",
        "utility_curves.png",
    ]
    document = json.loads((out / "report.json").read_text())
    assert "groups" not in document and "group_opis" not in document["metrics"]
    assert "## Groups" not in (out / "report.md").read_text()


def test_bootstrap_0_gives_no_intervals(tmp_path, capsys):
    x, y, g = _customers(3, 40)
    args = _save(tmp_path, x, y, g)
    assert main(args + ["--out", str(tmp_path / "out"), "--bootstrap", "0"]) == 0
    printed = capsys.readouterr().out
    document = json.loads((tmp_path / "out" / "report.json").read_text())
    assert document["intervals"] == {"bootstrap": 0, "confidence": None}
    assert document["calibration"]["far_interval"] is None
    assert all(row["far_interval"] is None for row in document["groups"]["table"])
    assert document["groups"]["opis_interval"] is None
    assert document["groups"]["far_verdict"] is None
    assert "interval" not in printed.split("groups:")[0]
    assert "without intervals (--bootstrap 0)" in " ".join(printed.split())


def test_confidence_sets_the_level_of_the_intervals(tmp_path, capsys):
    x, y, _ = _customers(3, 40)
    args = _save(tmp_path, x, y)
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--bootstrap", "100", "--confidence", "0.5"]) == 0
    narrow = json.loads((out / "report.json").read_text())
    assert main(args + ["--out", str(out), "--bootstrap", "100", "--confidence", "0.99"]) == 0
    wide = json.loads((out / "report.json").read_text())
    assert "50% interval" in capsys.readouterr().out
    for name in ("opis", "eps_opis"):
        (a, b), (c, d) = narrow["intervals"][name], wide["intervals"][name]
        assert c <= a and b <= d and (d - c) > (b - a)


@pytest.mark.parametrize(
    "groups, extra, phrase",
    [
        (np.arange(10) % 2, [], "has 10 group ids but there are 120 embeddings"),
        (np.where(np.arange(120) == 7, np.nan, np.arange(120) % 3), [], "contains NaN"),
        (np.zeros(120, dtype=np.int64), [], "every query is in one group (0)"),
        ((np.arange(240) % 2).reshape(120, 2), [], "must be a 1-D array"),
        (np.array(["a"] * 120), [], "must hold group ids"),
        (np.arange(120) % 2, ["--bootstrap", "1"], "--bootstrap takes 0"),
        (np.arange(120) % 2, ["--bootstrap", "-5"], "--bootstrap takes 0"),
        (np.arange(120) % 2, ["--confidence", "1"], "--confidence must be a level in (0, 1)"),
        (np.arange(120) % 2, ["--confidence", "0"], "--confidence must be a level in (0, 1)"),
        (None, [], "groups file"),  # a missing file
    ],
)
def test_bad_groups_and_interval_settings_are_one_line_exit_2_before_any_work(
    tmp_path, capsys, monkeypatch, groups, extra, phrase
):
    import pml_tcm.report.command as command

    monkeypatch.setattr(command, "compute_report", lambda *a, **k: pytest.fail("computed"))
    x, y, _ = _customers(2, 60)
    args = _save(tmp_path, x, y)
    path = tmp_path / "groups.npy"
    if groups is not None:
        np.save(path, groups)
    out = tmp_path / "out"
    assert main(args + ["--groups", str(path), "--out", str(out), *extra]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err
    assert lines[0].startswith("pml-tcm report: error:") and phrase in lines[0], lines[0]
    assert not out.exists() and captured.out == ""


def _report(num_groups, per_group, bootstrap=100):
    x, y, g = _customers(num_groups, per_group, classes=10)
    report = calibrate_threshold(
        torch.from_numpy(x),
        torch.from_numpy(y),
        target_far=1e-2,
        groups=torch.from_numpy(g),
        bootstrap=bootstrap,
    )
    naive = _naive_group_rates(_similarities(x), y, g, report.threshold)
    return report, naive


def test_group_figure_names_every_group_when_few(tmp_path):
    report, naive = _report(5, 60)
    figure = plot_group_rates(report)
    far_axes, frr_axes = figure.axes[:2]
    expected = sorted(naive, key=lambda group: -naive[group][1])  # by FRR, worst first
    assert [t.get_text() for t in frr_axes.get_xticklabels()] == [f"group {g}" for g in expected]
    points = frr_axes.lines[0].get_ydata()
    assert points == pytest.approx([naive[g][1] for g in expected], abs=0.02)
    assert any(line.get_label().startswith("pooled FRR") for line in frr_axes.lines)
    assert len(far_axes.collections) >= 1  # the error bars
    figure.savefig(tmp_path / "five.png")


def test_group_figure_with_200_groups_names_only_the_worst(tmp_path):
    report, naive = _report(200, 5)
    figure = plot_group_rates(report, label_worst=3)
    far_axes = figure.axes[0]
    assert not any("group" in t.get_text() for t in far_axes.get_xticklabels())
    worst = sorted((g for g in naive), key=lambda group: (-naive[group][0], group))[:3]
    legend = " ".join(t.get_text() for t in far_axes.get_legend().get_texts())
    legend = " ".join(legend.split())
    assert "worst 3, left to right: " + ", ".join(f"group {g}" for g in worst) in legend
    assert len(far_axes.lines[0].get_xdata()) == 200
    figure.savefig(tmp_path / "many.png")


def test_group_figure_needs_groups():
    x, y, _ = _customers(2, 30)
    report = calibrate_threshold(torch.from_numpy(x), torch.from_numpy(y), target_far=1e-2)
    with pytest.raises(ValueError, match="no groups"):
        plot_group_rates(report)


def test_summary_and_report_state_the_interval_level_as_given():
    x, y, g = _customers(3, 40)
    report = calibrate_threshold(
        torch.from_numpy(x),
        torch.from_numpy(y),
        target_far=1e-2,
        groups=torch.from_numpy(g),
        bootstrap=50,
        confidence=0.975,
    )
    text = report.summary()
    assert "97.5% interval" in text and "98% interval" not in text
    lo, hi = report.far_interval
    assert f"FAR {report.far:.4%} (97.5% interval {lo:.4%} to {hi:.4%})" in text


def test_groups_with_a_reference_set_are_the_queries_groups(tmp_path, capsys):
    x, y, g = _customers(3, 50)
    rng = np.random.RandomState(5)
    gallery = x[::2] + 0.05 * rng.randn(*x[::2].shape).astype(np.float32)
    gallery_labels = y[::2]
    args = _save(tmp_path, x, y, g)
    np.save(tmp_path / "ref.npy", gallery)
    np.save(tmp_path / "ref_labels.npy", gallery_labels)
    out = tmp_path / "out"
    reference = ["--reference", str(tmp_path / "ref.npy")]
    reference += ["--reference-labels", str(tmp_path / "ref_labels.npy")]
    assert main(args + reference + ["--out", str(out), "--target-far", "0.02"]) == 0
    document = json.loads((out / "report.json").read_text())
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    ref = gallery.astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    sims = unit @ ref.T  # every query against every reference: no self pair to skip
    same = y[:, None] == gallery_labels[None, :]
    accepted = sims >= document["calibration"]["threshold"]
    for row in document["groups"]["table"]:
        rows = (g == row["group"])[:, None]
        negatives, positives = (rows & ~same).sum(), (rows & same).sum()
        assert (row["negatives"], row["positives"]) == (negatives, positives)
        assert row["far"] == pytest.approx(
            accepted[rows & ~same].sum() / negatives, abs=2.5 / negatives
        )
        assert row["frr"] == pytest.approx(
            (~accepted[rows & same]).sum() / positives, abs=2.5 / positives
        )


def test_a_group_without_positive_pairs_has_no_frr_and_is_counted(tmp_path, capsys):
    x, y, g = _customers(3, 50)
    # one query alone in group 9 and the only one of its class: no positive pair
    x = np.concatenate([x, 3 * np.ones((1, x.shape[1]), dtype=np.float32)])
    y, g = np.append(y, 99), np.append(g, 9)
    args = _save(tmp_path, x, y, g)
    out = tmp_path / "out"
    assert main(args + ["--out", str(out), "--bootstrap", "50"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    document = json.loads((out / "report.json").read_text())
    lonely = next(row for row in document["groups"]["table"] if row["group"] == 9)
    assert lonely["positives"] == 0 and lonely["frr"] is None
    assert lonely["frr_interval"] == [None, None]
    groups = document["groups"]
    assert groups["without_positives"] == 1 and 9 not in (
        groups["worst_frr_group"],
        groups["best_frr_group"],
    )
    assert 9 in groups["excluded_groups"]  # left out of the group OPIS, as classes are
    assert "1 group(s) have no such pairs and no FRR" in printed

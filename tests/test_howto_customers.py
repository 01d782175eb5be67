"""examples/one_threshold_many_customers.py: its customers are disjoint, cover every
evaluation image and change the pixels as documented; the script runs end to end on fake
Fashion-MNIST IDX files (CI has no data set) and prints per-customer rates that a naive
count over the saved embeddings reproduces."""

from __future__ import annotations

import gzip
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "one_threshold_many_customers.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("one_threshold_many_customers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _customer(example, kind):
    return next(c for c in example.CUSTOMERS if c.kind == kind)


@pytest.mark.parametrize("n, u", [(10, 3), (5000, 5), (7, 7), (1, 1)])
def test_customers_are_disjoint_near_equal_and_cover_every_sample(example, n, u):
    ids = example.assign_customers(n, u, seed=3)
    assert ids.shape == (n,)
    assert ids.dtype == np.int64
    counts = np.bincount(ids, minlength=u)
    assert counts.size == u  # no id outside 0..u-1
    assert counts.sum() == n  # one customer per sample: disjoint and covering
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(ids, example.assign_customers(n, u, seed=3))


def test_customers_depend_on_the_seed_and_are_not_contiguous(example):
    a = example.assign_customers(1000, 5, seed=0)
    b = example.assign_customers(1000, 5, seed=1)
    assert (a != b).any()
    assert (np.diff(a) != 0).sum() > 100  # a random split, not five blocks in a row


@pytest.mark.parametrize("n, u", [(3, 4), (3, 0)])
def test_bad_number_of_customers_is_refused(example, n, u):
    with pytest.raises(ValueError, match="num_customers"):
        example.assign_customers(n, u)


def test_five_documented_customers(example):
    kinds = [c.kind for c in example.CUSTOMERS]
    assert kinds == ["clean", "contrast", "noise", "blur", "brightness"]
    assert len({c.name for c in example.CUSTOMERS}) == 5
    assert all(c.why for c in example.CUSTOMERS)


def _images(seed=0, n=4):
    return np.random.default_rng(seed).random((n, 1, 28, 28)).astype(np.float32)


def test_clean_contrast_and_brightness_follow_their_formulas(example):
    x = _images()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(example.shift_images(x, _customer(example, "clean"), rng), x)
    contrast = _customer(example, "contrast")
    out = example.shift_images(x, contrast, rng)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5 + contrast.amount * (x.astype(np.float64) - 0.5), atol=1e-6)
    assert out.min() >= 0.5 - contrast.amount / 2 - 1e-6
    assert out.max() <= 0.5 + contrast.amount / 2 + 1e-6
    bright = _customer(example, "brightness")
    out = example.shift_images(x, bright, rng)
    np.testing.assert_allclose(out, np.minimum(x + bright.amount, 1.0), atol=1e-6)


def test_noise_has_the_documented_spread_and_follows_the_seed(example):
    noise = _customer(example, "noise")
    grey = np.full((200, 1, 28, 28), 0.5, dtype=np.float32)  # far from the clip at 0 and 1
    out = example.shift_images(grey, noise, np.random.default_rng(5))
    residual = out.astype(np.float64) - 0.5
    assert abs(residual.mean()) < 0.002
    assert residual.std() == pytest.approx(noise.amount, rel=0.01)
    again = example.shift_images(grey, noise, np.random.default_rng(5))
    np.testing.assert_array_equal(out, again)
    other = example.shift_images(grey, noise, np.random.default_rng(6))
    assert (out != other).any()
    x = _images()
    clipped = example.shift_images(x, noise, np.random.default_rng(0))
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def _naive_blur(image, sigma):
    """2-D Gaussian convolution written out: zero outside the image, radius ceil(3 sigma),
    weights normalised over the square window."""
    radius = math.ceil(3 * sigma)
    weights = {
        (dy, dx): math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
        for dy in range(-radius, radius + 1)
        for dx in range(-radius, radius + 1)
    }
    total = sum(weights.values())
    height, width = image.shape
    out = np.zeros((height, width))
    for y in range(height):
        for x in range(width):
            for (dy, dx), w in weights.items():
                if 0 <= y + dy < height and 0 <= x + dx < width:
                    out[y, x] += w * image[y + dy, x + dx]
    return out / total


def test_blur_is_a_gaussian_blur_with_zero_padding(example):
    blur = _customer(example, "blur")
    x = _images(n=2)[:, :, :12, :10].copy()  # small, non-square: rows and columns differ
    out = example.shift_images(x, blur, np.random.default_rng(0))
    for i in range(2):
        np.testing.assert_allclose(out[i, 0], _naive_blur(x[i, 0], blur.amount), atol=1e-6)
    dot = np.zeros((1, 1, 28, 28), dtype=np.float32)
    dot[0, 0, 14, 14] = 1.0
    spread = example.shift_images(dot, blur, np.random.default_rng(0))
    assert spread.sum() == pytest.approx(1.0, abs=1e-6)  # mass kept away from the border
    assert spread[0, 0, 14, 14] < 0.2


def test_every_customer_gets_its_own_transform(example):
    x = _images(n=50)
    ids = example.assign_customers(50, 5, seed=0)
    shifted = example.customer_images(x, ids, seed=0)
    np.testing.assert_array_equal(shifted[ids == 0], x[ids == 0])  # clean
    amount = _customer(example, "contrast").amount
    np.testing.assert_allclose(shifted[ids == 1], 0.5 + amount * (x[ids == 1] - 0.5), atol=1e-6)
    bright = _customer(example, "brightness").amount
    np.testing.assert_allclose(shifted[ids == 4], np.minimum(x[ids == 4] + bright, 1), atol=1e-6)
    for u in (2, 3):
        assert (shifted[ids == u] != x[ids == u]).any()
    np.testing.assert_array_equal(shifted, example.customer_images(x, ids, seed=0))
    assert (shifted[ids == 2] != example.customer_images(x, ids, seed=1)[ids == 2]).any()


# --- the script end to end, on fake IDX files ----------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as the format defines it: 0, 0, type 0x08 (uint8), rank, big-endian
    uint32 sizes, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, per_class: int = 20) -> None:
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10), per_class)
        # each class a bright block at its own place, plus noise: learnable in one step
        images = rng.integers(0, 60, size=(labels.size, 28, 28))
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 4 + 10 * row : 12 + 10 * row, 2 + 5 * col : 6 + 5 * col] = 230
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_missing_data_set_is_one_line_and_exit_2(tmp_path):
    run = _run("--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "Fashion-MNIST not found" in lines[0]
    assert "dataset-fashion-mnist" in lines[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_only_without_saved_embeddings_is_exit_2(tmp_path):
    run = _run("--evaluate-only", "--out", str(tmp_path))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1
    assert "labels.npy not found" in run.stderr


def _naive_far(embeddings, labels, customers, target_far):
    """Per-customer FAR at the pooled threshold, counted pair by pair: a customer's pairs
    are those whose query is its image (against every other evaluation image)."""
    e = embeddings.astype(np.float64)
    scores = e @ e.T
    n = len(labels)
    negative = (labels[:, None] != labels[None, :]) & ~np.eye(n, dtype=bool)
    negatives = np.sort(scores[negative])[::-1]
    k = max(1, math.ceil(target_far * negatives.size))
    threshold = negatives[k - 1]
    return {
        int(u): ((scores >= threshold) & negative)[customers == u].sum()
        / negative[customers == u].sum()
        for u in np.unique(customers)
    }, negative


def test_script_end_to_end_on_fake_idx_files(tmp_path, example):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    _fake_fashion_mnist(data)
    run = _run(
        "--data-dir", str(data), "--out", str(out), "--epochs", "1", "--seeds", "0",
        "--bootstrap", "20",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    labels = np.load(out / "labels.npy")
    customers = np.load(out / "customers.npy")
    assert sorted(np.unique(labels)) == [5, 6, 7, 8, 9]  # the unseen classes only
    assert np.bincount(customers).tolist() == [20] * 5
    rows = {}
    for line in run.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5:
            rows[cells[0]] = cells[1:]
    names = [c.name for c in example.CUSTOMERS]
    assert set(names) <= set(rows)
    number = r"([0-9.]+) \[([0-9.]+), ([0-9.]+)\]"
    for arm, column in (("base", 0), ("tcm", 1)):
        embeddings = np.load(out / f"embeddings_seed0_{arm}.npy")
        assert embeddings.shape == (100, 64)
        far, negative = _naive_far(embeddings, labels, customers, example.TARGET_FAR)
        unit = example.TARGET_FAR  # the FAR columns are in units of the target
        one_pair = 1 / negative[customers == 0].sum() / unit
        for u, name in enumerate(names):
            value, lo, hi = map(float, re.fullmatch(number, rows[name][column]).groups())
            assert value == pytest.approx(far[u] / unit, abs=one_pair + 1e-3), (arm, name)
            assert lo <= value + 1e-3 and value <= hi + 1e-3
    assert re.search(r"worst/best FAR", run.stdout)
    assert re.search(r"OPIS across customers: ", run.stdout)  # the summary line

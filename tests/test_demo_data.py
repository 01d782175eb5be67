"""IDX parsing and the open-world splits."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pml_tcm.demo.data import (
    FASHION_MNIST_FILES,
    DatasetError,
    digits_split,
    fashion_mnist_split,
    load_split,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """An IDX file written by hand: magic (0, 0, type, ndim), big-endian dims, data."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0D: ">f4"}[type_code]
    payload = header + array.astype(dtype).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(payload)


def write_fake_fashion_mnist(folder: Path, per_class: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(0)
    arrays = {}
    for split in ("train", "test"):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = rng.randint(0, 256, size=(labels.size, 28, 28)).astype(np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    for key, name in FASHION_MNIST_FILES.items():
        write_idx(folder / name, arrays[key])
    return arrays


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    ("type_code", "values"),
    [
        (0x08, np.array([[0, 1, 255], [7, 8, 9]])),
        (0x0B, np.array([[-300, 0, 300], [1, -1, 32767]])),
        (0x0D, np.array([[0.5, -1.25, 3.0], [1e-3, 2.0, -7.5]])),
    ],
)
def test_read_idx_round_trip(tmp_path, suffix, type_code, values):
    path = tmp_path / f"x.idx{suffix}"
    write_idx(path, values, type_code)
    parsed = read_idx(path)
    assert parsed.shape == values.shape
    np.testing.assert_array_equal(parsed, values.astype(parsed.dtype))
    assert parsed.dtype.isnative


def test_read_idx_rejects_bad_files(tmp_path):
    with pytest.raises(DatasetError, match="missing file"):
        read_idx(tmp_path / "absent.gz")
    bad_magic = tmp_path / "bad.idx"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DatasetError, match="magic"):
        read_idx(bad_magic)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00\x01")
    with pytest.raises(DatasetError, match="header promises"):
        read_idx(truncated)


def test_fashion_mnist_split_from_fake_files(tmp_path):
    arrays = write_fake_fashion_mnist(tmp_path)
    split = fashion_mnist_split(tmp_path)
    assert split.train_x.shape == (15, 1, 28, 28) and split.train_x.dtype == np.float32
    assert sorted(set(split.train_y.tolist())) == [0, 1, 2, 3, 4]
    assert sorted(set(split.eval_y.tolist())) == [5, 6, 7, 8, 9]
    seen = arrays["train_labels"] < 5
    np.testing.assert_allclose(split.train_x[:, 0], arrays["train_images"][seen] / 255.0)
    unseen = arrays["test_labels"] >= 5
    np.testing.assert_allclose(split.eval_x[:, 0], arrays["test_images"][unseen] / 255.0)
    assert split.num_train_classes == 5 and split.input_shape == (1, 28, 28)
    image, label = split.train_dataset()[0]
    assert tuple(image.shape) == (1, 28, 28) and int(label) == split.train_y[0]


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        load_split("fashion-mnist", tmp_path)
    message = str(error.value)
    assert "\n" not in message
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir" in message


def test_digits_split_is_open_world():
    split = digits_split()
    assert split.input_shape == (64,)
    assert set(split.train_y.tolist()) == {0, 1, 2, 3, 4}
    assert set(split.eval_y.tolist()) == {5, 6, 7, 8, 9}
    assert 0.0 <= split.train_x.min() and split.train_x.max() <= 1.0
    small = split.subsample(100, 50)
    assert len(small.train_y) == 100 and len(small.eval_y) == 50
    assert set(small.eval_y.tolist()) == {5, 6, 7, 8, 9}


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_split("cifar")

"""Open-world splits of real data sets: train on some classes, evaluate on unseen ones.

Two sources, both offline:

* scikit-learn's bundled ``load_digits`` (8x8 digits, no download): train on digits
  0-4, evaluate on 5-9.
* Fashion-MNIST from its four IDX ``.gz`` files (Debian: ``apt-get install
  dataset-fashion-mnist`` puts them under ``/usr/share/datasets/fashion-mnist``): train
  on classes 0-4 of the train split, evaluate on classes 5-9 of the test split.

The evaluation set is its own query and reference set (self pairs excluded).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .extras import import_optional
from .settings import DATASETS, SEEN_CLASSES, UNSEEN_CLASSES

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetError(Exception):
    """A data set is missing or unreadable; the message is one line for the user."""


@dataclass(frozen=True)
class OpenWorldSplit:
    """Training data from the seen classes and evaluation data from unseen classes.

    Attributes:
        name: data set name (``"digits"`` or ``"fashion-mnist"``).
        train_x: ``(N, ...)`` float32 inputs of the seen classes, scaled to [0, 1].
        train_y: ``(N,)`` int64 labels, 0..4.
        eval_x: ``(M, ...)`` float32 inputs of the unseen classes.
        eval_y: ``(M,)`` int64 labels, 5..9.
        class_names: name of every label 0..9.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    eval_x: np.ndarray
    eval_y: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_train_classes(self) -> int:
        return int(np.unique(self.train_y).size)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def train_dataset(self) -> TensorDataset:
        """The training set as ``(input, label)`` pairs for pml's trainers."""
        return _tensor_dataset(self.train_x, self.train_y)

    def eval_dataset(self) -> TensorDataset:
        """The evaluation set as ``(input, label)`` pairs for pml's testers."""
        return _tensor_dataset(self.eval_x, self.eval_y)

    def subsample(
        self, max_train: int | None, max_eval: int | None, seed: int = 0
    ) -> OpenWorldSplit:
        """A class-stratified random subset (for quick runs); ``None`` keeps everything."""
        rng = np.random.RandomState(seed)
        train = _stratified_indices(self.train_y, max_train, rng)
        evaluation = _stratified_indices(self.eval_y, max_eval, rng)
        return OpenWorldSplit(
            self.name,
            self.train_x[train],
            self.train_y[train],
            self.eval_x[evaluation],
            self.eval_y[evaluation],
            self.class_names,
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        The array, in native byte order, with the shape the header gives.

    Raises:
        DatasetError: the file is missing, truncated or not IDX.
    """
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError as error:
        raise DatasetError(f"missing file {path}") from error
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path} is truncated (incomplete IDX header)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise DatasetError(
            f"{path} holds {len(raw) - header} data bytes, its header promises "
            f"{count * dtype.itemsize}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def load_fashion_mnist(data_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST arrays, keyed like :data:`FASHION_MNIST_FILES`.

    Args:
        data_dir: folder holding the four IDX ``.gz`` files; default
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        DatasetError: a file is missing (the message says how to get them) or malformed.
    """
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    missing = [name for name in FASHION_MNIST_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}); install it "
            "with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding "
            "the four IDX .gz files"
        )
    arrays = {key: read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"Fashion-MNIST {split} files disagree: images {images.shape}, "
                f"labels {labels.shape}"
            )
    return arrays


def fashion_mnist_split(data_dir: str | Path | None = None) -> OpenWorldSplit:
    """Fashion-MNIST open-world split: train split classes 0-4, test split classes 5-9.

    Images become ``(N, 1, 28, 28)`` float32 in [0, 1].
    """
    arrays = load_fashion_mnist(data_dir)
    train_x, train_y = _images(arrays["train_images"]), arrays["train_labels"].astype(np.int64)
    test_x, test_y = _images(arrays["test_images"]), arrays["test_labels"].astype(np.int64)
    seen, unseen = np.isin(train_y, SEEN_CLASSES), np.isin(test_y, UNSEEN_CLASSES)
    return OpenWorldSplit(
        "fashion-mnist",
        train_x[seen],
        train_y[seen],
        test_x[unseen],
        test_y[unseen],
        FASHION_MNIST_CLASS_NAMES,
    )


def digits_split() -> OpenWorldSplit:
    """scikit-learn digits open-world split: digits 0-4 for training, 5-9 for evaluation.

    Inputs are the 64 pixel values as float32 in [0, 1].

    Raises:
        ImportError: scikit-learn is not installed (the ``examples`` extra).
    """
    datasets = import_optional("sklearn.datasets", "the digits data set")
    digits = datasets.load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    seen = np.isin(y, SEEN_CLASSES)
    return OpenWorldSplit(
        "digits", x[seen], y[seen], x[~seen], y[~seen], tuple(str(i) for i in range(10))
    )


def load_split(name: str, data_dir: str | Path | None = None) -> OpenWorldSplit:
    """The open-world split of a data set by name (see :data:`DATASETS`).

    Raises:
        DatasetError: unknown name, or missing/malformed files.
    """
    if name == "digits":
        return digits_split()
    if name == "fashion-mnist":
        return fashion_mnist_split(data_dir)
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def _images(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.float32) / 255.0)[:, None, :, :]


def _tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))


def _stratified_indices(
    labels: np.ndarray, limit: int | None, rng: np.random.RandomState
) -> np.ndarray:
    if limit is None or limit >= labels.size:
        return np.arange(labels.size)
    classes = np.unique(labels)
    per_class = max(1, limit // classes.size)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen))

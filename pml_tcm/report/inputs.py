"""What ``pml-tcm report`` is given, checked before any work: the settings, the output
folder, the input files (regular ``.npy`` files) and their arrays, each loaded once."""

from __future__ import annotations

import math
import numbers
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..output_files import folder_problem
from ..provenance import sha256_file

DEVICES = ("cpu", "cuda")
_BLOCK_BYTES = 2 << 20  # rows checked per step of the NaN / zero-row scan


class ReportInputError(ValueError):
    """Bad input to ``report`` (a file, a setting, the output folder); the message is
    the one line the user sees."""


@dataclass(frozen=True)
class InputFile:
    """One input file as the report records it.

    Attributes:
        role: ``"embeddings"``, ``"labels"``, ``"reference"`` or ``"reference labels"``.
        path: the path as given.
        shape: the array's shape.
        dtype: the array's dtype as stored.
        sha256: the SHA-256 of the file's bytes.
    """

    role: str
    path: Path
    shape: tuple[int, ...]
    dtype: str
    sha256: str

    @classmethod
    def of(cls, role: str, path: str | Path) -> InputFile:
        """Shape and dtype of a ``.npy`` file (memory-mapped: no data read) and its hash."""
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        return cls(role, Path(path), tuple(array.shape), str(array.dtype), sha256_file(path))


def check_settings(
    far_range: Any,
    target_far: Any,
    worst: Any,
    device: Any = "cpu",
    bootstrap: Any = 0,
    confidence: Any = 0.95,
) -> tuple[tuple[float, float], float]:
    """The report's settings, checked before anything is loaded.

    Rates are fractions: ``--target-far 1e-3`` is 0.1 %.

    Returns:
        ``far_range`` and ``target_far`` as floats.

    Raises:
        ReportInputError: naming the option: ``--far-range`` not two fractions
            ``0 < LO <= HI <= 1``, ``--target-far`` outside (0, 1], ``--worst`` not a
            positive integer, an unknown ``--device``, ``--bootstrap`` not 0 or an
            integer >= 2, ``--confidence`` outside (0, 1).
    """
    if not isinstance(far_range, (tuple, list)) or len(far_range) != 2:
        raise ReportInputError(f"--far-range takes two FARs LO HI, got {far_range!r}")
    low, high = (_fraction(value, "--far-range") for value in far_range)
    if not (0 < low <= 1 and 0 < high <= 1):
        raise ReportInputError(
            f"--far-range {low:g} {high:g}: FARs are fractions in (0, 1] (1e-3 is 0.1 %)"
        )
    if low > high:
        raise ReportInputError(f"--far-range {low:g} {high:g}: LO must not exceed HI")
    target = _fraction(target_far, "--target-far")
    if not 0 < target <= 1:
        raise ReportInputError(
            f"--target-far must be a fraction in (0, 1] (1e-3 is 0.1 %), got {target:g}"
        )
    if isinstance(worst, bool) or not isinstance(worst, numbers.Integral) or worst < 1:
        raise ReportInputError(f"--worst must be a positive integer, got {worst!r}")
    if str(device).split(":")[0] not in DEVICES:
        raise ReportInputError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if (
        isinstance(bootstrap, bool)
        or not isinstance(bootstrap, numbers.Integral)
        or bootstrap < 0
        or bootstrap == 1
    ):
        raise ReportInputError(
            f"--bootstrap takes 0 (no intervals) or at least 2 replicates, got {bootstrap!r}"
        )
    level = _fraction(confidence, "--confidence")
    if not 0 < level < 1:
        raise ReportInputError(
            f"--confidence must be a level in (0, 1) (0.95 for 95 % intervals), got {level:g}"
        )
    return (low, high), target


def check_out(out: Path) -> None:
    """``out`` can hold the report files (a writable folder, or one that can be made).

    Raises:
        ReportInputError: a file, under a file, a symlink to nothing, not writable.
    """
    problem = folder_problem(Path(out), "--out")
    if problem is not None:
        raise ReportInputError(problem)


def check_file(path: Path, what: str) -> None:
    """``path`` is a regular file that can be read.

    Raises:
        ReportInputError: missing, a folder, a device or other special file, unreadable.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        dangling = " (a symlink to nothing)" if os.path.islink(path) else ""
        raise ReportInputError(f"{what} file {path} does not exist{dangling}") from None
    except OSError as error:
        raise ReportInputError(f"cannot read {what} file {path}: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise ReportInputError(f"{what} file {path} is a folder, not a .npy file")
    if not stat.S_ISREG(mode):
        kind = "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a pipe or socket"
        raise ReportInputError(f"{what} file {path} is {kind}, not a regular .npy file")
    if not os.access(path, os.R_OK):
        raise ReportInputError(f"cannot read {what} file {path}: permission denied")


def load_embeddings(path: Path, what: str) -> np.ndarray:
    """An ``(N, D)`` finite float array from a ``.npy`` file, read once: float64 stays
    float64, everything else becomes float32 (one copy of the file's data in memory; a
    Fortran-order file stays in Fortran order).

    Raises:
        ReportInputError: missing/unreadable file, wrong shape or dtype, NaN/Inf, a zero
            row.
    """
    mapped = _map_npy(path, what)
    if mapped.ndim != 2 or mapped.shape[0] == 0 or mapped.shape[1] == 0:
        raise ReportInputError(
            f"{what} {path} must be a non-empty (N, D) array, got shape {mapped.shape}"
        )
    if mapped.dtype.kind not in "fiu":
        raise ReportInputError(f"{what} {path} must hold numbers, got dtype {mapped.dtype}")
    dtype = np.float64 if mapped.dtype == np.float64 else np.float32
    array = _read(mapped, path, what, dtype)
    del mapped
    step = max(1, _BLOCK_BYTES // (array.shape[1] * array.itemsize))
    for start in range(0, len(array), step):  # in blocks: no (N, D) temporaries
        block = array[start : start + step]
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise ReportInputError(f"{what} {path} contains NaN or Inf (first at row {row})")
        zero = ~block.any(axis=1)
        if zero.any():
            row = start + int(np.flatnonzero(zero)[0])
            raise ReportInputError(
                f"{what} {path} has an all-zero row ({row}); it has no direction"
            )
    return array


def load_labels(path: Path, what: str, expected: int) -> np.ndarray:
    """An ``(expected,)`` array of class labels from a ``.npy`` file: integers of any
    size, bools or floats (compared by value), kept in their dtype.

    Raises:
        ReportInputError: missing/unreadable file, wrong shape or length, not numbers,
            NaN.
    """
    return _load_ids(path, what, expected, "class labels", "labels")


def load_groups(path: Path, expected: int) -> np.ndarray:
    """An ``(expected,)`` array of group ids (one per query) from a ``.npy`` file,
    checked as labels are (:func:`load_labels`), with at least two distinct groups.

    Raises:
        ReportInputError: as :func:`load_labels`, or a single group.
    """
    array = _load_ids(path, "groups", expected, "group ids", "group ids")
    distinct = np.unique(array)
    if len(distinct) < 2:
        raise ReportInputError(
            f"groups {path}: every query is in one group ({distinct[0].item()!r}); give at least "
            "two groups (without --groups the rates are per class)"
        )
    return array


def _load_ids(path: Path, what: str, expected: int, kind: str, counted: str) -> np.ndarray:
    """A 1-D array of ``expected`` ids (labels or groups) of any real dtype, no NaN."""
    array = _map_npy(path, what)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ReportInputError(f"{what} {path} must be a 1-D array, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ReportInputError(
            f"{what} {path} must hold {kind} (integers, bools or floats), got dtype {array.dtype}"
        )
    if array.shape[0] != expected:
        raise ReportInputError(
            f"{what} {path} has {array.shape[0]} {counted} but there are {expected} embeddings"
        )
    array = _read(array, path, what, array.dtype)
    if array.dtype.kind == "f" and np.isnan(array).any():
        row = int(np.flatnonzero(np.isnan(array))[0])
        raise ReportInputError(f"{what} {path} contains NaN (first at row {row})")
    return array


def require_pairs(labels: np.ndarray, reference_labels: np.ndarray | None) -> None:
    """R@1, MAP@R and OPIS need a query with a positive pair (same class, not itself),
    the threshold needs a negative pair (different classes).

    Raises:
        ReportInputError: no positive pair, or no negative pair.
    """
    classes = np.unique(labels)
    if reference_labels is None:
        _, counts = np.unique(labels, return_counts=True)
        if (counts < 2).all():
            raise ReportInputError(
                "every class has a single sample: no query has a positive pair, so R@1, "
                "MAP@R and OPIS are undefined"
            )
        if len(classes) < 2:
            raise ReportInputError(
                "all embeddings have one label: there is no negative pair, so no FAR, "
                "threshold or OPIS"
            )
        return
    reference_classes = np.unique(reference_labels)
    if not np.isin(classes, reference_classes).any():
        raise ReportInputError(
            "the reference set shares no class with the embeddings: no query has a "
            "positive pair, so R@1, MAP@R and OPIS are undefined"
        )
    if len(classes) == 1 and np.array_equal(classes, reference_classes):
        raise ReportInputError(
            "the embeddings and the reference set have one and the same label: there is "
            "no negative pair, so no FAR, threshold or OPIS"
        )


def _fraction(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ReportInputError(f"{option} takes numbers, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ReportInputError(f"{option} takes finite numbers, got {value:g}")
    return value


def _map_npy(path: Path, what: str) -> np.ndarray:
    """The file memory-mapped (its header checked against its size before any data is
    read: a header claiming 10^12 rows fails here, not in the allocator)."""
    check_file(Path(path), what)
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as error:  # noqa: BLE001 - numpy's header parser raises many kinds
        # (ValueError, SyntaxError, tokenize errors, EOFError, OSError, MemoryError, ...)
        raise ReportInputError(
            f"cannot read {what} file {path} as .npy: {_reason(error)}"
        ) from error
    if not isinstance(array, np.ndarray):
        raise ReportInputError(
            f"{what} file {path} holds several arrays (.npz); save one with np.save"
        )
    return array


def _read(mapped: np.ndarray, path: Path, what: str, dtype: Any) -> np.ndarray:
    """The data of ``mapped`` (a memory map of ``path``) as a ``dtype`` array in memory.
    When the file holds exactly that dtype its bytes are read straight into the array
    (C order, or Fortran order kept as it is: the rows are used a block at a time), so
    that neither a second copy nor the mapped pages add to the peak."""
    try:
        if isinstance(mapped, np.memmap) and mapped.dtype == np.dtype(dtype):
            if mapped.dtype.isnative and (mapped.flags.c_contiguous or mapped.flags.f_contiguous):
                fortran = not mapped.flags.c_contiguous
                shape = mapped.shape[::-1] if fortran else mapped.shape
                array = np.empty(shape, dtype=dtype)
                with open(path, "rb") as handle:
                    handle.seek(mapped.offset)
                    if handle.readinto(memoryview(array).cast("B")) != array.nbytes:
                        raise ReportInputError(
                            f"{what} file {path} is shorter than its header says"
                        )
                return array.T if fortran else array
        return np.array(mapped, dtype=dtype, order="K")
    except OSError as error:
        raise ReportInputError(f"cannot read {what} file {path}: {_reason(error)}") from error


def _reason(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__

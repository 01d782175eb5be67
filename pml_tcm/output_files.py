"""Output folders and files of the CLI commands: checked before any work, written whole.

:func:`write_whole` replaces one file atomically; :func:`write_file_set` replaces several
files of one folder as a set, so that two runs into one folder, or a run interrupted by
Ctrl-C or SIGTERM, never leave files of two runs side by side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

try:  # POSIX; elsewhere the set is still written whole, only not serialised between runs
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def folder_problem(path: Path, option: str) -> str | None:
    """Why ``path`` cannot be used as an output folder (one line), or ``None``.

    It must be a folder that can be written to, or one that can be created: not a file,
    not under a file, not a symlink to nothing, not in a place without write permission.
    """
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        target = os.readlink(existing)
        where = "is" if existing == path else f"lies under {existing}, which is"
        return f"{option} {path} {where} a symlink to {target}, which does not exist"
    if not existing.is_dir():
        kind = _kind(existing)
        where = f"is {kind}" if existing == path else f"lies under the {kind[2:]} {existing}"
        return f"{option} {path} {where}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path}: no permission to write in {existing}"
    return None


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` to a temporary name of its own beside ``path``, then rename it
    to ``path``: ``path`` is either the complete new file or untouched, also when two
    processes write it at once."""
    path = Path(path)
    handle, name = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_file_set(
    folder: Path,
    writers: Mapping[str, Callable[[Path], object]],
    remove: Sequence[str] = (),
) -> list[Path]:
    """Write the files ``writers`` names into ``folder`` as one set.

    Each ``writers[name](path)`` writes its file into a fresh staging folder inside
    ``folder`` (a name of its own per run). Only when all are written are they renamed
    into ``folder``, in ``writers``' order (a manifest last), and the files in ``remove``
    (left from an earlier run, e.g. a figure this run does not make) deleted: under an
    exclusive lock on ``folder``, so that concurrent runs replace the set one after the
    other, and with SIGINT/SIGTERM held back for those few renames. A failure or an
    interrupt before that leaves the previous set untouched; the staging folder is
    always removed (for SIGTERM, the caller turns it into an exception: see
    :func:`pml_tcm.cli.main`).

    Returns:
        The paths written, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        for name, write in writers.items():
            write(staging / name)
        with _locked(folder), _signals_held():
            for name in writers:
                os.replace(staging / name, folder / name)
            for name in remove:
                if name not in writers:
                    (folder / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / name for name in writers]


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return "a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:  # a signal that came meanwhile is delivered here, after the set is complete
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

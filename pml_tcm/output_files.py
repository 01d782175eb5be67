"""Output folders and files of the CLI commands: checked before any work, written whole."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def folder_problem(path: Path, option: str) -> str | None:
    """Why ``path`` cannot be used as an output folder (one line), or ``None``.

    It must be a folder that can be written to, or one that can be created: not a file,
    not under a file, not in a place without write permission.
    """
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies under the file {existing}"
        return f"{option} {path} {where}, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{option} {path}: no permission to write in {existing}"
    return None


def write_whole(path: Path, write: Callable[[Path], object]) -> None:
    """``write(partial)`` to a temporary name beside ``path``, then rename it to ``path``:
    ``path`` is either the complete new file or untouched."""
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)

"""What produced a result: software versions, input checksums, the time."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

VERSIONED_PACKAGES = ("pml-tcm", "pytorch-metric-learning", "torch")


def software_versions() -> dict[str, str]:
    """Installed versions of pml-tcm, pytorch-metric-learning and torch, read from the
    package metadata (nothing is imported); ``"not installed"`` when missing."""
    from . import __version__

    versions = {}
    for name in VERSIONED_PACKAGES:
        if name == "pml-tcm":
            versions[name] = __version__  # this checkout, installed or not
            continue
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (``2026-11-27T21:04:05Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

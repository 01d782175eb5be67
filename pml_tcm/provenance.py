"""What produced a result: software versions, input checksums, the time."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

VERSION = "0.1.0"
"""pml-tcm's version (``pml_tcm.__version__``): defined here, the bottom of the package,
so that reading it imports nothing."""

VERSIONED_PACKAGES = ("pml-tcm", "pytorch-metric-learning", "torch")


def software_versions() -> dict[str, str]:
    """Installed versions of pml-tcm, pytorch-metric-learning and torch, read from the
    package metadata (nothing is imported); ``"not installed"`` when missing."""
    versions = {}
    for name in VERSIONED_PACKAGES:
        if name == "pml-tcm":
            versions[name] = VERSION  # this checkout, installed or not
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


def run_id() -> str:
    """A name of its own for one run: the UTC time and 8 random hex digits
    (``20261127T210405Z-1a2b3c4d``); every file of a run records it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Provenance:
    """What produced a result: the versions, the time (UTC, ISO 8601) and the run's id
    (:func:`run_id`)."""

    versions: dict[str, str]
    created: str
    run: str

    @classmethod
    def now(cls) -> Provenance:
        return cls(software_versions(), utc_now(), run_id())

"""The stored runs of the sweeps (``tcm_sweep.py``, ``pretrained_sweep.py``): one JSON file
per finished run, read back by the sweeps (to resume) and by their reports."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any


def load_run(path: Path, config: Any) -> dict[str, Any] | None:
    """The cached result of ``config`` (a run's dataclass), or None if absent, unreadable
    or of another config."""
    try:
        result = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return result if result.get("config") == asdict(config) else None

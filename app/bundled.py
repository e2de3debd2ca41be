"""The bundled teachers (``teachers/manifest.json``) as ready-made uploads for a first job.

Read without importing torch: the API process stays light; the intake task validates the copy
exactly like any upload.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


def teachers_dir() -> Path:
    env = os.environ.get("DFQ_TEACHERS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "teachers"


def manifest() -> dict[str, dict[str, Any]]:
    path = teachers_dir() / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


# The first choice offered: minutes on a CPU, where the 3x64x64 teachers take hours.
DEFAULT_TEACHER = "resnet20_fmnist"


def names() -> list[str]:
    """Bundled teacher names for pickers, the quick default first, then alphabetical."""
    return sorted(manifest(), key=lambda n: (n != DEFAULT_TEACHER, n))


def bundled_entry(name: str) -> dict[str, Any] | None:
    entry = manifest().get(name)
    if entry is None or not (teachers_dir() / entry["file"]).exists():
        return None
    return {"name": name, **entry}


def copy_bundled(entry: dict[str, Any], dest: Path) -> tuple[Path, int, str]:
    """Copy the teacher's file to ``dest``; returns (path, size, sha256)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(teachers_dir() / entry["file"], dest)
    h = hashlib.sha256()
    with dest.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return dest, dest.stat().st_size, h.hexdigest()

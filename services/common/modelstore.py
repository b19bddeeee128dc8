"""The model store under MESHSERVE_HOME/models as the services read it: where a catalog entry's
files are and whether it is built. `meshserve models build` (services/models/build.py) writes it;
every built entry has a build manifest (MANIFEST) beside its `model/` folder."""

from __future__ import annotations

import json
from pathlib import Path

from services.common.catalog import ModelEntry

MANIFEST = "meshserve-build.json"


def is_built(entry: ModelEntry, models_dir: Path) -> bool:
    manifest = entry.store_dir(models_dir) / MANIFEST
    return manifest.exists()


def model_dir(entry: ModelEntry, models_dir: Path) -> Path:
    """Folder with the model's Hugging Face files in the store."""
    return entry.store_dir(models_dir) / "model"


def manifest(entry: ModelEntry, models_dir: Path) -> dict:
    """The build manifest of a built entry (id, fingerprint, and a trained model's metrics)."""
    return json.loads((entry.store_dir(models_dir) / MANIFEST).read_text())

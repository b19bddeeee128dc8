"""Where a catalog entry's files are, as the services read them, and whether they are there.

Wheel and trained (`build`) entries live in the model store under MESHSERVE_HOME/models, written
by `meshserve models build` (services/models/build.py) with a build manifest (MANIFEST) beside
their `model/` folder. A `path` entry is read in place (no copy of multi-GB weights); a `hub` entry
is read from the Hugging Face cache, filled by `models add` / `models build` / `up`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.common.catalog import ModelEntry, Source
from services.common.errors import ErrorCode, MeshError

log = logging.getLogger(__name__)

MANIFEST = "meshserve-build.json"
IN_PLACE = frozenset({"path", "hub"})


def is_built(entry: ModelEntry, models_dir: Path) -> bool:
    """Whether the entry's files are there: a built store folder, the path folder, the hub snapshot."""
    if entry.source.kind in IN_PLACE:
        folder = hub_snapshot(entry) if entry.source.kind == "hub" else Path(entry.source.path or "").expanduser()
        return folder is not None and folder.is_dir()
    return (entry.store_dir(models_dir) / MANIFEST).exists()


def model_dir(entry: ModelEntry, models_dir: Path) -> Path:
    """Folder with the model's Hugging Face files: the store's copy, the path itself, or the hub
    snapshot in the HF cache (a path under the cache that does not exist when it is not fetched)."""
    if entry.source.kind == "path":
        return Path(entry.source.path or "").expanduser()
    if entry.source.kind == "hub":
        snapshot = hub_snapshot(entry)
        return snapshot if snapshot is not None else _hub_placeholder(entry)
    return entry.store_dir(models_dir) / "model"


def hub_snapshot(entry: ModelEntry) -> Path | None:
    """The cached snapshot folder of a hub entry, never fetching; None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id=entry.source.repo, revision=entry.source.revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None
    return Path(folder)


def fetch_hub(source: Source) -> Path:
    """Download (or find up to date) a hub source's snapshot into the HF cache; HF_TOKEN is honoured.
    Offline (HF_HUB_OFFLINE=1) it resolves the cached snapshot only."""
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(repo_id=source.repo, revision=source.revision, token=os.environ.get("HF_TOKEN") or None)
    )


def _hub_placeholder(entry: ModelEntry) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + (entry.source.repo or "").replace("/", "--")) / "not-fetched"


def manifest(entry: ModelEntry, models_dir: Path) -> dict:
    """The build manifest of a built entry (id, fingerprint, and a trained model's metrics)."""
    return json.loads((entry.store_dir(models_dir) / MANIFEST).read_text())


class UnavailableModel:
    """Stands in for a model whose files could not be read when a service started (a folder that
    vanished, a broken tokenizer): any use of it answers a readable UNAVAILABLE (503), so that one
    bad model never stops a service from serving the others."""

    def __init__(self, entry: ModelEntry, reason: str) -> None:
        self.entry_id = entry.id
        self.reason = reason

    def __getattr__(self, name: str) -> Any:
        raise MeshError(
            ErrorCode.UPSTREAM_UNAVAILABLE, f"Model {self.entry_id!r} is not available: {self.reason}", param="model"
        )


def load_or_stand_in(entry: ModelEntry, models_dir: Path, factory: Callable[[ModelEntry, Path], Any]) -> Any:
    """factory(entry, model folder), or an UnavailableModel with one logged error when it fails."""
    folder = model_dir(entry, models_dir)
    try:
        return factory(entry, folder)
    except Exception as exc:  # any failure to read one model's files must not stop the service
        reason = f"its folder {folder} is missing" if not folder.is_dir() else f"{type(exc).__name__}: {exc}"
        log.error("model skipped: %s", reason, extra={"fields": {"model": entry.id}})
        return UnavailableModel(entry, reason)

"""The model store under MESHSERVE_HOME/models: `meshserve models build` materializes catalog
entries there, deterministically and cached (an entry is rebuilt only when its source changes).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path

from tqdm import tqdm

from services.common.catalog import Catalog, ModelEntry

MANIFEST = "meshserve-build.json"
BUILD_VERSION = 1


def source_path(entry: ModelEntry) -> Path:
    """The folder that holds the model's files at the source (a wheel's package data, a path)."""
    if entry.source.kind == "wheel":
        module = importlib.import_module(entry.source.package)
        return Path(module.get_model_path())
    return Path(entry.source.path).expanduser()


def _fingerprint(folder: Path) -> str:
    digest = hashlib.sha256(f"v{BUILD_VERSION}".encode())
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}:{stat.st_size}".encode())
    return digest.hexdigest()[:16]


def is_built(entry: ModelEntry, models_dir: Path) -> bool:
    manifest = entry.store_dir(models_dir) / MANIFEST
    return manifest.exists()


def model_dir(entry: ModelEntry, models_dir: Path) -> Path:
    """Folder with the model's Hugging Face files in the store."""
    return entry.store_dir(models_dir) / "model"


def _card(entry: ModelEntry, src: Path) -> str:
    spec = entry.inference
    return f"""# {entry.id}

{entry.description.strip()}

- Tasks: {", ".join(entry.tasks)} (default: {entry.default_task})
- Source: {entry.source.kind} `{entry.source.package or entry.source.path}` ({src})
- Inference: runtime `{spec.runtime}` as `{spec.name}`; max batch {spec.max_batch_size},
  queue delay {spec.max_queue_delay_us} µs, {spec.instances} instance(s) x {spec.threads} thread(s)
- Token limit: {entry.preprocess.max_length} (longer texts are truncated unless `truncate=false`)
- Limits: English text; embeddings are for semantic similarity and retrieval, not for generation.
"""


def build_entry(entry: ModelEntry, models_dir: Path, *, force: bool = False) -> tuple[Path, bool]:
    """Materialize one entry; returns (store dir, whether anything was built)."""
    src = source_path(entry)
    fingerprint = _fingerprint(src)
    dest = entry.store_dir(models_dir)
    manifest = dest / MANIFEST
    if not force and manifest.exists() and json.loads(manifest.read_text()).get("fingerprint") == fingerprint:
        return dest, False
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in tqdm(files, desc=f"build {entry.id}", unit="file", leave=False):
        target = tmp / "model" / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (tmp / "README.md").write_text(_card(entry, src))
    (tmp / MANIFEST).write_text(json.dumps({"id": entry.id, "fingerprint": fingerprint}, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest, True


def build_all(catalog: Catalog, models_dir: Path, *, force: bool = False) -> list[tuple[ModelEntry, bool]]:
    return [(entry, build_entry(entry, models_dir, force=force)[1]) for entry in catalog.models]

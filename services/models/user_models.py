"""Users' models on the command line: `--model [ID=]PATH_OR_REPO` resolved to a folder (fetching a
hub repo), the inferred entry rendered as commented YAML (catalog.d files), and the generated catalog
a `meshserve up --model` run serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from services.common.catalog import Catalog, ModelEntry, Source
from services.common.settings import REPO_ROOT
from services.models.from_folder import FolderError, Inferred, infer_folder

SCHEMA = REPO_ROOT / "schemas" / "catalog-entry.schema.json"
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Fields users tune, kept in a written entry even when they equal the defaults.
SHOWN = {
    "preprocess": ("kind", "max_length", "max_items"),
    "inference": ("max_batch_size", "max_queue_size", "instances", "threads"),
}


@dataclass(frozen=True)
class ModelSpec:
    """One `[ID=]PATH_OR_REPO[@REVISION]` argument, resolved."""

    model_id: str
    folder: Path
    source: Source


def resolve(spec: str, *, model_id: str | None = None) -> ModelSpec:
    """A local folder (default id local/<name>) or a hub repo id (fetched into the HF cache; default
    id the repo id). FolderError when it is neither or the fetch fails."""
    given, sep, target = spec.partition("=")
    if not sep or Path(spec).expanduser().exists():
        given, target = "", spec
    model_id = model_id or given or None
    folder = Path(target).expanduser()
    if folder.exists() or target.startswith((".", "/", "~")) or not REPO_ID.fullmatch(target.split("@", 1)[0]):
        if not folder.is_dir():
            raise FolderError(f"{target}: not a model folder (nor a hub repo id like org/name)")
        folder = folder.resolve()
        return ModelSpec(model_id or f"local/{folder.name}", folder, Source(kind="path", path=str(folder)))
    repo, _, revision = target.partition("@")
    source = Source(kind="hub", repo=repo, revision=revision or None)
    return ModelSpec(model_id or repo, _fetch(source), source)


def _fetch(source: Source) -> Path:
    from services.common.modelstore import fetch_hub

    try:
        return fetch_hub(source)
    except Exception as exc:  # huggingface_hub raises many kinds: offline, gated, not found, network
        where = f"{source.repo}@{source.revision}" if source.revision else source.repo
        hint = "no local folder of that name either; private or gated repos need HF_TOKEN, offline a filled cache"
        detail = " ".join(str(exc).split())  # one line
        raise FolderError(f"hub repo {where}: cannot fetch it ({type(exc).__name__}: {detail}); {hint}") from None


def infer(spec: str, *, model_id: str | None = None, task: str | None = None) -> Inferred:
    resolved = resolve(spec, model_id=model_id)
    return infer_folder(resolved.folder, model_id=resolved.model_id, task=task, source=resolved.source)


class _Flow(dict):
    """A mapping written on one line ({name: input_ids, datatype: INT64, dims: [-1]})."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_Flow, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, True))


def entry_data(entry: ModelEntry) -> dict:
    """The entry as plain data in the model's field order: defaults left out except the fields
    users tune; tensors one per line."""
    data = entry.model_dump(mode="json", exclude_defaults=True)
    full = entry.model_dump(mode="json")
    for section, keys in SHOWN.items():
        kept = data.get(section, {})
        data[section] = {k: v for k, v in full[section].items() if k in kept or k in keys}
    for key in ("inputs", "outputs"):
        data["inference"][key] = [_Flow(t) for t in data["inference"][key]]
    return {k: data[k] for k in full if k in data}


def dump(data: dict | list) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=110)


def render(inferred: Inferred, origin: str) -> str:
    """A catalog.d file: a comment header (what was inferred from which file), then the entry."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# yaml-language-server: $schema={SCHEMA.as_uri()}",
        f"# Written by `meshserve models add` on {stamp}, inferred from {origin}:",
        *(f"#   {note}" for note in inferred.notes),
        "# Edit freely (e.g. tasks: the first is the default); `meshserve models check FILE` validates it.",
    ]
    body = dump(entry_data(inferred.entry))
    return "\n".join(lines) + "\n" + body


def entry_file(catalog_dir: Path, model_id: str) -> Path:
    """catalog.d/<id>.yaml; an id's '/' makes a subfolder (catalog.d/org/name.yaml)."""
    return catalog_dir / f"{model_id}.yaml"


def write_run_catalog(home: Path, entries: list[ModelEntry]) -> Path:
    """The catalog of one `meshserve up --model` run, under $MESHSERVE_HOME/run/."""
    Catalog(entries)  # ids and inference names unique, or ValueError
    run = home / "run"
    run.mkdir(parents=True, exist_ok=True)
    path = run / "catalog.yaml"
    header = "# Generated by `meshserve up --model`: the models of this run. Rewritten at each run.\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + dump({"models": [entry_data(e) for e in entries]}))
    tmp.replace(path)  # atomic: a service (or a test) never reads half a catalog
    return path

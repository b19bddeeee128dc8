"""Model builders: `meshserve models build` trains the catalog's `source: {kind: build}` models with
these, offline and deterministically. Each builder module offers `inputs()` (files that define the
build, for the cache fingerprint), `build(entry, out, base, progress)` (writes the model folder,
returns its metrics) and `card(entry, metrics)` (the model card's Markdown)."""

from __future__ import annotations

import importlib
from types import ModuleType

BUILDERS = ("sentiment", "digits", "tinylm")


def get(name: str) -> ModuleType:
    if name not in BUILDERS:
        raise ValueError(f"unknown builder {name!r}; known: {', '.join(BUILDERS)}")
    return importlib.import_module(f"services.models.builders.{name}")

"""The per-user cache of trained models (services.models.build): a second store (another clone) copies
a build of the same fingerprint instead of training it again; a changed input, `force` or a cache
turned off trains."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from services.common.catalog import Catalog
from services.common.modelstore import MANIFEST
from services.models import build as modelstore
from services.models import builders

CATALOG = """\
models:
  - id: test/cached
    tasks: [feature-extraction]
    source: {kind: build, builder: tiny}
    inference:
      name: cached
      runtime: sentence_embedding
      inputs: [{name: input_ids, datatype: INT64, dims: [-1]}]
      outputs: [{name: embedding, datatype: FP32, dims: [4]}]
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A builder that records each training run; its one input file is `tiny.py` in tmp_path."""
    source = tmp_path / "tiny.py"
    source.write_text("v1")
    runs: list[Path] = []

    def build(entry, out: Path, base, progress) -> dict:
        runs.append(out)
        out.mkdir(parents=True)
        (out / "weights.bin").write_bytes(source.read_bytes() * 3)
        return {"run": len(runs)}

    fake = types.SimpleNamespace(inputs=lambda: [source], build=build, card=lambda e, m: f"# tiny {m}\n")
    monkeypatch.setattr(builders, "get", lambda name: fake)
    monkeypatch.setenv(modelstore.CACHE_ENV, str(tmp_path / "cache"))
    (tmp_path / "catalog.yaml").write_text(CATALOG)
    return types.SimpleNamespace(catalog=Catalog.load(tmp_path / "catalog.yaml"), source=source, runs=runs)


def build(tiny, store: Path, **kw) -> bool:
    ((_, built),) = modelstore.build_all(tiny.catalog, store, **kw)
    return built


def folder(store: Path) -> Path:
    return store / "test" / "cached"


def test_a_second_store_copies_the_cached_build_instead_of_training(tiny, tmp_path):
    assert build(tiny, tmp_path / "clone-a") and len(tiny.runs) == 1
    assert build(tiny, tmp_path / "clone-b") and len(tiny.runs) == 1  # materialized, not trained
    a, b = folder(tmp_path / "clone-a"), folder(tmp_path / "clone-b")
    assert (b / "model" / "weights.bin").read_bytes() == (a / "model" / "weights.bin").read_bytes() == b"v1" * 3
    assert json.loads((b / MANIFEST).read_text()) == json.loads((a / MANIFEST).read_text())
    assert (b / "README.md").read_text() == "# tiny {'run': 1}\n"
    assert not build(tiny, tmp_path / "clone-b")  # then up to date, as before


def test_a_changed_input_trains_and_both_builds_stay_cached(tiny, tmp_path):
    build(tiny, tmp_path / "clone-a")
    tiny.source.write_text("v2")
    assert build(tiny, tmp_path / "clone-b") and len(tiny.runs) == 2
    assert (folder(tmp_path / "clone-b") / "model" / "weights.bin").read_bytes() == b"v2" * 3
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".part")]) == 2


def test_force_trains_again_and_refreshes_the_cached_copy(tiny, tmp_path):
    build(tiny, tmp_path / "clone-a")
    assert build(tiny, tmp_path / "clone-a", force=True) and len(tiny.runs) == 2
    build(tiny, tmp_path / "clone-b")
    assert len(tiny.runs) == 2
    assert "'run': 2" in (folder(tmp_path / "clone-b") / "README.md").read_text()


@pytest.mark.parametrize("value", ["off", ""])
def test_a_cache_turned_off_trains_every_store(tiny, tmp_path, monkeypatch, value):
    monkeypatch.setenv(modelstore.CACHE_ENV, value)
    assert modelstore.cache_root() is None
    build(tiny, tmp_path / "clone-a")
    build(tiny, tmp_path / "clone-b")
    assert len(tiny.runs) == 2 and not (tmp_path / "cache").exists()


def test_an_unwritable_cache_still_builds(tiny, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(modelstore.CACHE_ENV, str(blocker / "cache"))
    assert build(tiny, tmp_path / "clone-a") and len(tiny.runs) == 1
    assert (folder(tmp_path / "clone-a") / "model" / "weights.bin").exists()


def test_the_default_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv(modelstore.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert modelstore.cache_root() == tmp_path / "meshserve" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert modelstore.cache_root() == Path.home() / ".cache" / "meshserve" / "models"


def test_a_store_built_before_the_cache_existed_seeds_it(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv(modelstore.CACHE_ENV, "off")
    build(tiny, tmp_path / "clone-a")
    monkeypatch.setenv(modelstore.CACHE_ENV, str(tmp_path / "cache"))
    assert not build(tiny, tmp_path / "clone-a")  # up to date: nothing built, the cache gets a copy
    assert build(tiny, tmp_path / "clone-b") and len(tiny.runs) == 1
    assert (folder(tmp_path / "clone-b") / "model" / "weights.bin").read_bytes() == b"v1" * 3

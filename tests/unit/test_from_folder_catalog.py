"""Where inferred entries live and are read from: catalog.d beside the shipped catalog, path folders
read in place, hub snapshots from the HF cache (a cache laid out by hand: no network), the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.catalog import CatalogFileError, ModelEntry, Source, entry_schema, read_catalog
from services.common.modelstore import is_built, model_dir
from services.common.settings import REPO_ROOT
from services.models.from_folder import entry_from_folder
from services.models.user_models import dump, entry_data
from tests.unit.test_from_folder import bert

CATALOG = REPO_ROOT / "catalog.yaml"


@pytest.fixture
def folder(tmp_path) -> Path:
    return bert(tmp_path / "src" / "my-classifier", "BertForSequenceClassification", num_labels=3)


def test_committed_schema_is_the_generated_one():
    assert (REPO_ROOT / "schemas" / "catalog-entry.schema.json").read_text() == entry_schema()


def test_written_entry_reads_back_equal(folder):
    entry = entry_from_folder(folder, model_id="acme/clf")
    assert ModelEntry.model_validate(yaml.safe_load(dump(entry_data(entry)))) == entry


def test_catalog_d_entries_join_the_shipped_catalog(tmp_path, folder):
    (tmp_path / "catalog.d" / "acme").mkdir(parents=True)
    entry = entry_from_folder(folder, model_id="acme/clf")
    (tmp_path / "catalog.d" / "acme" / "clf.yaml").write_text(dump(entry_data(entry)))
    catalog = read_catalog(CATALOG, tmp_path / "catalog.d")
    assert catalog.get("acme/clf") == entry
    assert len(catalog.models) == len(read_catalog(CATALOG, None).models) + 1


def test_a_bad_catalog_d_file_is_skipped_by_services_and_refused_when_strict(tmp_path, folder):
    (tmp_path / "catalog.d").mkdir()
    (tmp_path / "catalog.d" / "good.yaml").write_text(dump(entry_data(entry_from_folder(folder, model_id="a/good"))))
    (tmp_path / "catalog.d" / "bad.yaml").write_text("id: a/bad\ntasks: [no-such-task]\n")
    problems: list[str] = []
    catalog = read_catalog(CATALOG, tmp_path / "catalog.d", problems=problems)
    assert catalog.get("a/good") and len(problems) == 1 and "bad.yaml" in problems[0]
    with pytest.raises(
        CatalogFileError,
        match=r"bad.yaml: not a valid catalog entry:\n  tasks: unknown task 'no-such-task'.*\n  source: Field required",
    ):
        read_catalog(CATALOG, tmp_path / "catalog.d", strict=True)


def test_a_catalog_d_id_clashing_with_the_catalog_is_refused(tmp_path, folder):
    (tmp_path / "catalog.d").mkdir()
    clash = entry_from_folder(folder, model_id="meshserve/sentiment-minilm")
    (tmp_path / "catalog.d" / "x.yaml").write_text(dump(entry_data(clash)))
    with pytest.raises(CatalogFileError, match=r"x.yaml: id 'meshserve/sentiment-minilm'.*already in the catalog"):
        read_catalog(CATALOG, tmp_path / "catalog.d", strict=True)


def test_path_folder_is_read_in_place(tmp_path, folder):
    entry = entry_from_folder(folder, model_id="acme/clf")
    assert model_dir(entry, tmp_path / "models") == folder.resolve()
    assert is_built(entry, tmp_path / "models")
    for path in sorted(folder.iterdir()):
        path.unlink()
    folder.rmdir()
    assert not is_built(entry, tmp_path / "models")


def hf_cache(cache: Path, repo: str, src: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The HF hub cache layout: models--org--name/refs/main -> snapshots/<sha>/<files>."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)
    snapshot = root / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for path in src.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    return snapshot


HUB_CHECK = """
import json, sys
from services.common.catalog import ModelEntry
from services.common.modelstore import is_built, model_dir
from services.models.build import build_entry
from pathlib import Path
entry = ModelEntry.model_validate(json.loads(sys.argv[1]))
folder, _ = build_entry(entry, Path(sys.argv[2]))
print(json.dumps([str(model_dir(entry, Path(sys.argv[2]))), is_built(entry, Path(sys.argv[2])), str(folder)]))
"""


def test_hub_entry_resolves_the_cached_snapshot_offline(tmp_path, folder):
    snapshot = hf_cache(tmp_path / "hub", "acme/classifier", folder)
    entry = entry_from_folder(snapshot, model_id="acme/classifier", source=Source(kind="hub", repo="acme/classifier"))
    missing = entry.model_copy(update={"source": Source(kind="hub", repo="acme/other")})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    for item, expected in ((entry, [str(snapshot), True]), (missing, None)):
        done = subprocess.run(
            [sys.executable, "-c", HUB_CHECK, item.model_dump_json(), str(tmp_path / "models")],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if expected is None:  # not cached, offline: the fetch fails, nothing is built
            assert done.returncode != 0, done.stdout
        else:
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)[:2] == expected
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").rglob("model"))

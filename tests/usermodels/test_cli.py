"""`meshserve models add|list|check|schema` and `up --model` refusals, run as a user runs them: the
real command in a subprocess, with its own MESHSERVE_HOME and HF cache (offline)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.common.catalog import ModelEntry
from services.common.settings import REPO_ROOT
from tests.unit.test_from_folder import bert
from tests.unit.test_from_folder_catalog import hf_cache


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


def meshserve(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    env.update(MESHSERVE_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(home.parent / "hub"))
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture
def folder(tmp_path) -> Path:
    return bert(tmp_path / "models" / "my-reranker", "BertForSequenceClassification", num_labels=1)


def listed(home: Path) -> dict[str, list[str]]:
    done = meshserve(home, "models", "list")
    assert done.returncode == 0, done.stderr
    return {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}


def test_models_add_writes_a_commented_entry_that_checks_and_lists(home, folder):
    done = meshserve(home, "models", "add", str(folder))
    assert done.returncode == 0, done.stderr
    written = home / "catalog.d" / "local" / "my-reranker.yaml"
    assert written.read_text() == done.stdout
    assert "# Written by `meshserve models add`" in done.stdout and "config.json: architectures" in done.stdout
    entry = ModelEntry.model_validate(yaml.safe_load(written.read_text()))
    assert entry.id == "local/my-reranker" and entry.tasks == ("text-ranking", "text-classification")
    assert entry.source.kind == "path" and entry.source.path == str(folder.resolve())
    check = meshserve(home, "models", "check", str(written))
    assert check.returncode == 0 and "ok: local/my-reranker" in check.stdout
    row = listed(home)["local/my-reranker"]
    assert row[1:4] == ["text-ranking,text-classification", "sequence_classification", "built"]
    assert row[4] == f"path:{folder.resolve()}"
    assert "sentence-transformers/all-MiniLM-L6-v2" in listed(home)  # beside the shipped catalog


def test_models_add_refuses_a_taken_id_unless_forced(home, folder):
    assert meshserve(home, "models", "add", str(folder), "--id", "acme/rr").returncode == 0
    again = meshserve(home, "models", "add", str(folder), "--id", "acme/rr", "--task", "text-classification")
    assert again.returncode == 2 and "'acme/rr' is already in the catalog; --force" in again.stderr
    forced = meshserve(
        home, "models", "add", str(folder), "--id", "acme/rr", "--task", "text-classification", "--force"
    )
    assert forced.returncode == 0, forced.stderr
    assert listed(home)["acme/rr"][1] == "text-classification,text-ranking"
    shipped = meshserve(home, "models", "add", str(folder), "--id", "meshserve/sentiment-minilm", "--force")
    assert shipped.returncode == 2 and "shipped catalog" in shipped.stderr


def test_models_add_refuses_a_task_the_model_cannot_do(home, folder):
    done = meshserve(home, "models", "add", str(folder), "--task", "fill-mask")
    assert done.returncode == 2
    assert "task 'fill-mask'" in done.stderr and "choices: text-ranking, text-classification" in done.stderr
    assert not (home / "catalog.d").exists()


def test_models_add_from_the_hub_cache_offline(home, folder):
    hf_cache(home.parent / "hub", "acme/reranker", folder)
    done = meshserve(home, "models", "add", "acme/reranker")
    assert done.returncode == 0, done.stderr
    entry = ModelEntry.model_validate(yaml.safe_load((home / "catalog.d" / "acme" / "reranker.yaml").read_text()))
    assert entry.id == "acme/reranker" and entry.source.kind == "hub" and entry.source.repo == "acme/reranker"
    assert listed(home)["acme/reranker"][3:] == ["built", "hub:acme/reranker"]
    missing = meshserve(home, "models", "add", "acme/not-cached")
    assert missing.returncode == 2 and "hub repo acme/not-cached: cannot fetch it" in missing.stderr


def test_models_list_says_when_a_folder_is_missing(home, folder):
    assert meshserve(home, "models", "add", str(folder)).returncode == 0
    shutil.rmtree(folder)
    assert listed(home)["local/my-reranker"][3:5] == ["folder", "missing"]


def test_models_add_of_an_unservable_folder_names_the_file_and_field(home, tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"architectures": ["WhisperForConditionalGeneration"]}')
    done = meshserve(home, "models", "add", str(tmp_path / "bad"))
    assert done.returncode == 2
    assert "config.json: architectures 'WhisperForConditionalGeneration' has no runtime" in done.stderr
    assert "ForSequenceClassification" in done.stderr and "Traceback" not in done.stderr


def test_models_check_makes_pydantic_readable(home, tmp_path):
    bad = tmp_path / "entry.yaml"
    bad.write_text("id: a/b\ntasks: [text-classification]\nsource: {kind: path}\n")
    done = meshserve(home, "models", "check", str(bad))
    assert done.returncode == 2
    assert f"{bad}: not a valid catalog entry:" in done.stderr
    assert "  source: source kind 'path' needs source.path" in done.stderr
    assert "  inference: Field required" in done.stderr and "Traceback" not in done.stderr


def test_models_check_validates_the_shipped_catalog(home):
    done = meshserve(home, "models", "check", str(REPO_ROOT / "catalog.yaml"))
    assert done.returncode == 0 and done.stdout.count("ok: ") == 4


def test_models_schema_prints_the_committed_schema(home):
    done = meshserve(home, "models", "schema")
    assert done.returncode == 0
    assert done.stdout == (REPO_ROOT / "schemas" / "catalog-entry.schema.json").read_text()


def test_up_with_an_unservable_folder_exits_2_and_starts_nothing(home, tmp_path, folder):
    (tmp_path / "no-tokenizer").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "no-tokenizer" / "config.json")
    done = meshserve(home, "up", "--model", str(folder), "--model", str(tmp_path / "no-tokenizer"), timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("meshserve:")]
    assert lines == [f"meshserve: {tmp_path / 'no-tokenizer'}: no tokenizer.json; a fast tokenizer is needed "
                     "(save it with AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(folder))"]  # fmt: skip
    assert not (home / "run").exists() and not (home / "models").exists()


def test_up_refuses_two_models_under_one_id(home, folder):
    done = meshserve(home, "up", "--model", f"acme/x={folder}", "--model", f"acme/x={folder}", timeout=120)
    assert done.returncode == 2 and "id 'acme/x' is already served" in done.stderr
    assert not (home / "run").exists()


def test_up_with_a_path_that_is_neither_folder_nor_repo(home, tmp_path):
    done = meshserve(home, "up", "--model", str(tmp_path / "nowhere"), timeout=120)
    assert done.returncode == 2 and "not a model folder (nor a hub repo id like org/name)" in done.stderr


def test_up_model_serves_its_models_alone_or_beside_the_catalog(home, folder, monkeypatch):
    """What `up --model` hands its children: a generated catalog, catalog.d out of the way unless
    --with-catalog (in process: the supervisor is not started)."""
    from argparse import Namespace

    from services import cli
    from services.common.catalog import load_catalog
    from services.common.settings import CommonSettings

    monkeypatch.setenv("MESHSERVE_HOME", str(home))
    for name in ("MESHSERVE_CATALOG", "MESHSERVE_CATALOG_DIR"):
        monkeypatch.delenv(name, raising=False)
    assert meshserve(home, "models", "add", str(folder), "--id", "acme/added").returncode == 0
    alone = cli._run_catalog(Namespace(model=[f"acme/up={folder}"], with_catalog=False), CommonSettings())
    assert [e.id for e in alone.models] == ["acme/up"]
    assert os.environ["MESHSERVE_CATALOG"] == str((home / "run" / "catalog.yaml").resolve())
    assert [e.id for e in load_catalog(CommonSettings()).models] == ["acme/up"]  # what the children read
    monkeypatch.delenv("MESHSERVE_CATALOG")
    monkeypatch.delenv("MESHSERVE_CATALOG_DIR")
    beside = cli._run_catalog(Namespace(model=[f"acme/up={folder}"], with_catalog=True), CommonSettings())
    ids = [e.id for e in load_catalog(CommonSettings()).models]
    assert ids == [e.id for e in beside.models]
    assert ids[-2:] == ["acme/added", "acme/up"] and "meshserve/tiny-llama-chat" in ids

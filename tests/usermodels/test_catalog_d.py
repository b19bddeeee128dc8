"""Added models: `models add` + `up` and `up --model` serve the same entry for the same folder; ids
with '/' work in every URL; `models list` and `GET /v1/models` show the user models."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from services.common.catalog import Catalog, ModelEntry, read_catalog
from tests.helpers import MESH_PORTS, REPO, free_port, mesh_home
from tests.usermodels.conftest import cli_env, empty_catalog, run_cli

pytestmark = pytest.mark.xdist_group("usermodels")
PORT_VARS = {
    "http": "MESHSERVE_GATEWAY_HTTP_PORT", "grpc": "MESHSERVE_GATEWAY_GRPC_PORT",
    "pre": "MESHSERVE_PREPROCESS_GRPC_PORT", "pre_m": "MESHSERVE_PREPROCESS_METRICS_PORT",
    "inference": "MESHSERVE_INFERENCE_GRPC_PORT", "inf_m": "MESHSERVE_INFERENCE_METRICS_PORT",
    "post": "MESHSERVE_POSTPROCESS_GRPC_PORT", "post_m": "MESHSERVE_POSTPROCESS_METRICS_PORT",
}  # fmt: skip


def served_ids(user_mesh, user_folders) -> list[str]:
    return sorted(set(user_folders) - set(user_mesh.refused))


def added_catalog(user_mesh) -> Catalog:
    """What the embedded user mesh serves: its empty catalog plus the catalog.d `models add` wrote."""
    home = Path(user_mesh.env["MESHSERVE_HOME"])
    return read_catalog(Path(user_mesh.env["MESHSERVE_CATALOG"]), home / "catalog.d", strict=True)


def _stop_tree(process: subprocess.Popen, home: Path) -> None:
    """SIGTERM `up` and wait; then SIGKILL anything still running under its home (by PID)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(60)
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("MESHSERVE_HOME") == str(home):
                proc.kill()
    if process.poll() is None:
        process.kill()
        process.wait(10)


def up_model_catalog(tmp_path: Path, folders: dict[str, Path], timeout_s: float = 300) -> Catalog:
    """The catalog a real `meshserve up --model ID=PATH ...` writes for its children (run/catalog.yaml),
    read as soon as it is written; the run is stopped then (the mesh itself is not needed)."""
    home = mesh_home(tmp_path / "home")
    ports = {PORT_VARS[name]: str(free_port()) for name in MESH_PORTS}
    ports["MESHSERVE_INFERENCE_HTTP_PORT"] = str(free_port())  # not the default 8000: tests run side by side
    env = cli_env(home, empty_catalog(tmp_path), {**ports, "MESHSERVE_GATEWAY_AUTH": "false"})
    models = [item for model_id, folder in folders.items() for item in ("--model", f"{model_id}={folder}")]
    written = home / "run" / "catalog.yaml"
    with open(tmp_path / "up.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--no-build", *models], cwd=REPO, env=env, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                catalog = Catalog.load(written)
                if {m.id for m in catalog.models} == set(folders):
                    return catalog
            assert process.poll() is None, (tmp_path / "up.log").read_text()
            time.sleep(0.1)
        raise TimeoutError(f"up --model wrote no catalog in {timeout_s} s")
    finally:
        _stop_tree(process, home)


def _dump(entry: ModelEntry) -> dict:
    return entry.model_dump(mode="json")


@pytest.mark.parametrize("user_mesh", ["embedded"], indirect=True)
def test_models_add_and_up_model_infer_the_same_entry(user_mesh, user_folders, tmp_path):
    ids = served_ids(user_mesh, user_folders)
    added = added_catalog(user_mesh)
    direct = up_model_catalog(tmp_path, {model_id: user_folders[model_id] for model_id in ids})
    for model_id in ids:
        assert _dump(added.get(model_id)) == _dump(direct.get(model_id)), model_id


def test_every_user_folder_is_accepted(user_mesh):
    phases = ", ".join(f"{name} {value:.1f}" for name, value in user_mesh.timings.items())
    print(f"user_mesh[{user_mesh.backend}] started in {user_mesh.start_s:.1f} s ({phases})")
    assert user_mesh.refused == {}


def test_v1_models_lists_every_user_model_and_nothing_else(user_mesh, user_folders):
    listed = httpx.get(f"{user_mesh.url}/v1/models", timeout=30).json()["data"]
    assert sorted(m["id"] for m in listed) == served_ids(user_mesh, user_folders)
    assert all(m["owned_by"] == m["id"].split("/")[0] for m in listed), listed


def test_ids_with_a_slash_work_in_every_model_url(user_mesh, user_folders):
    for model_id in served_ids(user_mesh, user_folders):
        url = user_mesh.url
        assert httpx.get(f"{url}/models/{model_id}/health", timeout=30).status_code == 200, model_id
        info = httpx.get(f"{url}/models/{model_id}/info", timeout=30)
        assert info.status_code == 200 and info.json()["id"] == model_id, info.text
        for path in (model_id, model_id.replace("/", "%2F")):
            card = httpx.get(f"{url}/v1/models/{path}", timeout=30)
            assert card.status_code == 200 and card.json()["id"] == model_id, card.text


def _embedders(user_mesh, user_folders) -> list[str]:
    found = []
    for model_id in served_ids(user_mesh, user_folders):
        card = httpx.get(f"{user_mesh.url}/v1/models/{model_id}", timeout=30).json()
        if card["meshserve"]["default_task"] == "feature-extraction":
            found.append(model_id)
    return found


def test_an_id_with_a_slash_names_the_model_of_v1_embeddings_and_its_hf_url(user_mesh, user_folders):
    embedders = _embedders(user_mesh, user_folders)
    if not embedders:
        pytest.skip("no user embedder is served")
    for model_id in embedders:
        reply = httpx.post(
            f"{user_mesh.url}/v1/embeddings", json={"model": model_id, "input": ["a cat sat"]}, timeout=60
        )
        assert reply.status_code == 200 and reply.json()["model"] == model_id, reply.text
        openai_vector = np.array(reply.json()["data"][0]["embedding"])
        hf = httpx.post(f"{user_mesh.url}/models/{model_id}", json={"inputs": "a cat sat"}, timeout=60)
        assert hf.status_code == 200, hf.text
        hf_vector = np.array(hf.json()).reshape(-1)
        cosine = openai_vector @ hf_vector / (np.linalg.norm(openai_vector) * np.linalg.norm(hf_vector))
        assert cosine == pytest.approx(1.0, abs=1e-5), model_id


@pytest.mark.parametrize("user_mesh", ["embedded"], indirect=True)
def test_models_list_shows_the_added_models_with_task_runtime_status_and_source(user_mesh, user_folders):
    home = Path(user_mesh.env["MESHSERVE_HOME"])
    done = run_cli(home, "models", "list", catalog=Path(user_mesh.env["MESHSERVE_CATALOG"]))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:] if line.strip()}
    assert sorted(rows) == served_ids(user_mesh, user_folders)
    catalog = added_catalog(user_mesh)
    for model_id, row in rows.items():
        entry = catalog.get(model_id)
        assert row[1:4] == [",".join(entry.tasks), entry.inference.runtime, "built"], row
        assert row[4] == f"path:{user_folders[model_id].resolve()}", row

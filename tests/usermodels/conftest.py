"""Fixtures for users' model folders: every `folders_*.py` builder's folder (built once per machine),
one mesh per inference backend serving all of them and nothing else, and clients aimed at it.

The embedded mesh serves them the `meshserve models add` way (entries in <home>/catalog.d, read
beside an empty catalog); the Triton mesh the `meshserve up --model ID=PATH` way. Both are
session-scoped: test modules that use them carry `pytestmark = pytest.mark.xdist_group("usermodels")`
so each mesh starts once, on one worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO, START_TIMEOUT_S, TRITON_SKIP_REASON, TRITON_SUPPORTED, Mesh, mesh_home, start_mesh
from tests.usermodels.factory import all_builders, built

BACKENDS = [
    "embedded",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)),
]
# One Python-backend stub per model under Triton, each importing torch and transformers: measured
# 263 s for 18 folders on the 2-core machine at load average ~28 (other meshes running), within the
# shared bound; the pytest timeout (900 s) covers the first test's fixture setup too.
USER_START_TIMEOUT_S = START_TIMEOUT_S
# `meshserve models add PATH --id ID` for each folder of a dict given as JSON, one after another in
# one interpreter (each command's own process spent ~5 s of its CPU importing transformers for the
# tokenizer check; 18 folders paid it 18 times): {id: [exit code, stdout, stderr]} as JSON.
ADD_SCRIPT = """
import contextlib, io, json, sys
from services.cli import main
done = {}
for model_id, folder in json.loads(sys.argv[1]).items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["models", "add", folder, "--id", model_id])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
    done[model_id] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(done))
"""


def empty_catalog(folder: Path) -> Path:
    """A catalog file with no models, so that a mesh serves only what it is given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "empty-catalog.yaml"
    path.write_text("models: []\n")
    return path


def cli_env(home: Path, catalog: Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a `meshserve` command run against `home` (and `catalog`, if given)."""
    env = {**os.environ, "MESHSERVE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("MESHSERVE_CATALOG_DIR", None)  # catalog.d is the home's own
    if catalog is not None:
        env["MESHSERVE_CATALOG"] = str(catalog)
    return {**env, **(extra_env or {})}


def run_cli(
    home: Path, *args: str, catalog: Path | None = None, extra_env: dict[str, str] | None = None, timeout_s: float = 300
) -> subprocess.CompletedProcess:
    """`python -m services.cli ARGS` with MESHSERVE_HOME=home; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], cwd=REPO, env=cli_env(home, catalog, extra_env),
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip


def add_models(home: Path, folders: dict[str, Path], catalog: Path | None = None, *, strict: bool = True) -> dict:
    """`meshserve models add PATH --id ID` for each folder (entries land in <home>/catalog.d), the
    CLI's own `main` called in turn in one process (ADD_SCRIPT).
    strict: a refusal raises; else the refusals are returned (model id -> the command's output)."""
    specs = json.dumps({model_id: str(folder) for model_id, folder in folders.items()})
    run = subprocess.run(
        [sys.executable, "-c", ADD_SCRIPT, specs], cwd=REPO, env=cli_env(home, catalog),
        capture_output=True, text=True, timeout=300 + 30 * len(folders),
    )  # fmt: skip
    if run.returncode != 0:
        raise RuntimeError(f"models add exited {run.returncode}:\n{run.stdout}\n{run.stderr}")
    done = json.loads(run.stdout.splitlines()[-1])
    refused = {
        model_id: f"models add {model_id} exited {code}:\n{out}\n{err}"
        for model_id, (code, out, err) in done.items()
        if code != 0
    }
    if strict and refused:
        raise RuntimeError("\n".join(refused.values()))
    return refused


def refusals(folders: dict[str, Path]) -> dict[str, str]:
    """The folders that cannot be served (model id -> why), checked in process in a few seconds: the
    entry cannot be inferred, or its runtime does not load the folder. A mesh waits for every model
    to be READY, so one such folder would otherwise hold the whole mesh unready until its timeout."""
    from services.inference.runtime import load_runtime
    from services.models.from_folder import FolderError, entry_from_folder

    refused = {}
    for model_id, folder in folders.items():
        try:
            entry = entry_from_folder(folder, model_id=model_id)
            load_runtime(entry.inference.runtime, folder)
        except FolderError as exc:
            refused[model_id] = f"refused: {exc}"
        except Exception as exc:  # the runtime's own failure, named for the test that needs the model
            refused[model_id] = f"its runtime does not load it: {type(exc).__name__}: {exc}"
    return refused


def serve_folders(
    tmp_path: Path,
    folders: dict[str, Path],
    backend: str,
    *,
    home: Path | None = None,
    catalog: Path | None = None,
    extra_env: dict[str, str] | None = None,
    strict: bool = True,
    timeout_s: float = USER_START_TIMEOUT_S,
) -> Mesh:
    """A mesh serving exactly `folders` (beside `catalog`, empty by default, and what `home`'s
    catalog.d already holds): embedded through `models add`, Triton through `up --model ID=PATH`.
    strict=False: folders that are refused are left out and listed in the returned Mesh's `refused`
    (model id -> why), so that one area's unfinished folder does not stop the others' tests."""
    home = home or mesh_home(tmp_path / "home")
    catalog = catalog or empty_catalog(tmp_path)
    env = {"MESHSERVE_CATALOG": str(catalog), "MESHSERVE_CATALOG_DIR": str(home / "catalog.d"), **(extra_env or {})}
    timings, started = {}, time.monotonic()
    refused = {} if strict else refusals(folders)
    folders = {model_id: folder for model_id, folder in folders.items() if model_id not in refused}
    timings["check_s"], started = time.monotonic() - started, time.monotonic()
    args = [item for model_id, folder in folders.items() for item in ("--model", f"{model_id}={folder}")]
    if backend == "embedded":
        refused |= add_models(home, folders, catalog, strict=strict)
        args = []
    timings["add_s"], started = time.monotonic() - started, time.monotonic()
    mesh = start_mesh(tmp_path, env, backend=backend, home=home, args=args, timeout_s=timeout_s)
    timings["up_s"] = time.monotonic() - started
    mesh.refused, mesh.timings = refused, timings  # timings: where the start time went (seconds)
    return mesh


@pytest.fixture(scope="session")
def user_folders() -> dict[str, Path]:
    """Model id -> built folder, for every builder of every folders_*.py module."""
    return {model_id: built(model_id, builder) for model_id, builder in sorted(all_builders().items())}


@pytest.fixture(scope="session")
def _user_meshes() -> Iterator[dict[str, Mesh]]:
    """The user meshes started so far, by backend; all stopped when the session ends. Both stay up
    together: a session fixture with params keeps one param alive at a time, and pytest's ordering
    of this group's modules restarted each mesh (130 s for Triton) every time the backend changed."""
    meshes: dict[str, Mesh] = {}
    yield meshes
    running = [mesh for mesh in meshes.values() if isinstance(mesh, Mesh)]
    for mesh in running:  # side by side: Triton's 18 stubs take ~30 s to unload
        mesh.terminate()
    for mesh in running:
        mesh.wait_stopped()


@pytest.fixture(params=BACKENDS)
def user_mesh(request, _user_meshes, user_folders, tmp_path_factory) -> Mesh:
    """One mesh per backend serving every user folder under its id (and no shipped model). A folder
    the CLI refuses is left out and named in `user_mesh.refused`; `hf_client` fails on it."""
    if not user_folders:
        pytest.skip("no tests/usermodels/folders_*.py module defines a folder yet")
    backend = request.param
    if backend not in _user_meshes:
        started = time.monotonic()
        tmp_path = tmp_path_factory.mktemp(f"usermesh-{backend}")
        try:
            mesh = serve_folders(tmp_path, user_folders, backend, strict=False)
        except Exception as exc:  # fail this backend's other tests at once instead of retrying the start
            _user_meshes[backend] = exc
            raise
        mesh.start_s = time.monotonic() - started  # the harness's cost (test_catalog_d prints it)
        _user_meshes[backend] = mesh
    mesh = _user_meshes[backend]
    if isinstance(mesh, Exception):
        pytest.fail(f"the {backend} user mesh did not start: {mesh}")
    return mesh


def served(user_mesh: Mesh, model_id: str) -> str:
    """The model's URL on the user mesh; fails the test with the CLI's reason if it was refused."""
    if model_id in user_mesh.refused:
        pytest.fail(f"{model_id} is not served: {user_mesh.refused[model_id]}")
    return f"{user_mesh.url}/models/{model_id}"


@pytest.fixture
def hf_client(user_mesh) -> Callable:
    """`hf_client(model_id, task=None)`: huggingface_hub's InferenceClient on the model's URL
    (`/models/<id>`, or `/models/<id>/pipeline/<task>` for a task other than its default)."""
    from huggingface_hub import InferenceClient

    def make(model_id: str, task: str | None = None) -> InferenceClient:
        url = served(user_mesh, model_id) + (f"/pipeline/{task}" if task else "")
        return InferenceClient(model=url, timeout=120)

    return make


@pytest.fixture
def openai_client(user_mesh):
    """The openai SDK aimed at the user mesh's `/v1` (the test meshes run without auth)."""
    from openai import OpenAI

    return OpenAI(base_url=user_mesh.url + "/v1", api_key="unused", max_retries=0, timeout=120)

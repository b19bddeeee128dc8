"""The KServe v2 / Triton conformance suite's server fixture: our embedded inference server,
started in-process through the same `create()` that its main() uses, on a free port."""

from __future__ import annotations

import pytest
import pytest_asyncio

from services.inference.main import create
from services.inference.settings import InferenceSettings
from tests.helpers import meshserve_home


@pytest_asyncio.fixture(scope="session", params=["embedded"])
async def inference_server(request, models_dir):
    settings = InferenceSettings(home=meshserve_home(), grpc_port=0, metrics_port=-1)
    running, repository = await create(settings)
    yield {"backend": request.param, "url": f"127.0.0.1:{running.port}", "repository": repository}
    await running.stop(grace_s=2)


@pytest.fixture(scope="session")
def model_name(catalog) -> str:
    return catalog.models[0].inference.name

"""The KServe v2 / Triton conformance suite's server fixture, one per backend, each serving KServe
v2 over gRPC and HTTP/REST:

- embedded: our inference server, started in-process through the same `start()` its main() uses;
- triton: a real `tritonserver` (from the nvidia-pytriton wheel) started by our launcher
  (`python -m services.inference.main` with MESHSERVE_INFERENCE_BACKEND=triton), x86_64 Linux only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from tokenizers import Tokenizer
from tritonclient.grpc import InferenceServerClient

from services.inference.main import start
from services.inference.settings import InferenceSettings
from tests.helpers import (
    MODEL_ID,
    REPO,
    START_TIMEOUT_S,
    TRITON_SKIP_REASON,
    TRITON_SUPPORTED,
    free_port,
    meshserve_home,
)

BACKENDS = [
    "embedded",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_SUPPORTED, reason=TRITON_SKIP_REASON)),
]


def _http_ready(port: int) -> bool:
    """Triton's HTTP/REST endpoint answers ready too (a suite that uses it must not race its start)."""
    if port < 0:
        return True
    return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5).status_code == 200


def start_triton(home: Path, log_path: Path, http_port: int = -1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "MESHSERVE_HOME": str(home),
        "MESHSERVE_INFERENCE_BACKEND": "triton",
        "MESHSERVE_INFERENCE_GRPC_PORT": str(port),
        "MESHSERVE_INFERENCE_HTTP_PORT": str(http_port),
        "MESHSERVE_INFERENCE_METRICS_PORT": str(free_port()),
        "HF_HUB_OFFLINE": "1",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.inference.main"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"triton launcher exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if InferenceServerClient(url).is_server_ready() and _http_ready(http_port):
                return process, url
        except Exception:
            pass
        time.sleep(0.5)
    process.terminate()
    raise TimeoutError(f"triton not ready:\n{log_path.read_text()[-4000:]}")


@pytest_asyncio.fixture(scope="session", params=BACKENDS)
async def inference_server(request, models_dir):
    """Both KServe v2 endpoints of one server: `url` (gRPC, host:port) and `http_url` (HTTP/REST)."""
    if request.param == "embedded":
        settings = InferenceSettings(home=meshserve_home(), grpc_port=0, http_port=0, metrics_port=-1)
        server = await start(settings)
        yield {
            "backend": "embedded",
            "url": f"127.0.0.1:{server.grpc.port}",
            "http_url": f"127.0.0.1:{server.http.port}",
        }
        await server.grpc.stop(grace_s=2)
        return
    # Triton gets its own MESHSERVE_HOME (its generated repository and work dir) over the shared models.
    home = Path(tempfile.mkdtemp(prefix="meshserve-triton-"))
    (home / "models").symlink_to(meshserve_home() / "models")
    http_port = free_port()
    try:
        process, url = start_triton(home, home / "triton.log", http_port)
        yield {
            "backend": "triton",
            "url": url,
            "http_url": f"127.0.0.1:{http_port}",
            "log": home / "triton.log",
            "process": process,
        }
        process.terminate()
        process.wait(60)
    finally:
        shutil.rmtree(home, ignore_errors=True)  # its generated repository and log: nothing outlives the run


@pytest.fixture(scope="session")
def tokenizer(models_dir):
    tok = Tokenizer.from_file(str(models_dir / MODEL_ID / "model" / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    return tok


@pytest.fixture(scope="session")
def model_name(catalog) -> str:
    return catalog.models[0].inference.name

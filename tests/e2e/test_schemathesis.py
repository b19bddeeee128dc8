"""The gateway's REST API against its own `/openapi.json`, fuzzed by schemathesis with a valid API key:
no request it generates gets a 5xx, and every answer is one the schema documents (status code,
JSON content type, body schema). Each operation gets valid requests (positive mode) and, where the
schema gives something to break, invalid ones (negative mode: those must be refused with a 4xx in
the caller's dialect, never a 5xx or FastAPI's own 422 body).

Bounded and deterministic: a fixed number of examples per operation and mode, derandomized (the
same requests every run), no shrinking, each request bounded by a timeout. It runs against a gateway
process of its own (auth and the usage ledger on, its own SQLite file) in front of the shared mesh's
stages.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import sys
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.xdist_group("mesh")  # on the worker that already runs the session meshes
EXAMPLES = 15  # per operation and mode: a fixed count of requests, the same ones every run
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
REQUEST_TIMEOUT_S = 30.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
def gateway(mesh, tmp_path):
    """A gateway with auth and the ledger on, in front of the shared mesh's stages; yields its URL, an
    admin token and its log."""
    tmp = tmp_path
    admin = "msk_admin_" + secrets.token_urlsafe(32)
    port = free_port()
    env = {
        **mesh.env,  # the stages' service token among them
        "MESHSERVE_GATEWAY_HTTP_PORT": str(port),
        "MESHSERVE_GATEWAY_GRPC_PORT": str(free_port()),
        "MESHSERVE_GATEWAY_PREPROCESS_ADDRESS": f"127.0.0.1:{mesh.ports['pre']}",
        "MESHSERVE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh.ports['inference']}",
        "MESHSERVE_GATEWAY_POSTPROCESS_ADDRESS": f"127.0.0.1:{mesh.ports['post']}",
        "MESHSERVE_GATEWAY_AUTH": "true",
        "MESHSERVE_GATEWAY_LEDGER": "true",
        "MESHSERVE_ADMIN_TOKEN": admin,
        "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{tmp / 'gateway.db'}",
    }
    log_path = tmp / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.gateway.main"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not ready(url):
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"gateway not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield url, admin, log_path
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def fuzz(operation, mode, url: str, headers: dict, count: list[int]) -> None:
    """EXAMPLES generated requests of one operation in one mode, each checked against the schema;
    raises what the checks found (schemathesis' report, with a curl line per failure)."""

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(mode))
    def call(case) -> None:
        count[0] += 1
        case.call_and_validate(base_url=url, headers=headers, checks=CHECKS, timeout=REQUEST_TIMEOUT_S)

    call()


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    return False


@pytest.mark.parametrize("mesh", ["embedded"], indirect=True)  # the REST contract is the gateway's alone
def test_every_operation_answers_as_its_schema_documents_and_never_5xx(gateway):
    url, admin, log_path = gateway
    created = httpx.post(
        url + "/admin/keys",
        json={"name": "schemathesis", "scopes": ["admin"]},  # admin: every route's scope
        headers={"authorization": f"Bearer {admin}"},
        timeout=30,
    )
    assert created.status_code in (200, 201), created.text
    headers = {"authorization": f"Bearer {created.json()['token']}"}
    schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers, timeout=30)

    failures: dict[str, str] = {}
    sent: dict[str, int] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in MODES:
            label = f"{operation.label} ({mode.value})"
            count = [0]
            try:
                fuzz(operation, mode, url, headers, count)
            except Unsatisfiable:
                # Negative mode on an operation whose schema leaves nothing to make invalid (no
                # parameters or body, or only free-form strings): no request exists, nothing to check.
                assert mode is schemathesis.GenerationMode.NEGATIVE, label
                continue
            except (Exception, BaseExceptionGroup) as exc:  # every operation runs; each failure is reported
                failures[label] = str(exc)
            sent[label] = count[0]

    report = "\n\n".join(f"== {label}\n{text}" for label, text in failures.items())
    positive = [label for label in sent if label.endswith("(positive)")]
    assert len(positive) >= 10 and all(sent[label] >= 1 for label in sent), (sent, report)
    assert not failures, (
        f"{len(failures)} operation(s) failed:\n{report}\n\ngateway log:\n{log_path.read_text()[-2000:]}"
    )

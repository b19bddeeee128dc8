"""Issue 14 finding 2: the stages of a running `meshserve up` answer only callers with the mesh's
service token (MESHSERVE_SERVICE_TOKEN; tests/unit/test_service_auth.py shows `meshserve up`
generating a fresh one per run when none is set). Driven by the real tritonclient (KServe v2 over
gRPC and HTTP) and
the stages' own stubs, for each inference backend; health checks stay open for probes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.postprocess.v1 import postprocess_pb2, postprocess_pb2_grpc
from meshserve.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc
from meshserve.tasks.v1 import tasks_pb2
from tritonclient.utils import InferenceServerException

from tests.helpers import MODEL_ID, texts

pytestmark = pytest.mark.xdist_group("mesh")

INFERENCE_NAME = "all-MiniLM-L6-v2"


def _refused(err: InferenceServerException, backend: str) -> bool:
    """Our stage answers UNAUTHENTICATED; Triton's own restricted-protocol check answers
    UNAVAILABLE with a message that names the missing header."""
    if backend == "triton":
        return err.status() == "StatusCode.UNAVAILABLE" and "restricted" in err.message()
    return err.status() == "StatusCode.UNAUTHENTICATED"


def _inputs() -> list[triton.InferInput]:
    ids = np.array([[101, 7592, 102]], dtype=np.int64)
    tensors = []
    for name in ("input_ids", "attention_mask"):
        tensor = triton.InferInput(name, list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids if name == "input_ids" else np.ones_like(ids))
        tensors.append(tensor)
    return tensors


KSERVE_CALLS = {
    "ServerMetadata": lambda c: c.get_server_metadata(),
    "RepositoryIndex": lambda c: c.get_model_repository_index(),
    "ModelInfer": lambda c: c.infer(INFERENCE_NAME, _inputs()),
    # An unknown model: with the token the call reaches the repository, and no shared model unloads.
    "RepositoryModelUnload": lambda c: c.unload_model("no-such-model"),
}


@pytest.mark.parametrize("call", KSERVE_CALLS)
def test_inference_refuses_kserve_calls_without_the_service_token(mesh, call):
    client = triton.InferenceServerClient(mesh.inference_target)
    try:
        with pytest.raises(InferenceServerException) as err:
            KSERVE_CALLS[call](client)
        assert _refused(err.value, mesh.backend), (err.value.status(), err.value.message())
        assert mesh.service_token not in err.value.message()
    finally:
        client.close()


def test_inference_answers_kserve_calls_with_the_service_token(mesh):
    client = mesh.authorize(triton.InferenceServerClient(mesh.inference_target))
    try:
        assert client.get_server_metadata().name
        assert INFERENCE_NAME in {m.name for m in client.get_model_repository_index().models}
        result = client.infer(INFERENCE_NAME, _inputs())
        assert result.as_numpy("embedding").shape == (1, 384)
        try:
            client.unload_model("no-such-model")
        except InferenceServerException as err:  # ours: NOT_FOUND; past the token check either way
            assert not _refused(err, mesh.backend) and err.status() != "StatusCode.UNAUTHENTICATED"
    finally:
        client.close()


def _http_refused(err: InferenceServerException, backend: str) -> bool:
    """Over HTTP ours answers 401; Triton's `--http-restricted-api` answers 403 naming the header."""
    if backend == "triton":
        return err.status() == "403" and "restricted" in err.message()
    return err.status() == "401"


def _http_inputs() -> list[triton_http.InferInput]:
    ids = np.array([[101, 7592, 102]], dtype=np.int64)
    tensors = []
    for name in ("input_ids", "attention_mask"):
        tensor = triton_http.InferInput(name, list(ids.shape), "INT64")
        tensor.set_data_from_numpy(ids if name == "input_ids" else np.ones_like(ids))
        tensors.append(tensor)
    return tensors


HTTP_CALLS = {
    "ServerMetadata": lambda c: c.get_server_metadata(),
    "RepositoryIndex": lambda c: c.get_model_repository_index(),
    "ModelInfer": lambda c: c.infer(INFERENCE_NAME, _http_inputs()),
    "RepositoryModelUnload": lambda c: c.unload_model("no-such-model"),
}


@pytest.mark.parametrize("call", HTTP_CALLS)
def test_inference_refuses_kserve_http_calls_without_the_service_token(mesh, call):
    client = triton_http.InferenceServerClient(f"127.0.0.1:{mesh.ports['inference_http']}")
    try:
        with pytest.raises(InferenceServerException) as err:
            HTTP_CALLS[call](client)
        assert _http_refused(err.value, mesh.backend), (err.value.status(), err.value.message())
        assert mesh.service_token not in err.value.message()
    finally:
        client.close()


def test_inference_answers_kserve_http_calls_with_the_service_token_and_probes_without(mesh):
    url = f"127.0.0.1:{mesh.ports['inference_http']}"
    client = mesh.authorize(triton_http.InferenceServerClient(url))
    try:
        assert client.get_server_metadata()["name"]
        assert INFERENCE_NAME in {m["name"] for m in client.get_model_repository_index()}
        assert client.infer(INFERENCE_NAME, _http_inputs()).as_numpy("embedding").shape == (1, 384)
    finally:
        client.close()
    probe = triton_http.InferenceServerClient(url)
    try:
        assert probe.is_server_live() and probe.is_server_ready() and probe.is_model_ready(INFERENCE_NAME)
    finally:
        probe.close()


def test_liveness_readiness_and_grpc_health_need_no_token(mesh):
    client = triton.InferenceServerClient(mesh.inference_target)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(INFERENCE_NAME)
    finally:
        client.close()
    for port in (mesh.ports["pre"], mesh.ports["inference"], mesh.ports["post"]):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _preprocess(channel: grpc.Channel, metadata=()) -> preprocess_pb2.PreprocessResponse:
    request = preprocess_pb2.PreprocessRequest(
        model_id=MODEL_ID, task=tasks_pb2.TASK_FEATURE_EXTRACTION, inputs=texts("a cat")
    )
    return preprocess_pb2_grpc.PreprocessServiceStub(channel).Preprocess(request, metadata=metadata, timeout=30)


def _postprocess(channel: grpc.Channel, metadata=()) -> postprocess_pb2.PostprocessResponse:
    embedding = tasks_pb2.Tensor(name="embedding", datatype="FP32", shape=[1, 384])
    embedding.raw = np.ones((1, 384), dtype="<f4").tobytes()
    request = postprocess_pb2.PostprocessRequest(
        model_id=MODEL_ID, task=tasks_pb2.TASK_FEATURE_EXTRACTION, outputs=[embedding]
    )
    return postprocess_pb2_grpc.PostprocessServiceStub(channel).Postprocess(request, metadata=metadata, timeout=30)


@pytest.mark.parametrize("stage", ["pre", "post"])
def test_preprocess_and_postprocess_answer_only_with_the_service_token(mesh, stage):
    call = _preprocess if stage == "pre" else _postprocess
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports[stage]}") as channel:
        for metadata in ((), (("x-meshserve-service-token", "guess"),)):
            with pytest.raises(grpc.RpcError) as err:
                call(channel, metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(channel, mesh.service_metadata).ByteSize() > 0


def test_the_gateway_still_serves_through_the_closed_stages(mesh):
    import httpx

    reply = httpx.post(f"{mesh.url}/models/{MODEL_ID}", json={"inputs": "a cat"}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert np.asarray(reply.json()).size == 384

"""The gateway's typed gRPC API (meshserve.gateway.v1.GatewayService) through a real channel."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2, status_pb2
from meshserve.gateway.v1 import gateway_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import DETAILS_KEY
from tests.helpers import MODEL_ID, texts

pytestmark = pytest.mark.xdist_group("mesh")


def reason_of(err: grpc.RpcError) -> str:
    for key, value in err.trailing_metadata():
        if key == DETAILS_KEY:
            info = error_details_pb2.ErrorInfo()
            status_pb2.Status.FromString(value).details[0].Unpack(info)
            return info.reason
    return ""


def test_predict_feature_extraction_defaults_to_the_models_first_task(stub, reference_encoder):
    reply = stub.Predict(gateway_pb2.PredictRequest(model_id=MODEL_ID, inputs=texts("one", "two")))
    assert reply.task == tasks_pb2.TASK_FEATURE_EXTRACTION
    vectors = np.frombuffer(reply.result.embeddings.raw, dtype="<f4").reshape(tuple(reply.result.embeddings.shape))
    np.testing.assert_allclose(vectors, reference_encoder.encode(["one", "two"], normalize_embeddings=True), atol=1e-5)
    assert reply.usage.items == 2 and reply.usage.input_tokens == 6  # [CLS] one [SEP] + [CLS] two [SEP]


def test_predict_sentence_similarity(stub):
    request = gateway_pb2.PredictRequest(
        model_id=MODEL_ID,
        task=tasks_pb2.TASK_SENTENCE_SIMILARITY,
        inputs=tasks_pb2.TaskInputs(
            sentence_similarity=tasks_pb2.SentenceSimilarityInputs(
                source_sentence="a cat sits on the mat", sentences=["a kitten on a rug", "quarterly earnings"]
            )
        ),
    )
    scores = list(stub.Predict(request).result.similarities.scores)
    assert len(scores) == 2 and scores[0] > scores[1]


def test_list_and_get_models_report_readiness(stub, catalog):
    models = stub.ListModels(gateway_pb2.ListModelsRequest()).models
    assert [m.id for m in models] == [e.id for e in catalog.models]
    assert all(m.status == gateway_pb2.MODEL_STATUS_READY for m in models)
    model = stub.GetModel(gateway_pb2.GetModelRequest(model_id=MODEL_ID)).model
    assert model.status == gateway_pb2.MODEL_STATUS_READY
    assert list(model.tasks) == [
        tasks_pb2.TASK_FEATURE_EXTRACTION,
        tasks_pb2.TASK_SENTENCE_SIMILARITY,
        tasks_pb2.TASK_ZERO_SHOT_CLASSIFICATION,
    ]


ERRORS = [
    (
        "unknown-model",
        gateway_pb2.PredictRequest(model_id="acme/nope", inputs=texts("x")),
        grpc.StatusCode.NOT_FOUND,
        "model_not_found",
    ),
    (
        "empty-texts",
        gateway_pb2.PredictRequest(model_id=MODEL_ID, inputs=texts()),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_input",
    ),
    (
        "blank-text",
        gateway_pb2.PredictRequest(model_id=MODEL_ID, inputs=texts(" ")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_input",
    ),
    (
        "wrong-inputs-for-task",
        gateway_pb2.PredictRequest(model_id=MODEL_ID, task=tasks_pb2.TASK_SENTENCE_SIMILARITY, inputs=texts("x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_input",
    ),
    (
        "no-truncation-over-limit",
        gateway_pb2.PredictRequest(
            model_id=MODEL_ID, inputs=texts("word " * 600), parameters=tasks_pb2.TaskParameters(truncate=False)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_input",
    ),
    (
        "too-many-items",
        gateway_pb2.PredictRequest(model_id=MODEL_ID, inputs=texts(*["a"] * 2049)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload_too_large",
    ),
    (
        "unknown-task-enum",
        gateway_pb2.PredictRequest(model_id=MODEL_ID, task=99, inputs=texts("x")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unsupported_task",
    ),
]


@pytest.mark.parametrize(("name", "request_pb", "code", "reason"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_carry_the_grpc_code_and_the_meshserve_reason(stub, name, request_pb, code, reason):
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(request_pb)
    assert err.value.code() == code
    assert reason_of(err.value) == reason
    assert "Traceback" not in err.value.details()


def test_get_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(gateway_pb2.GetModelRequest(model_id="acme/nope"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_every_grpc_port_has_health_and_reflection(mesh):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ports = [mesh.ports["grpc"], mesh.ports["pre"], mesh.ports["post"]]
    if mesh.backend == "embedded":  # Triton has its own (KServe) readiness RPCs and no reflection
        ports.append(mesh.ports["inference"])
    for port in ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=mesh.service_metadata,  # the stages' reflection needs the service token
            )
            names = {s.name for s in next(replies).list_services_response.service}
            assert "grpc.health.v1.Health" in names and len(names) >= 3

"""The classification tasks over the typed gRPC API (GatewayService.Predict)."""

from __future__ import annotations

import grpc
import pytest
from meshserve.gateway.v1 import gateway_pb2
from meshserve.tasks.v1 import tasks_pb2

from services.models.builders import digits
from tests.helpers import MODEL_ID, texts

pytestmark = pytest.mark.xdist_group("mesh")


def test_predict_text_classification(stub):
    reply = stub.Predict(
        gateway_pb2.PredictRequest(
            model_id="meshserve/sentiment-minilm",
            inputs=texts("What a delightful little hotel.", "The worst customer service I have had."),
            parameters=tasks_pb2.TaskParameters(top_k=1),
        )
    )
    assert reply.task == tasks_pb2.TASK_TEXT_CLASSIFICATION
    assert [item.labels[0].label for item in reply.result.classifications.items] == ["POSITIVE", "NEGATIVE"]
    assert all(len(item.labels) == 1 for item in reply.result.classifications.items)
    assert reply.usage.input_tokens > 10 and reply.usage.items == 2


def test_predict_zero_shot(stub):
    reply = stub.Predict(
        gateway_pb2.PredictRequest(
            model_id=MODEL_ID,
            task=tasks_pb2.TASK_ZERO_SHOT_CLASSIFICATION,
            inputs=texts("The football team won the match."),
            parameters=tasks_pb2.TaskParameters(candidate_labels=["cooking", "sports", "finance"]),
        )
    )
    (item,) = reply.result.classifications.items
    assert item.labels[0].label == "sports"
    assert sum(c.score for c in item.labels) == pytest.approx(1.0, abs=1e-5)


def test_predict_image_classification_and_bad_image(stub):
    _, _, images, labels = digits.split()
    reply = stub.Predict(
        gateway_pb2.PredictRequest(
            model_id="meshserve/digits-cnn",
            inputs=tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=[digits.render_png(images[0])])),
            parameters=tasks_pb2.TaskParameters(function_to_apply=tasks_pb2.FUNCTION_TO_APPLY_NONE, top_k=3),
        )
    )
    (item,) = reply.result.classifications.items
    assert item.labels[0].label == str(labels[0]) and len(item.labels) == 3
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(
            gateway_pb2.PredictRequest(
                model_id="meshserve/digits-cnn",
                inputs=tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=[b"not an image"])),
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(gateway_pb2.PredictRequest(model_id="meshserve/digits-cnn", inputs=texts("a text")))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

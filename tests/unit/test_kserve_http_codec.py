"""The pure converters of the inference service's KServe v2 HTTP endpoint
(services/inference/http_server.py): protobuf answers as Triton writes them, the binary tensor
extension's framing, and which responses are compressed. Through the real transport and the real
tritonclient: tests/contract/test_kserve_v2.py and test_kserve_http.py."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.grpc import model_config_pb2, service_pb2

from services.common.errors import MeshError
from services.inference.core import InferOutput, InferResult
from services.inference.http_server import (
    infer_inputs,
    infer_response,
    message_json,
    parse_infer_request,
    response_encoding,
)


def test_64_bit_integers_become_json_numbers_at_every_depth():
    stats = service_pb2.ModelStatisticsResponse(
        model_stats=[
            service_pb2.ModelStatistics(
                name="m",
                inference_count=7,
                inference_stats=service_pb2.InferStatistics(success=service_pb2.StatisticDuration(count=3, ns=10**12)),
                batch_stats=[service_pb2.InferBatchStatistics(batch_size=4)],
            )
        ]
    )
    data = message_json(stats)["model_stats"][0]
    assert data["inference_count"] == 7 and data["execution_count"] == 0  # defaults are written too
    assert data["inference_stats"]["success"] == {"count": 3, "ns": 10**12}
    assert data["batch_stats"][0]["batch_size"] == 4
    config = model_config_pb2.ModelConfig(name="m", input=[model_config_pb2.ModelInput(name="x", dims=[-1, 384])])
    config.parameters["threads"].string_value = "2"
    written = message_json(config)
    assert written["input"][0]["dims"] == [-1, 384] and written["max_batch_size"] == 0
    assert written["parameters"] == {"threads": {"string_value": "2"}}


def test_tritonclients_binary_request_is_split_into_raw_inputs_without_copies():
    ids = np.arange(6, dtype=np.int64).reshape(2, 3)
    a = triton_http.InferInput("input_ids", [2, 3], "INT64")
    a.set_data_from_numpy(ids)
    b = triton_http.InferInput("attention_mask", [2, 3], "INT64")
    b.set_data_from_numpy(np.ones_like(ids), binary_data=False)
    body, json_size = triton_http.InferenceServerClient.generate_request_body([a, b])
    request, binary = parse_infer_request(body, str(json_size))
    inputs = infer_inputs(request, binary)
    assert [i.name for i in inputs] == ["input_ids", "attention_mask"]
    assert isinstance(inputs[0].raw, memoryview)
    np.testing.assert_array_equal(np.frombuffer(inputs[0].raw, "<i8"), ids.ravel())
    np.testing.assert_array_equal(np.frombuffer(inputs[1].raw, "<i8"), np.ones(6))
    assert request.parameters["binary_data_output"] is True


@pytest.mark.parametrize(
    ("body", "header_length", "expect"),
    [
        (b"{}", None, "inputs"),
        (b"[1]", None, "malformed"),
        (b'{"inputs": []}xxxx', "99", "outside"),
        (b'{"inputs": []}', "x", "integer"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT64"}]}', None, "neither"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT64", "data": [[1], 2]}]}', None, "INT64"),
        (b'{"inputs": [{"name": "a", "shape": [1], "datatype": "INT64", "parameters": {"binary_data_size": 8}}]}',
         None, "exceeds"),
        (b'{"inputs": []}\x00\x01', "14", "belong to no input"),
    ],
)  # fmt: skip
def test_malformed_requests_are_invalid_input(body, header_length, expect):
    with pytest.raises(MeshError) as err:
        request, binary = parse_infer_request(body, header_length)
        infer_inputs(request, binary)
    assert err.value.code.http_status == 400 and expect in err.value.message


def test_outputs_go_binary_or_json_as_asked():
    array = np.array([[0.5, 1.5]], dtype=np.float32)
    result = InferResult("m", "1", [InferOutput("y", "FP32", (1, 2), array)])
    request, _ = parse_infer_request(b'{"id": "7", "inputs": [], "outputs": [{"name": "y"}]}', None)
    body, header_length = infer_response(request, result)
    assert header_length is None and body == b'{"model_name":"m","model_version":"1","id":"7","outputs":[' \
        b'{"name":"y","datatype":"FP32","shape":[1,2],"data":[0.5,1.5]}]}'  # fmt: skip
    request, _ = parse_infer_request(b'{"inputs": [], "parameters": {"binary_data_output": true}}', None)
    body, header_length = infer_response(request, result)
    parsed = triton_http.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(parsed.as_numpy("y"), array)


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [("gzip", "gzip"), ("deflate", "deflate"), ("gzip, deflate", None), ("br", None), (None, None)],
)
def test_responses_are_compressed_only_for_callers_who_chose_one_encoding(accept, chosen):
    assert response_encoding(accept) == chosen

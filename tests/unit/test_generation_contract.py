"""The generation contract's Python names are the keys that already travel on the wire: a rolling
upgrade (old gateway, new inference or the reverse) must keep reading them. The literals below
are the wire format; change them only with a v2 of meshserve.generation."""

from tritonclient.grpc import service_pb2

from services.common.generation_contract import (
    FinishReason,
    InputTensor,
    OutputTensor,
    RequestParameter,
    ResponseParameter,
)


def test_request_parameter_keys_are_the_wire_keys():
    assert {m.value for m in RequestParameter} == {
        "max_tokens",
        "min_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "repetition_penalty",
        "prompt_logprobs",
        "triton_enable_empty_final_response",
        "max_tokens_per_response",  # additive (#18): absent, every response carries one token
        # additive (#19): absent, the sampler does what it did before
        "min_p",
        "ignore_eos",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "logprobs",
        "top_logprobs",
        "json_schema",  # additive (#19): structured output's schema text
    }


def test_response_parameter_keys_are_the_wire_keys():
    assert {m.value for m in ResponseParameter} == {
        "triton_final_response",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
        "error_code",
    }


def test_tensor_names_and_datatypes_are_the_model_contract():
    assert {(t.value, t.datatype) for t in InputTensor} == {("input_ids", "INT64"), ("stop_token_ids", "INT64")}
    assert {(t.value, t.datatype) for t in OutputTensor} == {
        ("token_id", "INT64"),
        ("logprob", "FP32"),
        ("prompt_logprobs", "FP32"),
        ("top_token_ids", "INT64"),  # additive (#19): only when top_logprobs were asked for
        ("top_logprobs", "FP32"),
    }


def test_finish_reasons_travel_as_lower_case_words():
    assert [r.value for r in FinishReason] == ["stop", "length", "cancelled", "error"]
    assert FinishReason.STOP == "stop" and f"{FinishReason.LENGTH}" == "length"


def test_members_encode_exactly_as_the_plain_strings():
    by_enum = service_pb2.ModelInferRequest()
    by_enum.parameters[RequestParameter.MAX_TOKENS].int64_param = 7
    by_enum.inputs.add(name=InputTensor.INPUT_IDS, datatype=InputTensor.INPUT_IDS.datatype, shape=[1])
    plain = service_pb2.ModelInferRequest()
    plain.parameters["max_tokens"].int64_param = 7
    plain.inputs.add(name="input_ids", datatype="INT64", shape=[1])
    assert by_enum.SerializeToString(deterministic=True) == plain.SerializeToString(deterministic=True)

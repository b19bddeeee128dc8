"""The generation contract between the gateway and the inference service, as Python names.

The KServe `parameters` keys, tensor names and finish reasons of a generation stream are named
once, in protos/meshserve/generation/v1/generation.proto; the enums here are built from its
descriptors, so no service spells a key of its own. Members are `str`s equal to what travels on
the wire: `RequestParameter.MAX_TOKENS == "max_tokens"`, `FinishReason.STOP == "stop"`.
"""

from __future__ import annotations

import enum

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from meshserve.generation.v1 import generation_pb2

# A tensor field's proto type -> its KServe v2 datatype.
_DATATYPES = {FieldDescriptor.TYPE_INT64: "INT64", FieldDescriptor.TYPE_FLOAT: "FP32"}


class Tensor(enum.StrEnum):
    """A tensor of the generation model; the value is its name."""

    @property
    def datatype(self) -> str:
        """Its KServe v2 datatype ("INT64", "FP32"), from the field's type in the proto."""
        return _TENSOR_DATATYPES[self.value]


def _keys(enum_name: str, message: Descriptor, base: type[enum.StrEnum] = enum.StrEnum):
    """An enum with one member per field of `message`: MAX_TOKENS = "max_tokens"."""
    return base(enum_name, [(field.name.upper(), field.name) for field in message.fields], module=__name__)


# Keys of `ModelInferRequest.parameters` on a generation request.
RequestParameter = _keys("RequestParameter", generation_pb2.GenerationRequestParameters.DESCRIPTOR)
# Keys of `ModelInferResponse.parameters` on the generation stream.
ResponseParameter = _keys("ResponseParameter", generation_pb2.GenerationResponseParameters.DESCRIPTOR)
# The generation model's input and output tensors.
InputTensor = _keys("InputTensor", generation_pb2.GenerationInputs.DESCRIPTOR, Tensor)
OutputTensor = _keys("OutputTensor", generation_pb2.GenerationOutputs.DESCRIPTOR, Tensor)

_TENSOR_DATATYPES = {
    field.name: _DATATYPES[field.type]
    for message in (generation_pb2.GenerationInputs, generation_pb2.GenerationOutputs)
    for field in message.DESCRIPTOR.fields
}

_PREFIX = "FINISH_REASON_"
# Why a generation ended, in its wire form (the proto value's name without the prefix, lower case).
FinishReason = enum.StrEnum(
    "FinishReason",
    [
        (value.name.removeprefix(_PREFIX), value.name.removeprefix(_PREFIX).lower())
        for value in generation_pb2.FinishReason.DESCRIPTOR.values
        if value.number != generation_pb2.FINISH_REASON_UNSPECIFIED
    ],
    module=__name__,
)

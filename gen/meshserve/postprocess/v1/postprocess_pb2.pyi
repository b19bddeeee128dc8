from meshserve.tasks.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DetokenizeStart(_message.Message):
    __slots__ = ("model_id", "stop")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model_id: _Optional[str] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("token_ids", "last")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    last: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., last: _Optional[bool] = ...) -> None: ...

class PromptTokens(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("start", "tokens", "prompt")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    start: DetokenizeStart
    tokens: TokenChunk
    prompt: PromptTokens
    def __init__(self, start: _Optional[_Union[DetokenizeStart, _Mapping]] = ..., tokens: _Optional[_Union[TokenChunk, _Mapping]] = ..., prompt: _Optional[_Union[PromptTokens, _Mapping]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text", "token_texts", "stopped")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TEXTS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_texts: _containers.RepeatedScalarFieldContainer[str]
    stopped: bool
    def __init__(self, text: _Optional[str] = ..., token_texts: _Optional[_Iterable[str]] = ..., stopped: _Optional[bool] = ...) -> None: ...

class PostprocessRequest(_message.Message):
    __slots__ = ("model_id", "task", "outputs", "parameters", "side_tensors", "inputs")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SIDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    task: _tasks_pb2.Task
    outputs: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    parameters: _tasks_pb2.TaskParameters
    side_tensors: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    inputs: _tasks_pb2.TaskInputs
    def __init__(self, model_id: _Optional[str] = ..., task: _Optional[_Union[_tasks_pb2.Task, str]] = ..., outputs: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ..., parameters: _Optional[_Union[_tasks_pb2.TaskParameters, _Mapping]] = ..., side_tensors: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ..., inputs: _Optional[_Union[_tasks_pb2.TaskInputs, _Mapping]] = ...) -> None: ...

class PostprocessResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _tasks_pb2.TaskResult
    def __init__(self, result: _Optional[_Union[_tasks_pb2.TaskResult, _Mapping]] = ...) -> None: ...

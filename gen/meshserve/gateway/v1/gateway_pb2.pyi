from meshserve.tasks.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_STATUS_UNSPECIFIED: _ClassVar[ModelStatus]
    MODEL_STATUS_READY: _ClassVar[ModelStatus]
    MODEL_STATUS_UNAVAILABLE: _ClassVar[ModelStatus]
MODEL_STATUS_UNSPECIFIED: ModelStatus
MODEL_STATUS_READY: ModelStatus
MODEL_STATUS_UNAVAILABLE: ModelStatus

class GenerateRequest(_message.Message):
    __slots__ = ("model_id", "messages", "prompt", "parameters", "provider")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    messages: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.ChatMessage]
    prompt: str
    parameters: _tasks_pb2.GenerationParameters
    provider: str
    def __init__(self, model_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_tasks_pb2.ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., parameters: _Optional[_Union[_tasks_pb2.GenerationParameters, _Mapping]] = ..., provider: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_id", "finish_reason", "usage")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_id: int
    finish_reason: str
    usage: _tasks_pb2.Usage
    def __init__(self, text: _Optional[str] = ..., token_id: _Optional[int] = ..., finish_reason: _Optional[str] = ..., usage: _Optional[_Union[_tasks_pb2.Usage, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model_id", "task", "inputs", "parameters", "provider")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    task: _tasks_pb2.Task
    inputs: _tasks_pb2.TaskInputs
    parameters: _tasks_pb2.TaskParameters
    provider: str
    def __init__(self, model_id: _Optional[str] = ..., task: _Optional[_Union[_tasks_pb2.Task, str]] = ..., inputs: _Optional[_Union[_tasks_pb2.TaskInputs, _Mapping]] = ..., parameters: _Optional[_Union[_tasks_pb2.TaskParameters, _Mapping]] = ..., provider: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model_id", "task", "result", "usage")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    task: _tasks_pb2.Task
    result: _tasks_pb2.TaskResult
    usage: _tasks_pb2.Usage
    def __init__(self, model_id: _Optional[str] = ..., task: _Optional[_Union[_tasks_pb2.Task, str]] = ..., result: _Optional[_Union[_tasks_pb2.TaskResult, _Mapping]] = ..., usage: _Optional[_Union[_tasks_pb2.Usage, _Mapping]] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("id", "tasks", "owned_by", "status", "inference_name")
    ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    OWNED_BY_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_NAME_FIELD_NUMBER: _ClassVar[int]
    id: str
    tasks: _containers.RepeatedScalarFieldContainer[_tasks_pb2.Task]
    owned_by: str
    status: ModelStatus
    inference_name: str
    def __init__(self, id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[_tasks_pb2.Task, str]]] = ..., owned_by: _Optional[str] = ..., status: _Optional[_Union[ModelStatus, str]] = ..., inference_name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: Model
    def __init__(self, model: _Optional[_Union[Model, _Mapping]] = ...) -> None: ...

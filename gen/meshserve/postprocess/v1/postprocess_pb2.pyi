from meshserve.tasks.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PostprocessRequest(_message.Message):
    __slots__ = ("model_id", "task", "outputs", "parameters")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    task: _tasks_pb2.Task
    outputs: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    parameters: _tasks_pb2.TaskParameters
    def __init__(self, model_id: _Optional[str] = ..., task: _Optional[_Union[_tasks_pb2.Task, str]] = ..., outputs: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ..., parameters: _Optional[_Union[_tasks_pb2.TaskParameters, _Mapping]] = ...) -> None: ...

class PostprocessResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _tasks_pb2.TaskResult
    def __init__(self, result: _Optional[_Union[_tasks_pb2.TaskResult, _Mapping]] = ...) -> None: ...

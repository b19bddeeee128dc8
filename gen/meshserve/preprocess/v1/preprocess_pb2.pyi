from meshserve.tasks.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessRequest(_message.Message):
    __slots__ = ("model_id", "task", "inputs", "parameters")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    task: _tasks_pb2.Task
    inputs: _tasks_pb2.TaskInputs
    parameters: _tasks_pb2.TaskParameters
    def __init__(self, model_id: _Optional[str] = ..., task: _Optional[_Union[_tasks_pb2.Task, str]] = ..., inputs: _Optional[_Union[_tasks_pb2.TaskInputs, _Mapping]] = ..., parameters: _Optional[_Union[_tasks_pb2.TaskParameters, _Mapping]] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("tensors", "usage")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    usage: _tasks_pb2.Usage
    def __init__(self, tensors: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ..., usage: _Optional[_Union[_tasks_pb2.Usage, _Mapping]] = ...) -> None: ...

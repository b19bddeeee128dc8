from meshserve.tasks.v1 import tasks_pb2 as _tasks_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenizeRequest(_message.Message):
    __slots__ = ("model_id", "messages", "text", "add_special_tokens", "add_generation_prompt", "continue_final_message")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FINAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    messages: ChatMessages
    text: str
    add_special_tokens: bool
    add_generation_prompt: bool
    continue_final_message: bool
    def __init__(self, model_id: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ..., add_generation_prompt: _Optional[bool] = ..., continue_final_message: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("tokens", "max_model_len", "token_strs")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STRS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    max_model_len: int
    token_strs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., max_model_len: _Optional[int] = ..., token_strs: _Optional[_Iterable[str]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("model_id", "tokens")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    def __init__(self, prompt: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[_tasks_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class PrepareGenerationRequest(_message.Message):
    __slots__ = ("model_id", "messages", "text", "max_new_tokens", "tools_json")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_JSON_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    messages: ChatMessages
    text: str
    max_new_tokens: int
    tools_json: str
    def __init__(self, model_id: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., text: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., tools_json: _Optional[str] = ...) -> None: ...

class PrepareGenerationResponse(_message.Message):
    __slots__ = ("input_ids", "max_new_tokens", "stop_token_ids")
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    input_ids: _containers.RepeatedScalarFieldContainer[int]
    max_new_tokens: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, input_ids: _Optional[_Iterable[int]] = ..., max_new_tokens: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

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
    __slots__ = ("tensors", "usage", "side_tensors")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SIDE_TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    usage: _tasks_pb2.Usage
    side_tensors: _containers.RepeatedCompositeFieldContainer[_tasks_pb2.Tensor]
    def __init__(self, tensors: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ..., usage: _Optional[_Union[_tasks_pb2.Usage, _Mapping]] = ..., side_tensors: _Optional[_Iterable[_Union[_tasks_pb2.Tensor, _Mapping]]] = ...) -> None: ...

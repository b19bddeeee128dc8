from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_FEATURE_EXTRACTION: _ClassVar[Task]
    TASK_SENTENCE_SIMILARITY: _ClassVar[Task]
    TASK_TEXT_CLASSIFICATION: _ClassVar[Task]
    TASK_ZERO_SHOT_CLASSIFICATION: _ClassVar[Task]
    TASK_IMAGE_CLASSIFICATION: _ClassVar[Task]
    TASK_TEXT_GENERATION: _ClassVar[Task]

class FunctionToApply(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUNCTION_TO_APPLY_UNSPECIFIED: _ClassVar[FunctionToApply]
    FUNCTION_TO_APPLY_SOFTMAX: _ClassVar[FunctionToApply]
    FUNCTION_TO_APPLY_SIGMOID: _ClassVar[FunctionToApply]
    FUNCTION_TO_APPLY_NONE: _ClassVar[FunctionToApply]
TASK_UNSPECIFIED: Task
TASK_FEATURE_EXTRACTION: Task
TASK_SENTENCE_SIMILARITY: Task
TASK_TEXT_CLASSIFICATION: Task
TASK_ZERO_SHOT_CLASSIFICATION: Task
TASK_IMAGE_CLASSIFICATION: Task
TASK_TEXT_GENERATION: Task
FUNCTION_TO_APPLY_UNSPECIFIED: FunctionToApply
FUNCTION_TO_APPLY_SOFTMAX: FunctionToApply
FUNCTION_TO_APPLY_SIGMOID: FunctionToApply
FUNCTION_TO_APPLY_NONE: FunctionToApply

class Tensor(_message.Message):
    __slots__ = ("name", "datatype", "shape", "raw")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    name: str
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    def __init__(self, name: _Optional[str] = ..., datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ...) -> None: ...

class TextInputs(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class SentenceSimilarityInputs(_message.Message):
    __slots__ = ("source_sentence", "sentences")
    SOURCE_SENTENCE_FIELD_NUMBER: _ClassVar[int]
    SENTENCES_FIELD_NUMBER: _ClassVar[int]
    source_sentence: str
    sentences: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, source_sentence: _Optional[str] = ..., sentences: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageInputs(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class TaskInputs(_message.Message):
    __slots__ = ("text", "sentence_similarity", "images")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    text: TextInputs
    sentence_similarity: SentenceSimilarityInputs
    images: ImageInputs
    def __init__(self, text: _Optional[_Union[TextInputs, _Mapping]] = ..., sentence_similarity: _Optional[_Union[SentenceSimilarityInputs, _Mapping]] = ..., images: _Optional[_Union[ImageInputs, _Mapping]] = ...) -> None: ...

class TaskParameters(_message.Message):
    __slots__ = ("normalize", "truncate", "top_k", "function_to_apply", "candidate_labels", "hypothesis_template", "multi_label")
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_TO_APPLY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LABELS_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESIS_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    normalize: bool
    truncate: bool
    top_k: int
    function_to_apply: FunctionToApply
    candidate_labels: _containers.RepeatedScalarFieldContainer[str]
    hypothesis_template: str
    multi_label: bool
    def __init__(self, normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., top_k: _Optional[int] = ..., function_to_apply: _Optional[_Union[FunctionToApply, str]] = ..., candidate_labels: _Optional[_Iterable[str]] = ..., hypothesis_template: _Optional[str] = ..., multi_label: _Optional[bool] = ...) -> None: ...

class Similarities(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassificationList(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, labels: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class Classifications(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ClassificationList]
    def __init__(self, items: _Optional[_Iterable[_Union[ClassificationList, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("embeddings", "similarities", "classifications")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    similarities: Similarities
    classifications: Classifications
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., similarities: _Optional[_Union[Similarities, _Mapping]] = ..., classifications: _Optional[_Union[Classifications, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "items", "item_input_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ITEM_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    items: int
    item_input_tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., items: _Optional[int] = ..., item_input_tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop", "min_new_tokens")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    repetition_penalty: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    min_new_tokens: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., min_new_tokens: _Optional[int] = ...) -> None: ...

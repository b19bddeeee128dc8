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
    TASK_TOKEN_CLASSIFICATION: _ClassVar[Task]
    TASK_FILL_MASK: _ClassVar[Task]
    TASK_QUESTION_ANSWERING: _ClassVar[Task]
    TASK_TEXT_RANKING: _ClassVar[Task]

class AggregationStrategy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_STRATEGY_UNSPECIFIED: _ClassVar[AggregationStrategy]
    AGGREGATION_STRATEGY_NONE: _ClassVar[AggregationStrategy]
    AGGREGATION_STRATEGY_SIMPLE: _ClassVar[AggregationStrategy]
    AGGREGATION_STRATEGY_FIRST: _ClassVar[AggregationStrategy]
    AGGREGATION_STRATEGY_AVERAGE: _ClassVar[AggregationStrategy]
    AGGREGATION_STRATEGY_MAX: _ClassVar[AggregationStrategy]

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
TASK_TOKEN_CLASSIFICATION: Task
TASK_FILL_MASK: Task
TASK_QUESTION_ANSWERING: Task
TASK_TEXT_RANKING: Task
AGGREGATION_STRATEGY_UNSPECIFIED: AggregationStrategy
AGGREGATION_STRATEGY_NONE: AggregationStrategy
AGGREGATION_STRATEGY_SIMPLE: AggregationStrategy
AGGREGATION_STRATEGY_FIRST: AggregationStrategy
AGGREGATION_STRATEGY_AVERAGE: AggregationStrategy
AGGREGATION_STRATEGY_MAX: AggregationStrategy
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

class TextPair(_message.Message):
    __slots__ = ("text", "text_pair")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIR_FIELD_NUMBER: _ClassVar[int]
    text: str
    text_pair: str
    def __init__(self, text: _Optional[str] = ..., text_pair: _Optional[str] = ...) -> None: ...

class TextPairInputs(_message.Message):
    __slots__ = ("pairs",)
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[TextPair]
    def __init__(self, pairs: _Optional[_Iterable[_Union[TextPair, _Mapping]]] = ...) -> None: ...

class QuestionAnsweringInput(_message.Message):
    __slots__ = ("question", "context")
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    question: str
    context: str
    def __init__(self, question: _Optional[str] = ..., context: _Optional[str] = ...) -> None: ...

class QuestionAnsweringInputs(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[QuestionAnsweringInput]
    def __init__(self, items: _Optional[_Iterable[_Union[QuestionAnsweringInput, _Mapping]]] = ...) -> None: ...

class TextRankingInputs(_message.Message):
    __slots__ = ("query", "documents")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class TokenIdInputs(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TokenIds]
    def __init__(self, items: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ...) -> None: ...

class TaskInputs(_message.Message):
    __slots__ = ("text", "sentence_similarity", "images", "text_pairs", "question_answering", "text_ranking", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SENTENCE_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TEXT_PAIRS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_ANSWERING_FIELD_NUMBER: _ClassVar[int]
    TEXT_RANKING_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: TextInputs
    sentence_similarity: SentenceSimilarityInputs
    images: ImageInputs
    text_pairs: TextPairInputs
    question_answering: QuestionAnsweringInputs
    text_ranking: TextRankingInputs
    token_ids: TokenIdInputs
    def __init__(self, text: _Optional[_Union[TextInputs, _Mapping]] = ..., sentence_similarity: _Optional[_Union[SentenceSimilarityInputs, _Mapping]] = ..., images: _Optional[_Union[ImageInputs, _Mapping]] = ..., text_pairs: _Optional[_Union[TextPairInputs, _Mapping]] = ..., question_answering: _Optional[_Union[QuestionAnsweringInputs, _Mapping]] = ..., text_ranking: _Optional[_Union[TextRankingInputs, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIdInputs, _Mapping]] = ...) -> None: ...

class TaskParameters(_message.Message):
    __slots__ = ("normalize", "truncate", "top_k", "function_to_apply", "candidate_labels", "hypothesis_template", "multi_label", "aggregation_strategy", "ignore_labels", "targets", "doc_stride", "max_answer_len", "max_seq_len", "max_question_len", "handle_impossible_answer", "align_to_words", "prompt_name", "dimensions", "raw_scores")
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    FUNCTION_TO_APPLY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_LABELS_FIELD_NUMBER: _ClassVar[int]
    HYPOTHESIS_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    MULTI_LABEL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_LABELS_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    DOC_STRIDE_FIELD_NUMBER: _ClassVar[int]
    MAX_ANSWER_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_QUESTION_LEN_FIELD_NUMBER: _ClassVar[int]
    HANDLE_IMPOSSIBLE_ANSWER_FIELD_NUMBER: _ClassVar[int]
    ALIGN_TO_WORDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_NAME_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    normalize: bool
    truncate: bool
    top_k: int
    function_to_apply: FunctionToApply
    candidate_labels: _containers.RepeatedScalarFieldContainer[str]
    hypothesis_template: str
    multi_label: bool
    aggregation_strategy: AggregationStrategy
    ignore_labels: _containers.RepeatedScalarFieldContainer[str]
    targets: _containers.RepeatedScalarFieldContainer[str]
    doc_stride: int
    max_answer_len: int
    max_seq_len: int
    max_question_len: int
    handle_impossible_answer: bool
    align_to_words: bool
    prompt_name: str
    dimensions: int
    raw_scores: bool
    def __init__(self, normalize: _Optional[bool] = ..., truncate: _Optional[bool] = ..., top_k: _Optional[int] = ..., function_to_apply: _Optional[_Union[FunctionToApply, str]] = ..., candidate_labels: _Optional[_Iterable[str]] = ..., hypothesis_template: _Optional[str] = ..., multi_label: _Optional[bool] = ..., aggregation_strategy: _Optional[_Union[AggregationStrategy, str]] = ..., ignore_labels: _Optional[_Iterable[str]] = ..., targets: _Optional[_Iterable[str]] = ..., doc_stride: _Optional[int] = ..., max_answer_len: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_question_len: _Optional[int] = ..., handle_impossible_answer: _Optional[bool] = ..., align_to_words: _Optional[bool] = ..., prompt_name: _Optional[str] = ..., dimensions: _Optional[int] = ..., raw_scores: _Optional[bool] = ...) -> None: ...

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

class TokenEntity(_message.Message):
    __slots__ = ("entity", "score", "index", "word", "start", "end")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WORD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    entity: str
    score: float
    index: int
    word: str
    start: int
    end: int
    def __init__(self, entity: _Optional[str] = ..., score: _Optional[float] = ..., index: _Optional[int] = ..., word: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TokenEntityList(_message.Message):
    __slots__ = ("entities",)
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    entities: _containers.RepeatedCompositeFieldContainer[TokenEntity]
    def __init__(self, entities: _Optional[_Iterable[_Union[TokenEntity, _Mapping]]] = ...) -> None: ...

class TokenEntities(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[TokenEntityList]
    def __init__(self, items: _Optional[_Iterable[_Union[TokenEntityList, _Mapping]]] = ...) -> None: ...

class MaskFill(_message.Message):
    __slots__ = ("score", "token", "token_str", "sequence")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_STR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    score: float
    token: int
    token_str: str
    sequence: str
    def __init__(self, score: _Optional[float] = ..., token: _Optional[int] = ..., token_str: _Optional[str] = ..., sequence: _Optional[str] = ...) -> None: ...

class MaskFills(_message.Message):
    __slots__ = ("fills",)
    FILLS_FIELD_NUMBER: _ClassVar[int]
    fills: _containers.RepeatedCompositeFieldContainer[MaskFill]
    def __init__(self, fills: _Optional[_Iterable[_Union[MaskFill, _Mapping]]] = ...) -> None: ...

class FillMaskItem(_message.Message):
    __slots__ = ("masks",)
    MASKS_FIELD_NUMBER: _ClassVar[int]
    masks: _containers.RepeatedCompositeFieldContainer[MaskFills]
    def __init__(self, masks: _Optional[_Iterable[_Union[MaskFills, _Mapping]]] = ...) -> None: ...

class FillMaskResults(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[FillMaskItem]
    def __init__(self, items: _Optional[_Iterable[_Union[FillMaskItem, _Mapping]]] = ...) -> None: ...

class Answer(_message.Message):
    __slots__ = ("score", "start", "end", "answer")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    score: float
    start: int
    end: int
    answer: str
    def __init__(self, score: _Optional[float] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., answer: _Optional[str] = ...) -> None: ...

class AnswerList(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[Answer]
    def __init__(self, answers: _Optional[_Iterable[_Union[Answer, _Mapping]]] = ...) -> None: ...

class Answers(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AnswerList]
    def __init__(self, items: _Optional[_Iterable[_Union[AnswerList, _Mapping]]] = ...) -> None: ...

class TaskResult(_message.Message):
    __slots__ = ("embeddings", "similarities", "classifications", "entities", "fill_mask", "answers")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITIES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATIONS_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    FILL_MASK_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    similarities: Similarities
    classifications: Classifications
    entities: TokenEntities
    fill_mask: FillMaskResults
    answers: Answers
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., similarities: _Optional[_Union[Similarities, _Mapping]] = ..., classifications: _Optional[_Union[Classifications, _Mapping]] = ..., entities: _Optional[_Union[TokenEntities, _Mapping]] = ..., fill_mask: _Optional[_Union[FillMaskResults, _Mapping]] = ..., answers: _Optional[_Union[Answers, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("role", "content", "tool_calls_json", "tool_call_id")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_JSON_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    tool_calls_json: str
    tool_call_id: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., tool_calls_json: _Optional[str] = ..., tool_call_id: _Optional[str] = ...) -> None: ...

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

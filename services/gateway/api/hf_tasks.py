"""The HF task API's per-task dialect: request bodies -> typed `TaskInputs`/`TaskParameters`, and
typed results -> the JSON shapes `huggingface_hub.InferenceClient` parses (client-contract §2.5).

One parser and one renderer per task, in a registry; the route code stays task-agnostic.
Unknown parameters are refused with 400 naming the accepted ones (a silently ignored typo is a
wrong answer the caller cannot see).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.tasks.v1 import tasks_pb2

from services.common import caps
from services.common.catalog import ModelEntry
from services.common.errors import invalid
from services.gateway.api.hf_fill_mask import parse_fill_mask, render_fill_mask
from services.gateway.api.hf_question_answering import (
    has_question_answering_shape,
    parse_question_answering,
    render_question_answering,
)
from services.gateway.api.hf_token_classification import parse_token_classification, render_token_classification
from services.gateway.api.rerank_schemas import TextRankingParameters
from services.gateway.api.schemas import (
    FeatureExtractionParameters,
    ImageClassificationParameters,
    SentenceSimilarityInputs,
    SentenceSimilarityParameters,
    TextClassificationParameters,
    ZeroShotParameters,
)
from services.gateway.service.rerank import sorted_scores
from services.gateway.service.validation import parse

FUNCTION_TO_APPLY = {
    None: tasks_pb2.FUNCTION_TO_APPLY_UNSPECIFIED,
    "softmax": tasks_pb2.FUNCTION_TO_APPLY_SOFTMAX,
    "sigmoid": tasks_pb2.FUNCTION_TO_APPLY_SIGMOID,
    "none": tasks_pb2.FUNCTION_TO_APPLY_NONE,
}
_HF_HUB_VERSION = re.compile(r"hf_hub/(\d+)\.(\d+)")
_DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


@dataclass(frozen=True)
class HFRequest:
    """One parsed HF task request. `single`: the caller sent one item, not a list, so the answer
    is that item's result rather than a list of results."""

    inputs: tasks_pb2.TaskInputs
    parameters: tasks_pb2.TaskParameters
    single: bool


@dataclass(frozen=True)
class Dialect:
    """What the answer's shape depends on besides the request: the client's version."""

    legacy_zero_shot: bool = False

    @classmethod
    def from_user_agent(cls, user_agent: str) -> Dialect:
        # huggingface_hub < 1.2 parses zero-shot as {sequence, labels, scores}; 1.2+ as a list.
        # (Per request on the HF routes: one of two shared instances, not a new object.)
        match = _HF_HUB_VERSION.search(user_agent) if user_agent else None
        return _LEGACY if match and (int(match[1]), int(match[2])) < (1, 2) else _MODERN

    @property
    def key(self) -> str:
        return "zs-dict" if self.legacy_zero_shot else ""


_MODERN, _LEGACY = Dialect(), Dialect(legacy_zero_shot=True)


def texts(value, field: str = "inputs") -> tuple[list[str], bool]:
    """(texts, single) from a str or a non-empty list of str."""
    if isinstance(value, str):
        return [value], True
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value, False
    if isinstance(value, list) and not value:
        raise invalid(f"`{field}` must not be empty", param=field)
    raise invalid(f"`{field}` must be a string or a list of strings", param=field)


def check_dimensions(entry: ModelEntry, dimensions: int | None) -> None:
    """`dimensions` (Matryoshka): 1 to the model's size D; the first n are kept, then normalized."""
    dim = entry.inference.outputs[0].dims[-1]
    if dimensions is not None and not 1 <= dimensions <= dim:
        raise invalid(f"`dimensions` must be between 1 and {dim}, the size of {entry.id}", param="dimensions")


def check_prompt_name(entry: ModelEntry, prompt_name: str | None) -> None:
    """A prompt the catalog defines for the model (sentence-transformers' prompt_name)."""
    prompts = entry.preprocess.prompts
    if prompt_name is not None and prompt_name not in prompts:
        known = ", ".join(repr(n) for n in prompts) or "none"
        raise invalid(
            f"unknown `prompt_name` {prompt_name!r} for {entry.id}; its prompts: {known}", param="prompt_name"
        )


def _text_inputs(values: list[str]) -> tasks_pb2.TaskInputs:
    return tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=values))


def _no_extra(extra: dict) -> None:
    if extra:
        raise invalid(f"unknown field(s) {sorted(extra)}: put task parameters under `parameters`")


# -- parsers: (entry, inputs, parameters, extra root fields) -> HFRequest ------------------------
def parse_feature_extraction(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    # The HF client sends feature-extraction parameters at the body's root.
    p = parse(FeatureExtractionParameters, {**extra, **params}, where="parameters")
    check_dimensions(entry, p.dimensions)
    check_prompt_name(entry, p.prompt_name)
    values, single = texts(inputs)
    parameters = tasks_pb2.TaskParameters(
        normalize=p.normalize, truncate=p.truncate, dimensions=p.dimensions, prompt_name=p.prompt_name
    )
    return HFRequest(_text_inputs(values), parameters, single)


def parse_sentence_similarity(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    _no_extra(extra)
    p = parse(SentenceSimilarityParameters, params, where="parameters")
    if not isinstance(inputs, dict):
        raise invalid("`inputs` must be an object {source_sentence, sentences}", param="inputs")
    sim = parse(SentenceSimilarityInputs, inputs, where="inputs")
    request = tasks_pb2.SentenceSimilarityInputs(source_sentence=sim.source_sentence, sentences=sim.sentences)
    return HFRequest(
        tasks_pb2.TaskInputs(sentence_similarity=request), tasks_pb2.TaskParameters(truncate=p.truncate), True
    )


def _pair(value, field: str) -> tuple[str, str | None]:
    """{"text": str, "text_pair"?: str} -> (text, text_pair or None)."""
    if not isinstance(value, dict) or not isinstance(value.get("text"), str):
        raise invalid(f"`{field}` must be a string or an object {{text, text_pair}}", param=field)
    extra = set(value) - {"text", "text_pair"}
    if extra:
        raise invalid(f"`{field}` has unknown field(s) {sorted(extra)}; accepted: text, text_pair", param=field)
    pair = value.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise invalid(f"`{field}.text_pair` must be a string", param=f"{field}.text_pair")
    return value["text"], pair


def classification_inputs(inputs) -> tuple[tasks_pb2.TaskInputs, bool]:
    """text-classification inputs as the pipeline takes them: a text, {text, text_pair}, or a
    list of either kind; objects without text_pair are single texts."""
    if isinstance(inputs, dict) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], dict)):
        items = [inputs] if isinstance(inputs, dict) else inputs
        fields = ["inputs"] if isinstance(inputs, dict) else [f"inputs[{i}]" for i in range(len(items))]
        parsed = [_pair(v, f) for v, f in zip(items, fields, strict=True)]
        if all(b is None for _, b in parsed):
            return _text_inputs([a for a, _ in parsed]), isinstance(inputs, dict)
        if any(b is None for _, b in parsed):
            raise invalid("`inputs`: give every object a `text_pair`, or none of them", param="inputs")
        pairs = [tasks_pb2.TextPair(text=a, text_pair=b) for a, b in parsed]
        return tasks_pb2.TaskInputs(text_pairs=tasks_pb2.TextPairInputs(pairs=pairs)), isinstance(inputs, dict)
    values, single = texts(inputs)
    return _text_inputs(values), single


def parse_text_classification(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    _no_extra(extra)
    p = parse(TextClassificationParameters, params, where="parameters")
    task_inputs, single = classification_inputs(inputs)
    parameters = tasks_pb2.TaskParameters(
        top_k=p.top_k, truncate=p.truncate, function_to_apply=FUNCTION_TO_APPLY[p.function_to_apply]
    )
    return HFRequest(task_inputs, parameters, single)


def parse_text_ranking(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    """Our shape (HF documents none): `inputs: {query, documents: [str]}`, parameters raw_scores,
    truncate, top_n (the top_n is applied by the renderer)."""
    _no_extra(extra)
    p = parse(TextRankingParameters, params, where="parameters")
    if not isinstance(inputs, dict) or set(inputs) != {"query", "documents"}:
        raise invalid("`inputs` must be an object {query, documents}", param="inputs")
    query, documents = inputs["query"], inputs["documents"]
    if not isinstance(query, str):
        raise invalid("`inputs.query` must be a string", param="inputs.query")
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise invalid("`inputs.documents` must be a non-empty list of strings", param="inputs.documents")
    ranking = tasks_pb2.TextRankingInputs(query=query, documents=documents)
    parameters = tasks_pb2.TaskParameters(raw_scores=p.raw_scores, truncate=p.truncate, top_k=p.top_n)
    return HFRequest(tasks_pb2.TaskInputs(text_ranking=ranking), parameters, True)


def parse_zero_shot(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    _no_extra(extra)
    if "candidate_labels" not in params:
        raise invalid(
            "zero-shot-classification needs `parameters.candidate_labels`", param="parameters.candidate_labels"
        )
    p = parse(ZeroShotParameters, params, where="parameters")
    values, single = texts(inputs)
    labels = p.labels()
    caps.check_zero_shot(entry, len(values), labels, p.hypothesis_template)  # before anything is built
    parameters = tasks_pb2.TaskParameters(
        candidate_labels=labels,
        hypothesis_template=p.hypothesis_template,
        multi_label=p.multi_label,
        truncate=p.truncate,
    )
    return HFRequest(_text_inputs(values), parameters, single)


def decode_base64_image(value, field: str) -> bytes:
    if not isinstance(value, str) or not value:
        raise invalid(f"`{field}` must be a base64-encoded image", param=field)
    if value.startswith(("http://", "https://")):
        raise invalid(f"`{field}` is a URL: this server does not fetch URLs; send the image bytes", param=field)
    try:
        return base64.b64decode(_DATA_URL.sub("", value, count=1), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"`{field}` is not valid base64", param=field) from None


def parse_image_classification(entry: ModelEntry, inputs, params: dict, extra: dict) -> HFRequest:
    _no_extra(extra)
    p = parse(ImageClassificationParameters, params, where="parameters")
    if isinstance(inputs, list) and inputs:
        images, single = [decode_base64_image(v, f"inputs[{i}]") for i, v in enumerate(inputs)], False
    else:
        images, single = [decode_base64_image(inputs, "inputs")], True
    parameters = tasks_pb2.TaskParameters(top_k=p.top_k, function_to_apply=FUNCTION_TO_APPLY[p.function_to_apply])
    return HFRequest(tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=images)), parameters, single)


def raw_image_request(data: bytes) -> HFRequest:
    """An image posted as the raw body (what the HF client sends without parameters)."""
    return HFRequest(
        tasks_pb2.TaskInputs(images=tasks_pb2.ImageInputs(images=[data])), tasks_pb2.TaskParameters(), True
    )


# -- renderers: (result, request, dialect) -> JSON-able -------------------------------------------
def _labelled(items: tasks_pb2.Classifications) -> list[list[dict]]:
    return [[{"label": c.label, "score": c.score} for c in item.labels] for item in items.items]


def render_feature_extraction(vectors, request: HFRequest, dialect: Dialect):
    return vectors[0] if request.single else vectors


def render_similarity(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    return list(result.similarities.scores)


def render_text_classification(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    # Always a list of lists, one per input: the client takes [0] for one text (contract §2.5).
    return _labelled(result.classifications)


def render_text_ranking(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    # TEI's /rerank shape: [{index, score}] by descending score (ties in document order).
    top = request.parameters.top_k if request.parameters.HasField("top_k") else None
    return [{"index": i, "score": score} for i, score in sorted_scores(result.similarities.scores, top)]


def render_zero_shot(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    if dialect.legacy_zero_shot:
        sequences = list(request.inputs.text.texts)
        rendered = [
            {"sequence": seq, "labels": [c.label for c in item.labels], "scores": [c.score for c in item.labels]}
            for seq, item in zip(sequences, result.classifications.items, strict=True)
        ]
    else:
        rendered = _labelled(result.classifications)
    return rendered[0] if request.single else rendered


def render_image_classification(result: tasks_pb2.TaskResult, request: HFRequest, dialect: Dialect):
    rendered = _labelled(result.classifications)
    return rendered[0] if request.single else rendered


Parser = Callable[[ModelEntry, object, dict, dict], HFRequest]
Renderer = Callable[[tasks_pb2.TaskResult, HFRequest, Dialect], object]

PARSERS: dict[str, Parser] = {
    "feature-extraction": parse_feature_extraction,
    "sentence-similarity": parse_sentence_similarity,
    "text-classification": parse_text_classification,
    "zero-shot-classification": parse_zero_shot,
    "image-classification": parse_image_classification,
    "token-classification": parse_token_classification,
    "text-ranking": parse_text_ranking,
    "fill-mask": parse_fill_mask,
    "question-answering": parse_question_answering,
}
# feature-extraction's result is its (possibly coalesced) vectors, the others' a TaskResult.
RENDERERS: dict[str, Renderer] = {
    "feature-extraction": render_feature_extraction,
    "sentence-similarity": render_similarity,
    "text-classification": render_text_classification,
    "zero-shot-classification": render_zero_shot,
    "image-classification": render_image_classification,
    "token-classification": render_token_classification,
    "text-ranking": render_text_ranking,
    "fill-mask": render_fill_mask,
    "question-answering": render_question_answering,
}

# -- the task of a model URL that names none ------------------------------------------------------
# HF's API answers a model URL with the task the input's shape asks for: huggingface_hub's
# feature_extraction and sentence_similarity both POST to the bare model URL (client-contract
# §2.1, §2.5). Each entry: a task and a body shape that no other task's body has.
SHAPES: dict[str, Callable[[dict], bool]] = {
    "sentence-similarity": lambda body: isinstance(body.get("inputs"), dict) and "source_sentence" in body["inputs"],
    "zero-shot-classification": lambda body: (
        isinstance(body.get("parameters"), dict) and "candidate_labels" in body["parameters"]
    ),
    "text-ranking": lambda body: isinstance(body.get("inputs"), dict) and "query" in body["inputs"],
    "question-answering": has_question_answering_shape,
    # A cross-encoder's default task is text-ranking: texts and {text, text_pair} classify.
    "text-classification": lambda body: isinstance(body.get("inputs"), (str, list, dict)),
}


def task_from_shape(entry: ModelEntry, body) -> str:
    """The task of a body sent to a model URL that names no task: the first of the model's tasks
    whose shape the body has, else the model's default task (a string or a list of strings)."""
    if isinstance(body, dict):
        for task, has_shape in SHAPES.items():
            if task in entry.tasks and has_shape(body):
                return task
    return entry.default_task

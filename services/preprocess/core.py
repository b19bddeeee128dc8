"""Preprocessing: text (validation, fast Rust tokenization, truncation, token counts) and images
(format sniffing, safe decoding, resize, normalization).

Transport-neutral: takes Python values, returns numpy arrays; raises MeshError for bad input.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prometheus_client import Counter
from tokenizers import Tokenizer

from services.common import caps, images, tracing
from services.common.catalog import GENERATION_TASKS, Catalog, ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.common.modelstore import load_or_stand_in, model_dir
from services.preprocess.generation import GenerationPreprocessor, Prompt

TOKENS = Counter("meshserve_preprocess_tokens_total", "Input tokens produced, after truncation.", ["model"])
TRUNCATED = Counter("meshserve_preprocess_truncated_total", "Texts cut to the model's token limit.", ["model"])

# Below this many characters a request is tokenized inline: a thread hop costs more than the work.
INLINE_CHARS = 4096
# Below this many encoded bytes images are decoded inline (a small PNG decodes in microseconds).
INLINE_IMAGE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Encoded:
    """Model inputs for one request plus what it cost, and the side tensors postprocess needs."""

    tensors: dict[str, np.ndarray]
    input_tokens: int
    items: int
    item_tokens: list[int]
    side: dict[str, np.ndarray] = field(default_factory=dict)


class TextPreprocessor:
    """Tokenizes for one model. The tokenizer pads to the longest text of the request."""

    def __init__(self, entry: ModelEntry, folder: Path) -> None:
        self.entry = entry
        self.folder = folder
        self.limit = entry.preprocess.max_length
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=self.limit)
        pad_token = pad_token_of(folder, tokenizer)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id(pad_token) or 0, pad_token=pad_token)
        lowercase_if_configured(folder, tokenizer)
        self.tokenizer = tokenizer
        self.plain = Tokenizer.from_str(tokenizer.to_str())  # /tokenize's: neither cut nor padded
        self.plain.no_truncation()
        self.plain.no_padding()
        self.input_names = tuple(t.name for t in entry.inference.inputs)

    def prompt(self, name: str | None) -> str:
        """The text put before each input: the catalog's prompt `name`, else its default prompt
        (sentence-transformers' encode(prompt_name=...)); "" when neither applies."""
        spec = self.entry.preprocess
        if name is None:
            return spec.prompts.get(spec.default_prompt_name, "") if spec.default_prompt_name else ""
        if name not in spec.prompts:
            known = ", ".join(repr(n) for n in spec.prompts) or "none"
            raise invalid(
                f"unknown `prompt_name` {name!r} for {self.entry.id}; its prompts: {known}", param="prompt_name"
            )
        return spec.prompts[name]

    def tensors(self, encodings) -> dict[str, np.ndarray]:
        """The model's input tensors (the catalog's inputs, in order) from padded encodings."""
        columns = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
        return {
            name: np.array([getattr(e, columns[name]) for e in encodings], dtype=np.int64) for name in self.input_names
        }

    def validate(self, texts: list[str], *, field: str) -> None:
        spec = self.entry.preprocess
        if not texts:
            raise invalid(f"`{field}` must contain at least one text", param=field)
        if len(texts) > spec.max_items:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{field}` has {len(texts)} texts; this model takes at most {spec.max_items} per request",
                param=field,
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise invalid(f"`{field}[{i}]` is empty", param=field)
            if len(text) > spec.max_chars:
                raise MeshError(
                    ErrorCode.PAYLOAD_TOO_LARGE,
                    f"`{field}[{i}]` has {len(text)} characters; the limit is {spec.max_chars}",
                    param=field,
                )

    def encode(self, texts: list[str], *, truncate: bool, field: str, prompt: str = "") -> Encoded:
        return self.encode_items([prompt + t for t in texts] if prompt else texts, truncate=truncate, field=field)[1]

    def encode_items(self, items: list, *, truncate: bool, field: str, what: str = "") -> tuple[list, Encoded]:
        """Texts (or text pairs) -> (the tokenizer's encodings, the model inputs and token counts).
        An item over the limit is cut, or refused when `truncate` is off (`what` says what counted)."""
        encodings = self.tokenizer.encode_batch(items)
        cut = [i for i, e in enumerate(encodings) if e.overflowing]
        if cut and not truncate:
            raise invalid(
                f"`{field}[{cut[0]}]` is longer than this model's limit of {self.limit} tokens{what}; "
                "shorten it or allow truncation (`truncate: true`)",
                param=field,
            )
        tensors = self.tensors(encodings)
        per_item = tensors["attention_mask"].sum(axis=1).tolist()
        tokens = sum(per_item)
        TOKENS.labels(self.entry.id).inc(tokens)
        if cut:
            TRUNCATED.labels(self.entry.id).inc(len(cut))
        return encodings, Encoded(tensors, tokens, len(items), per_item)

    def encode_ids(self, items: list[list[int]], *, field: str) -> Encoded:
        """Token ids of this model's own tokenizer, used as they are (vLLM's reading of OpenAI's
        token-id input): each sequence non-empty, within the vocabulary and the token limit (never
        cut), padded to the longest with the model's pad id."""
        spec, vocab = self.entry.preprocess, self.tokenizer.get_vocab_size(with_added_tokens=True)
        if not items:
            raise invalid(f"`{field}` must contain at least one token list", param=field)
        if len(items) > spec.max_items:
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{field}` has {len(items)} token lists; this model takes at most {spec.max_items} per request",
                param=field,
            )
        for i, ids in enumerate(items):
            where = f"`{field}[{i}]`" if len(items) > 1 else f"`{field}`"
            if not ids:
                raise invalid(f"{where} has no token ids", param=field)
            if len(ids) > self.limit:
                raise invalid(
                    f"{where} has {len(ids)} tokens; this model's limit is {self.limit} (token ids are not cut)",
                    param=field,
                )
            if min(ids) < 0 or max(ids) >= vocab:
                bad = next(t for t in ids if not 0 <= t < vocab)
                raise invalid(
                    f"{where} holds token id {bad}, outside this model's vocabulary (ids 0 to {vocab - 1}); "
                    "token ids are read as the model's own tokenizer's",
                    param=field,
                )
        width, pad = max(len(ids) for ids in items), self.tokenizer.padding["pad_id"]
        input_ids = np.full((len(items), width), pad, dtype=np.int64)
        mask = np.zeros((len(items), width), dtype=np.int64)
        for row, ids in enumerate(items):
            input_ids[row, : len(ids)], mask[row, : len(ids)] = ids, 1
        columns = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}
        per_item = [len(ids) for ids in items]
        TOKENS.labels(self.entry.id).inc(sum(per_item))
        return Encoded({name: columns[name] for name in self.input_names}, sum(per_item), len(items), per_item)


def lowercase_if_configured(folder: Path, tokenizer: Tokenizer) -> None:
    """sentence_bert_config.json `do_lower_case`: lowercase first, as sentence-transformers does
    (a Lowercase normalizer in front of the tokenizer's own, unless it has one)."""
    import json

    from tokenizers import normalizers

    path = folder / "sentence_bert_config.json"
    if not path.exists() or not json.loads(path.read_text()).get("do_lower_case"):
        return
    current = tokenizer.normalizer
    if current is not None and "Lowercase" in current.__getstate__().decode(errors="replace"):
        return
    tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([current] if current else [])])


def pad_token_of(folder: Path, tokenizer: Tokenizer) -> str:
    """The folder's pad token: tokenizer_config.json / special_tokens_map.json, else BERT's [PAD]."""
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            token = json.loads(path.read_text()).get("pad_token")
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
                return token
    return "[PAD]"


class ImagePreprocessor:
    """Decodes a request's images into one [n, channels, height, width] FP32 batch."""

    def __init__(self, entry: ModelEntry) -> None:
        self.entry = entry
        self.spec = entry.preprocess.image

    def encode(self, data: list[bytes], *, field: str) -> Encoded:
        if not data:
            raise invalid(f"`{field}` must contain at least one image", param=field)
        caps.check_images(self.entry, data, field=field)  # count and pixels, from the headers alone
        where = (lambda i: field) if len(data) == 1 else (lambda i: f"{field}[{i}]")
        pixels = np.stack([images.decode(raw, self.spec, field=where(i)) for i, raw in enumerate(data)])
        return Encoded({self.entry.inference.inputs[0].name: pixels}, 0, len(data), [0] * len(data))


def image_preprocessor(entry: ModelEntry, models_dir: Path):
    """The catalog's pixel recipe (`preprocess.image`), else the folder's own image processor."""
    if entry.preprocess.image is not None:
        return ImagePreprocessor(entry)
    from services.preprocess.vision import VisionPreprocessor  # imports transformers: only when needed

    return VisionPreprocessor(entry, model_dir(entry, models_dir))


class Preprocessor:
    """All models' preprocessors, built from the catalog and the model store at start."""

    def __init__(self, catalog: Catalog, models_dir: Path) -> None:
        self.catalog = catalog
        self.models_dir = models_dir
        self._text = {  # a model whose folder cannot be read answers 503, the others keep serving
            e.id: load_or_stand_in(e, models_dir, TextPreprocessor)
            for e in catalog.models
            if e.preprocess.kind == "text" and not GENERATION_TASKS & set(e.tasks)
        }
        self._generation = {
            e.id: load_or_stand_in(e, models_dir, GenerationPreprocessor)
            for e in catalog.models
            if GENERATION_TASKS & set(e.tasks)
        }
        self._image = {
            e.id: load_or_stand_in(e, models_dir, lambda e, _: image_preprocessor(e, models_dir))
            for e in catalog.models
            if e.preprocess.kind == "image"
        }

    def text(self, model_id: str) -> TextPreprocessor:
        """The text preprocessor (tokenizer, limits) of a text model; MeshError for other models."""
        entry = self.catalog.get(model_id)
        try:
            return self._text[entry.id]
        except KeyError:
            raise invalid(f"model {model_id!r} does not take text inputs", param="inputs") from None

    def tokenizer_of(self, model_id: str) -> TextPreprocessor | GenerationPreprocessor:
        """The preprocessor (tokenizer and limits) of any text model, generation models included."""
        entry = self.catalog.get(model_id)
        found = self._generation.get(entry.id) or self._text.get(entry.id)
        if found is None:
            raise invalid(
                f"model {model_id!r} has no tokenizer (it takes {entry.preprocess.kind} inputs)", param="model"
            )
        return found

    async def encode_task_texts(self, model_id: str, task: str, inputs, truncate: bool, encode) -> Encoded:
        """A text task with an encoder of its own (`encode(pre, texts, truncate=)` -> Encoded): the
        texts checked, then tokenized inline when short, in a thread when long."""
        entry = self.catalog.get(model_id)
        self.catalog.resolve_task(entry, task)
        if inputs.WhichOneof("kind") != "text":
            raise invalid(f"{task} takes text inputs", param="inputs")
        texts = list(inputs.text.texts)
        pre = self.text(model_id)
        pre.validate(texts, field="inputs")
        with tracing.span("tokenize", model=model_id, texts=len(texts)) as span:
            if sum(len(t) for t in texts) <= INLINE_CHARS:
                encoded = encode(pre, texts, truncate=truncate)
            else:
                encoded = await asyncio.to_thread(encode, pre, texts, truncate=truncate)
            span.set_attribute("tokens", encoded.input_tokens)
        return encoded

    def _model(self, model_id: str, task: str, kind: str) -> ModelEntry:
        entry = self.catalog.get(model_id)
        self.catalog.resolve_task(entry, task)
        if entry.preprocess.kind != kind:
            raise invalid(f"model {model_id!r} takes {entry.preprocess.kind} inputs, not {kind}", param="inputs")
        return entry

    async def encode_images(self, model_id: str, task: str, data: list[bytes], *, field: str) -> Encoded:
        entry = self._model(model_id, task, "image")
        pre = self._image[entry.id]
        with tracing.span("decode_images", model=model_id, images=len(data)):
            if isinstance(pre, ImagePreprocessor) and sum(len(d) for d in data) <= INLINE_IMAGE_BYTES:
                return pre.encode(data, field=field)
            return await asyncio.to_thread(pre.encode, data, field=field)

    async def prepare_generation(
        self,
        model_id: str,
        messages: list[tuple[str, str]] | None,
        text: str | None,
        max_new_tokens: int | None,
        *,
        tools=None,
    ) -> Prompt:
        """`tools`: a chat's tool parts (services/preprocess/tools.py ToolChat), or None."""
        entry = self._model(model_id, "text-generation", "text")
        pre = self._generation[entry.id]
        chars = sum(len(c) for _, c in messages) if messages is not None else len(text or "")
        if chars > entry.preprocess.max_chars:  # before rendering or tokenizing anything
            field = "messages" if messages is not None else "prompt"
            raise MeshError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"`{field}` has {chars} characters; model {model_id!r} takes at most {entry.preprocess.max_chars}",
                param=field,
            )
        with tracing.span("tokenize", model=model_id) as span:
            tokenize = (
                (lambda: pre.chat_ids(messages, tools)) if messages is not None else (lambda: pre.text_ids(text or ""))
            )
            # Long prompts are rendered and tokenized in a thread, as texts are: the loop stays free.
            ids = tokenize() if chars <= INLINE_CHARS else await asyncio.to_thread(tokenize)
            span.set_attribute("tokens", len(ids))
        TOKENS.labels(entry.id).inc(len(ids))
        return pre.prompt(ids, max_new_tokens)

    async def encode_zero_shot(
        self, model_id: str, texts: list[str], labels: list[str], template: str | None, *, truncate: bool
    ) -> Encoded:
        entry = self._model(model_id, "zero-shot-classification", "text")
        self._text[entry.id].validate(texts, field="inputs")
        rows = zero_shot_texts(entry, texts, labels, template)
        return await self.encode_texts(model_id, "zero-shot-classification", rows, truncate=truncate, field="inputs")

    async def encode_texts(
        self, model_id: str, task: str, texts: list[str], *, truncate: bool, field: str, prompt_name: str | None = None
    ) -> Encoded:
        """`prompt_name`: the catalog prompt put before each text (None: the model's default prompt)."""
        entry = self._model(model_id, task, "text")
        pre = self._text[entry.id]
        pre.validate(texts, field=field)
        prompt = pre.prompt(prompt_name)
        with tracing.span("tokenize", model=model_id, texts=len(texts)) as span:
            if sum(len(t) for t in texts) + len(prompt) * len(texts) <= INLINE_CHARS:
                encoded = pre.encode(texts, truncate=truncate, field=field, prompt=prompt)
            else:
                encoded = await asyncio.to_thread(pre.encode, texts, truncate=truncate, field=field, prompt=prompt)
            span.set_attribute("tokens", encoded.input_tokens)
        return encoded

    async def encode_token_ids(self, model_id: str, task: str, items: list[list[int]]) -> Encoded:
        """Feature-extraction of inputs already tokenized with the model's own tokenizer."""
        if task != "feature-extraction":
            raise invalid(f"{task} takes text inputs; token ids are for feature-extraction only", param="inputs")
        entry = self._model(model_id, task, "text")
        with tracing.span("tokenize", model=model_id, texts=len(items)) as span:
            encoded = self._text[entry.id].encode_ids(items, field="input")
            span.set_attribute("tokens", encoded.input_tokens)
        return encoded


def zero_shot_texts(entry: ModelEntry, texts: list[str], labels: list[str], template: str | None) -> list[str]:
    """The rows a zero-shot request embeds: per text, the text then one hypothesis per label
    (the template with the label in it). Postprocess compares each text with its hypotheses."""
    caps.check_zero_shot(entry, len(texts), labels, template)  # counts and lengths: before building rows
    template = template or entry.postprocess.zero_shot.hypothesis_template
    for i, label in enumerate(labels):
        if not label.strip():
            raise invalid(f"`parameters.candidate_labels[{i}]` is empty", param="parameters.candidate_labels")
    if len(set(labels)) != len(labels):
        raise invalid("`parameters.candidate_labels` has duplicates", param="parameters.candidate_labels")
    hypotheses = [template.replace("{}", label) for label in labels]
    return [row for text in texts for row in (text, *hypotheses)]

"""The remote provider kinds: OpenAI-compatible servers (vLLM, another meshserve, hosted APIs),
TGI, TEI and the Hugging Face Inference API. Each turns meshserve's ops (generate, embed,
rerank, raw HF tasks) into its dialect's calls and its answers back into Deltas, vectors and
scores. A kind that does not serve an op raises NotImplementedError (the registry never picks
it for that op)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from services.gateway.providers.http import DoneStream, GenStream, HttpClient, SSEParser, bad_response
from services.gateway.providers.types import Delta, Embeddings, Reranked, TaskReply

if TYPE_CHECKING:
    from services.gateway.providers.config import ProviderSpec

SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop", "min_tokens")
# TGI's finish reasons in OpenAI's words (what the gateway renders).
TGI_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


# ---------------------------------------------------------------- stream parsers


class OpenAIParser(SSEParser):
    """OpenAI chat / completion chunks; usage from the `include_usage` chunk; ends at [DONE]."""

    __slots__ = ("chat",)

    def __init__(self, chat: bool) -> None:
        super().__init__()
        self.chat = chat

    def feed(self, event: dict) -> Delta | None:
        usage = event.get("usage")
        if usage:
            self.prompt_tokens = usage.get("prompt_tokens")
            self.completion_tokens = usage.get("completion_tokens")
        choices = event.get("choices")
        if not choices:
            return None
        choice = choices[0]
        reason = choice.get("finish_reason")
        if reason:
            self.finish_reason = reason
        text = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
        return Delta(text) if text else None

    def done(self) -> bool:
        self.finished = True
        return True

    def eof(self) -> bool:
        return self.finished or self.finish_reason is not None


class TGIParser(SSEParser):
    """TGI `generate_stream` events: a token each; the last carries generated_text and details."""

    __slots__ = ()

    def feed(self, event: dict) -> Delta | None:
        details = event.get("details")
        if details:
            self.finish_reason = TGI_FINISH.get(details.get("finish_reason"), details.get("finish_reason"))
            self.completion_tokens = details.get("generated_tokens")
            self.prompt_tokens = details.get("input_length")
            self.finished = True
        elif event.get("generated_text") is not None:
            self.finished = True
        tok = event.get("token")
        if tok and not tok.get("special") and tok.get("text"):
            return Delta(tok["text"])
        return None


# ---------------------------------------------------------------- request bodies


def openai_body(model: str, request: dict, stream: bool) -> dict:
    body: dict[str, Any] = {"model": model}
    if "messages" in request:
        body["messages"] = request["messages"]
    else:
        body["prompt"] = request["prompt"]
    for key in SAMPLING:
        value = request.get(key)
        if value is not None:
            body[key] = value
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def tgi_parameters(request: dict) -> dict:
    """TGI's parameters: it refuses temperature 0 (greedy is do_sample false) and top_p >= 1."""
    params: dict[str, Any] = {"details": True}
    if request.get("max_tokens") is not None:
        params["max_new_tokens"] = request["max_tokens"]
    temperature = request.get("temperature")
    if temperature is not None:
        if temperature > 0:
            params["temperature"] = temperature
            params["do_sample"] = True
        else:
            params["do_sample"] = False
    top_p = request.get("top_p")
    if top_p is not None and 0 < top_p < 1:
        params["top_p"] = top_p
    if request.get("seed") is not None:
        params["seed"] = request["seed"]
    if request.get("stop"):
        params["stop"] = list(request["stop"])
    return params


def int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def to_vectors(provider: str, data: Any, n: int, dimensions: int | None, rid: str | None) -> np.ndarray:
    """[n, d] float32 from a list of vectors (token-level [n, t, d] is mean-pooled); `dimensions`
    keeps the first d values, renormalized (Matryoshka), when the upstream could not cut them."""
    try:
        vectors = np.asarray(data, dtype=np.float32)
    except (ValueError, TypeError):
        raise bad_response(provider, "the embeddings are not a list of vectors", rid) from None
    if vectors.ndim == 1 and n == 1:
        vectors = vectors[None, :]
    elif vectors.ndim == 3:
        vectors = vectors.mean(axis=1)
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise bad_response(provider, f"expected {n} vectors, got shape {list(vectors.shape)}", rid)
    if dimensions and vectors.shape[1] > dimensions:
        vectors = vectors[:, :dimensions]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1, norms)
    return np.ascontiguousarray(vectors)


# ---------------------------------------------------------------- the kinds


class Upstream:
    """A remote provider of one kind; `close()` releases its connections."""

    kind = ""

    def __init__(self, spec: ProviderSpec) -> None:
        self.name = spec.name
        self.spec = spec
        self.http = HttpClient(spec)

    def _unserved(self, op: str) -> NotImplementedError:
        return NotImplementedError(f"provider {self.name!r} ({self.kind}) does not serve {op}")

    async def generate(self, model: str, request: dict, *, stream: bool, request_id: str) -> GenStream:
        raise self._unserved("generation")

    async def embed(self, model: str, texts: list[str], *, dimensions: int | None, request_id: str) -> Embeddings:
        raise self._unserved("embeddings")

    async def rerank(self, model: str, query: str, texts: list[str], *, raw_scores: bool, request_id: str) -> Reranked:
        raise self._unserved("rerank")

    async def hf_task(
        self,
        model: str,
        task: str,
        body: bytes,
        *,
        request_id: str,
        content_type: str | None = None,
        wait_for_model: bool | None = None,
        use_cache: bool | None = None,
    ) -> TaskReply:
        """`body` as the caller sent it; `content_type` its Content-Type (None: JSON), e.g. an
        image's; `wait_for_model` / `use_cache` become X-Wait-For-Model / X-Use-Cache when given."""
        raise self._unserved(f"task {task}")

    async def close(self) -> None:
        await self.http.close()

    async def _openai_generate(self, path: str, model: str, request: dict, stream: bool, rid: str) -> GenStream:
        """An OpenAI-dialect chat or completion call at `path` (TGI and HF speak it for chat too)."""
        chat = "messages" in request
        payload = openai_body(model, request, stream)
        if stream:
            return await self.http.open_stream(path, payload, OpenAIParser(chat), request_id=rid)
        data, up_rid, _ = await self.http.call_json(path, payload, request_id=rid, long=True)
        try:
            choice = data["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError):
            raise bad_response(self.name, "the answer has no choices[0] text", up_rid) from None
        final = Delta("", True, choice.get("finish_reason"), usage.get("prompt_tokens"), usage.get("completion_tokens"))
        return DoneStream(Delta(text or ""), final, up_rid)

    async def _tgi_generate(self, path: str, stream_path: str, payload: dict, stream: bool, rid: str) -> GenStream:
        """A TGI-dialect generation (`inputs` + `parameters`): TGI /generate(_stream), HF text-generation."""
        if stream:
            return await self.http.open_stream(stream_path, payload, TGIParser(), request_id=rid)
        data, up_rid, headers = await self.http.call_json(path, payload, request_id=rid, long=True)
        if isinstance(data, list) and data:
            data = data[0]
        if not isinstance(data, dict) or not isinstance(data.get("generated_text"), str):
            raise bad_response(self.name, "the answer has no generated_text", up_rid)
        details = data.get("details") or {}
        reason = details.get("finish_reason")
        generated = details.get("generated_tokens", int_header(headers, "x-generated-tokens"))
        final = Delta("", True, TGI_FINISH.get(reason, reason), int_header(headers, "x-prompt-tokens"), generated)
        return DoneStream(Delta(data["generated_text"]), final, up_rid)


class OpenAIUpstream(Upstream):
    """An OpenAI-compatible server; base_url is its /v1 root."""

    kind = "openai"

    async def generate(self, model: str, request: dict, *, stream: bool, request_id: str) -> GenStream:
        path = "/chat/completions" if "messages" in request else "/completions"
        return await self._openai_generate(path, model, request, stream, request_id)

    async def embed(self, model: str, texts: list[str], *, dimensions: int | None, request_id: str) -> Embeddings:
        payload: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        if dimensions:
            payload["dimensions"] = dimensions
        data, rid, _ = await self.http.call_json("/embeddings", payload, request_id=request_id)
        try:
            rows = sorted(data["data"], key=lambda d: d["index"])
            vectors = [row["embedding"] for row in rows]
        except (KeyError, TypeError):
            raise bad_response(self.name, "the answer has no data[].embedding", rid) from None
        usage = data.get("usage") or {}
        return Embeddings(to_vectors(self.name, vectors, len(texts), dimensions, rid), usage.get("prompt_tokens"), rid)


class TGIUpstream(Upstream):
    """Text Generation Inference: /generate(_stream) for prompts, its /v1/chat/completions for chat."""

    kind = "tgi"

    async def generate(self, model: str, request: dict, *, stream: bool, request_id: str) -> GenStream:
        if "messages" in request:
            return await self._openai_generate("/v1/chat/completions", model, request, stream, request_id)
        payload = {"inputs": request["prompt"], "parameters": tgi_parameters(request)}
        return await self._tgi_generate("/generate", "/generate_stream", payload, stream, request_id)


class TEIUpstream(Upstream):
    """Text Embeddings Inference: /embed and /rerank."""

    kind = "tei"

    async def embed(self, model: str, texts: list[str], *, dimensions: int | None, request_id: str) -> Embeddings:
        # `dimensions` is cut here: older TEI versions do not know the parameter.
        payload = {"inputs": texts, "normalize": True}
        data, rid, headers = await self.http.call_json("/embed", payload, request_id=request_id)
        vectors = to_vectors(self.name, data, len(texts), dimensions, rid)
        return Embeddings(vectors, int_header(headers, "x-compute-tokens"), rid)

    async def rerank(self, model: str, query: str, texts: list[str], *, raw_scores: bool, request_id: str) -> Reranked:
        payload = {"query": query, "texts": texts, "raw_scores": raw_scores}
        data, rid, headers = await self.http.call_json("/rerank", payload, request_id=request_id)
        scores: list[float | None] = [None] * len(texts)
        try:
            for row in data:
                scores[row["index"]] = float(row["score"])
        except (KeyError, TypeError, IndexError, ValueError):
            raise bad_response(self.name, "the answer is not a list of {index, score}", rid) from None
        if any(s is None for s in scores):
            raise bad_response(
                self.name, f"the answer scores {sum(s is not None for s in scores)} of {len(texts)}", rid
            )
        return Reranked(scores, int_header(headers, "x-compute-tokens"), rid)  # type: ignore[arg-type]


# Tasks the HF router serves only at /models/{id}/pipeline/{task} (a model may run several).
PIPELINE_TASKS = frozenset({"feature-extraction", "sentence-similarity"})


class HFUpstream(Upstream):
    """The Hugging Face Inference API (or a server like it): /models/{id} runs the model's task;
    feature-extraction and sentence-similarity go to /models/{id}/pipeline/{task} (the router's form)."""

    kind = "hf"

    def _path(self, model: str) -> str:
        return "/models/" + quote(model, safe="/")

    async def generate(self, model: str, request: dict, *, stream: bool, request_id: str) -> GenStream:
        path = self._path(model)
        if "messages" in request:
            return await self._openai_generate(path + "/v1/chat/completions", model, request, stream, request_id)
        params = {**tgi_parameters(request), "return_full_text": False}
        payload = {"inputs": request["prompt"], "parameters": params, "stream": stream}
        return await self._tgi_generate(path, path, payload, stream, request_id)

    async def embed(self, model: str, texts: list[str], *, dimensions: int | None, request_id: str) -> Embeddings:
        path = self._path(model) + "/pipeline/feature-extraction"
        data, rid, _ = await self.http.call_json(path, {"inputs": texts}, request_id=request_id)
        return Embeddings(to_vectors(self.name, data, len(texts), dimensions, rid), None, rid)

    async def hf_task(
        self,
        model: str,
        task: str,
        body: bytes,
        *,
        request_id: str,
        content_type: str | None = None,
        wait_for_model: bool | None = None,
        use_cache: bool | None = None,
    ) -> TaskReply:
        path = self._path(model) + (f"/pipeline/{task}" if task in PIPELINE_TASKS else "")
        extra: dict[str, str] = {}
        if content_type:
            extra["Content-Type"] = content_type
        if wait_for_model is not None:
            extra["X-Wait-For-Model"] = "true" if wait_for_model else "false"
        if use_cache is not None:
            extra["X-Use-Cache"] = "true" if use_cache else "false"
        raw, resp = await self.http.call(path, body, request_id=request_id, extra=extra or None)
        return TaskReply(raw, resp.headers.get("x-request-id"))


KINDS: dict[str, type[Upstream]] = {
    "openai": OpenAIUpstream,
    "tgi": TGIUpstream,
    "tei": TEIUpstream,
    "hf": HFUpstream,
}


def make_upstream(spec: ProviderSpec) -> Upstream:
    """The adapter of a remote provider (the local provider has none: the mesh serves it)."""
    try:
        return KINDS[spec.kind](spec)
    except KeyError:
        raise ValueError(f"provider {spec.name!r}: kind {spec.kind!r} has no upstream adapter") from None

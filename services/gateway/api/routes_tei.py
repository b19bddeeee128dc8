"""Text Embeddings Inference's routes over the service layer: `POST /embed` ({inputs, normalize,
truncate, truncation_direction, prompt_name, dimensions} -> [[float]]), `POST /embed_all` ({inputs,
truncate, truncation_direction, prompt_name} -> [[[float]]], each input's token embeddings: the
model's `token_embeddings` inference output, padding removed) and `GET /info` (TEI's Info), errors
in TEI's `{error, error_type}`.

TEI serves one model; so does each base URL here: `/tei/{model id}` (its `/embed`, `/embed_all`,
`/info`, and a POST on the base URL itself, as huggingface_hub's feature_extraction sends it)
serves that model, and the root routes serve the only local model whose first task is
feature-extraction (with several, the root answers 400 naming them)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from meshserve.tasks.v1 import tasks_pb2
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common import caps
from services.common.catalog import ModelEntry
from services.common.errors import ErrorCode, MeshError, invalid
from services.gateway.api import hf_tasks
from services.gateway.api.deps import call_context_of, services_of
from services.gateway.api.http_io import json_response, read_json
from services.gateway.api.schemas import INT64_MAX
from services.gateway.service.bounds import text_token_bound
from services.gateway.service.validation import parse

router = APIRouter(tags=["text-embeddings-inference"])

TASK = "feature-extraction"
TEI_VERSION = "1.9.3"  # the TEI API version whose shapes these routes follow (docs/openapi.json)


class EmbedRequest(BaseModel):
    """TEI's EmbedRequest (EmbedAllRequest: the same less normalize and dimensions)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    inputs: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, texts, or token ids of the model's own tokenizer (one list or a list of lists)."
    )
    normalize: bool = Field(True, description="L2-normalize the embeddings.")
    truncate: bool | None = Field(False, description="Cut texts over the token limit (false: 413 as TEI).")
    truncation_direction: str = Field("Right", description="Only Right.")
    prompt_name: str | None = Field(None, description="A prompt of the model's, put before each text.")
    dimensions: int | None = Field(None, ge=1, description="Keep the first n dimensions, then L2-normalize.")


class EmbedAllRequest(BaseModel):
    """TEI's EmbedAllRequest: no `normalize` (token embeddings are never normalized) nor `dimensions`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    inputs: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="A text, texts, or token ids of the model's own tokenizer (one list or a list of lists)."
    )
    truncate: bool | None = Field(False, description="Cut texts over the token limit (false: 413 as TEI).")
    truncation_direction: str = Field("Right", description="Only Right.")
    prompt_name: str | None = Field(None, description="A prompt of the model's, put before each text.")


def _body(schema) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema.model_json_schema()}}}}


def default_model(request: Request) -> ModelEntry:
    """The only local model whose first task is feature-extraction (the root routes' model)."""
    catalog = services_of(request).models.catalog
    found = [e for e in catalog.models if e.default_task == TASK]
    if len(found) == 1:
        return found[0]
    if not found:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, "no model here serves feature-extraction", param="model")
    names = ", ".join(e.id for e in found)
    raise invalid(f"several embedding models ({names}): use the base URL /tei/<model id>", param="model")


def model_named(request: Request, model_id: str) -> ModelEntry:
    entry = services_of(request).models.get(model_id)
    if TASK not in entry.tasks:
        raise MeshError(ErrorCode.UNSUPPORTED_TASK, f"model {entry.id!r} does not serve {TASK}", param="model")
    return entry


def info(entry: ModelEntry) -> dict:
    """TEI's Info of one model (every required field; nullable ones null where we have no value)."""
    spec, inference = entry.preprocess, entry.inference
    return {
        "model_id": entry.id,
        "model_sha": None,
        "model_dtype": "float32",
        "served_model_name": entry.id,
        "model_type": {"embedding": {"pooling": "mean"}},
        "max_concurrent_requests": inference.max_queue_size,
        "max_input_length": spec.max_length,
        "max_batch_tokens": inference.max_batch_size * spec.max_length,
        "max_batch_requests": inference.max_batch_size,
        "max_client_batch_size": spec.max_items,
        "auto_truncate": False,
        "tokenization_workers": 1,
        "version": TEI_VERSION,
        "sha": None,
        "docker_label": None,
    }


async def embed(request: Request, entry: ModelEntry):
    """TEI's /embed on `entry`: one vector per input, always a list of lists."""
    body = parse(EmbedRequest, await read_json(request, request.app.state.max_body_bytes))
    request.state.model = entry.id
    if body.truncation_direction.lower() != "right":
        raise invalid("only `truncation_direction: Right` is supported", param="truncation_direction")
    hf_tasks.check_dimensions(entry, body.dimensions)
    services, ctx = services_of(request), call_context_of(request)
    if (items := token_ids(body.inputs)) is not None:
        if body.prompt_name is not None:
            raise invalid("`prompt_name` needs text `inputs`", param="prompt_name")
        result, headers = await services.embed.token_embeddings(
            ctx, entry, items, dimensions=body.dimensions, normalize=body.normalize
        )
    else:
        texts, _ = hf_tasks.texts(body.inputs, "inputs")
        caps.check_texts(entry, texts)
        hf_tasks.check_prompt_name(entry, body.prompt_name)
        result, headers = await services.embed.embeddings(
            ctx, entry, texts, dimensions=body.dimensions, prompt_name=body.prompt_name,
            truncate=bool(body.truncate), normalize=body.normalize,
        )  # fmt: skip
    return json_response([row.tolist() for row in result.vectors], headers=headers)


def token_ids(inputs) -> list[list[int]] | None:
    """Token-id `inputs` as a list of lists (checked in range), or None for text inputs."""
    if not (isinstance(inputs, list) and inputs and isinstance(inputs[0], (int, list))):
        return None
    items = [inputs] if isinstance(inputs[0], int) else inputs
    if any(not 0 <= t <= INT64_MAX for ids in items for t in ids):
        raise invalid("`inputs`: token ids must be between 0 and 2**63 - 1", param="inputs")
    return items


def token_embeddings_refusal(entry: ModelEntry) -> str | None:
    """Why `entry` has no token embeddings to serve (TEI answers 424 `backend`), or None."""
    spec = entry.inference
    if spec.runtime != "sentence_embedding":
        return f"model {entry.id!r} (runtime {spec.runtime}) has no token embeddings: /embed_all is not served"
    if spec.runtime_engine != "torch":
        return (
            f"model {entry.id!r} runs on the {spec.runtime_engine} engine, whose exported graph ends at the pooled "
            "embedding: /embed_all is served on the torch engine only; use /embed"
        )
    return None


async def embed_all(request: Request, entry: ModelEntry):
    """TEI's /embed_all on `entry`: each input's token embeddings (the encoder's last hidden states,
    un-pooled, un-normalized, padding removed): one [tokens][hidden] array per input."""
    body = parse(EmbedAllRequest, await read_json(request, request.app.state.max_body_bytes))
    request.state.model = entry.id
    if (refusal := token_embeddings_refusal(entry)) is not None:
        return json_response({"error": refusal, "error_type": "backend"}, 424)
    if body.truncation_direction.lower() != "right":
        raise invalid("only `truncation_direction: Right` is supported", param="truncation_direction")
    if (items := token_ids(body.inputs)) is not None:
        if body.prompt_name is not None:
            raise invalid("`prompt_name` needs text `inputs`", param="prompt_name")
        bound = sum(len(ids) for ids in items)
        inputs = tasks_pb2.TaskInputs(
            token_ids=tasks_pb2.TokenIdInputs(items=[tasks_pb2.TokenIds(ids=i) for i in items])
        )
    else:
        texts, _ = hf_tasks.texts(body.inputs, "inputs")
        caps.check_texts(entry, texts)
        hf_tasks.check_prompt_name(entry, body.prompt_name)
        bound = text_token_bound(entry, texts, body.prompt_name)
        inputs = tasks_pb2.TaskInputs(text=tasks_pb2.TextInputs(texts=texts))
    result, headers = await services_of(request).embed.embed_all(
        call_context_of(request), entry, inputs, max_input_tokens=bound, truncate=bool(body.truncate),
        prompt_name=body.prompt_name,
    )  # fmt: skip
    return json_response([vectors.tolist() for vectors in result.vectors], headers=headers)


@router.post("/embed", summary="Embeddings of the default embedding model (TEI)", openapi_extra=_body(EmbedRequest))
async def tei_embed(request: Request):
    return await embed(request, default_model(request))


@router.post("/embed_all", summary="Token embeddings (TEI)", openapi_extra=_body(EmbedAllRequest))
async def tei_embed_all(request: Request):
    return await embed_all(request, default_model(request))


@router.get("/info", summary="The default embedding model's info (TEI)")
async def tei_info(request: Request):
    return json_response(info(default_model(request)))


@router.post("/tei/{path:path}", summary="A model's TEI base URL: …/embed, …/embed_all, or the URL itself")
async def tei_model_post(request: Request, path: str):
    if path.endswith("/embed_all"):
        return await embed_all(request, model_named(request, path.removesuffix("/embed_all")))
    return await embed(request, model_named(request, path.removesuffix("/embed")))


@router.get("/tei/{path:path}", summary="A model's TEI info: /tei/{model id}/info")
async def tei_model_get(request: Request, path: str):
    if not path.endswith("/info"):
        raise StarletteHTTPException(404)
    return json_response(info(model_named(request, path.removesuffix("/info"))))

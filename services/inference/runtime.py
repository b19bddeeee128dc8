"""Model runtimes: load a model folder, run one padded batch. No gRPC, no asyncio.

A runtime's `execute()` takes a dict of named numpy input arrays whose first dimension is the batch
and returns a dict of named output arrays with the same batch dimension. The same classes run in
the embedded inference server and inside Triton's Python backend, so one model definition serves
both backends.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from services.common.catalog import ModelEntry

log = logging.getLogger(__name__)


# The optional output of sentence-embedding runtimes: the encoder's last hidden states, FP32
# [batch, tokens, hidden] (TEI's /embed_all). Served on request, beside the catalog's outputs.
TOKEN_EMBEDDINGS = "token_embeddings"


def only_zeros_and_ones(mask: np.ndarray) -> bool:
    """An attention mask holds only 0 and 1. For integer masks by min and max: np.isin sorts, about
    10x the cost for one request's row (#18: ~40 us of the inference hop at c=1)."""
    if mask.size == 0:
        return True
    if mask.dtype.kind in "iub":
        return bool(mask.min() >= 0 and mask.max() <= 1)
    return bool(np.isin(mask, (0, 1)).all())


def set_torch_threads(threads: int, *, import_torch: bool = False) -> None:
    """Intra-op threads for the calling thread. torch keeps the count in each thread's OpenMP
    state: a thread takes the last value set anywhere in the process at its first parallel op, and
    keeps its own after that. So each model's worker threads set their entry's `threads`
    (`torch_workers`), and a 1-thread model no longer decides the count of the 2-thread one loaded
    next to it. The first call below settles this thread's inherited value before ours replaces it
    (otherwise that late first use would overwrite ours with whatever another thread set last).
    A process that has not imported torch (numpy-only runtimes; no torch installed) is left alone
    unless `import_torch`."""
    if import_torch:
        import torch
    else:
        torch = sys.modules.get("torch")
    if torch is None:
        return
    torch.get_num_threads()
    torch.set_num_threads(threads)


def torch_workers(spec, name: str, workers: int) -> ThreadPoolExecutor:
    """The executor a model's forward passes run in; a torch-engine model's threads use its
    `threads` intra-op threads each (ONNX Runtime sessions take theirs at creation)."""
    if spec.runtime_engine != "torch":
        return ThreadPoolExecutor(workers, thread_name_prefix=name)
    return ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=set_torch_threads, initargs=(spec.threads,))


def pad_and_stack(arrays: list[np.ndarray], pad_value: int | float) -> np.ndarray:
    """Concatenate along the batch axis, padding every other axis to the largest size."""
    if len(arrays) == 1:
        return arrays[0]
    target = tuple(max(a.shape[d] for a in arrays) for d in range(1, arrays[0].ndim))
    if all(a.shape[1:] == target for a in arrays):
        return np.concatenate(arrays, axis=0)
    out = np.full((sum(a.shape[0] for a in arrays), *target), pad_value, dtype=arrays[0].dtype)
    row = 0
    for a in arrays:
        out[(slice(row, row + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        row += a.shape[0]
    return out


def torch_device():
    """CUDA when this process sees a GPU (a Triton KIND_GPU instance, a GPU node), else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# A torch batch is chunked only when that saves at least this share of its tokens (each forward of
# HF's modules has a fixed cost in Python). all-MiniLM, one thread, in process, batches of 32,
# sentences/s, whole against 16-row chunks: texts of 1-5 joined sentences (chunks save 22 % of the
# tokens) 65-68 against 90-92; the embeddings bench's sentences (13-20 tokens, 12 %) chunked would
# be 2-4 % slower, so they run whole (through the mesh at c=64, chunked: 325-360 against 337-362).
# onnxruntime gains either way (uniform 252-263 -> 294-309, joined 60-62 -> 105-109): no threshold.
TORCH_CHUNK_SAVING = 0.15


def length_chunks(mask: np.ndarray, rows: int) -> list[tuple[np.ndarray, int]]:
    """(row indices, width) of each chunk of at most `rows` rows of a batch: rows sorted by one past
    their last attended column, each chunk as wide as its longest row (at least one column)."""
    ends = np.where(mask.any(axis=1), mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1), 0)
    order = np.argsort(ends, kind="stable")
    chunks = [order[start : start + rows] for start in range(0, len(order), rows)]
    return [(chunk, max(int(ends[chunk[-1]]), 1)) for chunk in chunks]


def run_in_chunks(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    inputs: dict[str, np.ndarray],
    rows: int,
    token_outputs: tuple[str, ...] = (),
    min_saving: float = 0.0,
) -> dict[str, np.ndarray]:
    """`run` over the batch's `length_chunks` (each [batch, tokens] input cut to the chunk's rows
    and width), every output row put back at its place; `token_outputs` ([batch, tokens, ...]) are
    zero-padded back to the batch's width. Columns that no row of a chunk attends to change nothing
    in an attention-masked encoder with masked pooling, so only padding work is saved. The batch
    runs whole when `rows` is 0 or covers it, or when the chunks would save less than `min_saving`
    of its tokens."""
    mask = inputs["attention_mask"]
    if not rows or len(mask) <= rows:
        return run(inputs)
    chunks = length_chunks(mask, rows)
    if sum(len(chunk) * width for chunk, width in chunks) > (1 - min_saving) * mask.size:
        return run(inputs)
    out: dict[str, np.ndarray] = {}
    for chunk, width in chunks:
        part = run(
            {
                name: np.ascontiguousarray(tensor[chunk, :width] if tensor.shape == mask.shape else tensor[chunk])
                for name, tensor in inputs.items()
            }
        )
        for name, values in part.items():
            tokens = name in token_outputs
            if name not in out:
                shape = (len(mask), *((mask.shape[1], *values.shape[2:]) if tokens else values.shape[1:]))
                out[name] = (np.zeros if tokens else np.empty)(shape, values.dtype)
            if tokens:
                out[name][chunk, :width] = values
            else:
                out[name][chunk] = values
    return out


def _writable(array: np.ndarray) -> np.ndarray:
    """torch.from_numpy needs a writable array; one decoded straight from request bytes is not."""
    array = np.ascontiguousarray(array, dtype=np.int64)
    return array if array.flags.writeable else array.copy()


class Runtime:
    """Interface of a runtime: inputs and outputs are named numpy arrays, batch first."""

    # Value used to pad each variable-length input when requests are batched together.
    pad_values: ClassVar[dict[str, int | float]] = {}
    # Most rows per forward pass (catalog `chunk_rows`; encoder runtimes only); 0: the whole batch.
    chunk_rows: int = 0

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        """Raise ValueError when one request's inputs would break the model. Called per request,
        before batching, so that one bad request cannot fail a batch of good ones."""

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def execute_outputs(self, inputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
        """At least the outputs `names` (a batch's requested outputs); a runtime whose outputs come
        together returns them all, one with outputs on request computes only those asked for."""
        return self.execute(inputs)

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's outputs from its rows of a batch's outputs, given its own inputs (before
        padding). Runtimes whose outputs follow the padded tokens cut them back here."""
        return outputs


class SentenceEmbeddingRuntime(Runtime):
    """A transformers encoder followed by sentence-transformers' Pooling and Dense modules, as the
    folder's modules.json lists them (no modules.json: attention-masked mean pooling). Pooling
    happens here, inside the batch, so only [batch, dim] FP32 leaves the inference service instead
    of [batch, tokens, dim]; L2 normalization is left to postprocess, where the catalog and the
    caller's `normalize` parameter decide it. `token_type_ids` is passed on when the catalog sends it.

    A second output, `token_embeddings` (the encoder's last hidden states, FP32 [batch, tokens,
    hidden], padding positions included: the caller strips them with the attention mask it sent),
    serves TEI's /embed_all. `execute_outputs` builds it only for a batch that asks for it (Triton's
    backend passes the requested outputs); `execute()`, what the embedded batcher runs, hands it out
    always: on the CPU it is a view of hidden states the pooling computed anyway.
    """

    pad_values: ClassVar[dict[str, int | float]] = {"input_ids": 0, "attention_mask": 0, "token_type_ids": 0}
    output_names: ClassVar[tuple[str, ...]] = ("embedding",)
    token_outputs: ClassVar[bool] = True  # exposes TOKEN_EMBEDDINGS

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModel

        from services.common.nets import mean_pool
        from services.inference.sentence_modules import read_head

        self._torch, self._pool = torch, mean_pool
        self.device = torch_device()
        head = read_head(model_dir)
        self.model = AutoModel.from_pretrained(str(head.encoder_dir)).eval().to(self.device)
        self.modes = head.modes
        for layer in head.dense:
            layer.weight = layer.weight.to(self.device)
            layer.bias = None if layer.bias is None else layer.bias.to(self.device)
        self.dense = head.dense
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_tokens = int(getattr(config, "max_position_embeddings", 0) or 1 << 31)
        self.type_vocab_size = int(getattr(config, "type_vocab_size", 0) or 0)

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        if ids.shape[-1] == 0:
            raise ValueError("input 'input_ids' has no tokens")
        if ids.shape[-1] > self.max_tokens:
            raise ValueError(f"input 'input_ids' has {ids.shape[-1]} tokens; the model takes at most {self.max_tokens}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input 'input_ids' holds token ids outside [0, {self.vocab_size})")
        if not only_zeros_and_ones(mask):
            raise ValueError("input 'attention_mask' must hold only 0 and 1")
        types = inputs.get("token_type_ids")
        if types is not None and (types.min() < 0 or types.max() >= max(self.type_vocab_size, 1)):
            raise ValueError(f"input 'token_type_ids' holds ids outside [0, {max(self.type_vocab_size, 1)})")

    def feed(self, inputs: dict[str, np.ndarray]) -> dict:
        """The encoder's inputs as int64 tensors on the model's device (token_type_ids when sent)."""
        torch = self._torch
        return {
            name: torch.from_numpy(_writable(inputs[name])).to(self.device)
            for name in ("input_ids", "attention_mask", "token_type_ids")
            if name in inputs
        }

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None):
        """The encoder's last hidden states [batch, tokens, hidden], a torch tensor on the model's device."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state

    def pooled(self, input_ids, attention_mask, token_type_ids=None):
        """[batch, dim] sentence embeddings (pooled, then the Dense layers) as a torch tensor on the
        model's device."""
        return self.pool(self.hidden_states(input_ids, attention_mask, token_type_ids), attention_mask)

    def pool(self, hidden, attention_mask):
        """The Pooling and Dense modules over hidden states: [batch, dim] FP32."""
        torch = self._torch
        if self.modes == ("mean",) and not self.dense:
            return self._pool(hidden, attention_mask).to(torch.float32)
        from services.inference.sentence_modules import apply_dense, pool

        return apply_dense(self.dense, pool(self.modes, hidden, attention_mask).to(torch.float32))

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> tuple:
        """The `output_names` tensors, in order, from the encoder's input tensors: what execute()
        returns and what the ONNX engine exports."""
        return (self.pooled(input_ids, attention_mask, token_type_ids),)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output: the pooled one and, where the runtime has it, `token_embeddings` (on the
        CPU the hidden states are already there: handing them out is a view, not a copy)."""
        names = self.output_names + ((TOKEN_EMBEDDINGS,) if self.token_outputs else ())
        return self.execute_outputs(inputs, frozenset(names))

    def execute_outputs(self, inputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
        """A batch of more than `chunk_rows` rows runs as length-sorted chunks (`run_in_chunks`) when
        they save at least TORCH_CHUNK_SAVING of its tokens."""
        run = functools.partial(self._execute_outputs, names=names)
        return run_in_chunks(run, inputs, self.chunk_rows, (TOKEN_EMBEDDINGS,), TORCH_CHUNK_SAVING)

    def _execute_outputs(self, inputs: dict[str, np.ndarray], names: frozenset[str]) -> dict[str, np.ndarray]:
        if not (self.token_outputs and TOKEN_EMBEDDINGS in names):
            with self._torch.inference_mode():
                outputs = self.forward(**self.feed(inputs))
            return {name: out.cpu().numpy() for name, out in zip(self.output_names, outputs, strict=True)}
        torch = self._torch
        with torch.inference_mode():
            feed = self.feed(inputs)
            hidden = self.hidden_states(**feed)
            result = {TOKEN_EMBEDDINGS: hidden.to(torch.float32).cpu().numpy()}
            if names - {TOKEN_EMBEDDINGS}:
                result[self.output_names[0]] = self.pool(hidden, feed["attention_mask"]).cpu().numpy()
        return result

    def request_outputs(self, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Token embeddings cut back from the batch's padded length to the request's own (a view)."""
        if TOKEN_EMBEDDINGS not in outputs:
            return outputs
        tokens = inputs["input_ids"].shape[1]
        return {**outputs, TOKEN_EMBEDDINGS: outputs[TOKEN_EMBEDDINGS][:, :tokens]}


class EmbeddingClassifierRuntime(SentenceEmbeddingRuntime):
    """Sentence embedding (mean pooling, L2-normalized) followed by a linear head, in one batch:
    only [batch, labels] logits leave the inference service. The head is `classifier.safetensors`
    (weight [labels, dim], bias [labels]) beside the encoder's files."""

    output_names: ClassVar[tuple[str, ...]] = ("logits",)
    token_outputs: ClassVar[bool] = False

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        from safetensors.torch import load_file

        head = load_file(str(model_dir / "classifier.safetensors"), device=str(self.device))
        self.weight, self.bias = head["weight"], head["bias"]

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> tuple:
        functional = self._torch.nn.functional
        normalized = functional.normalize(self.pooled(input_ids, attention_mask, token_type_ids), dim=1)
        return (functional.linear(normalized, self.weight, self.bias),)


class ImageClassifierRuntime(Runtime):
    """A torch image classifier whose architecture is named in the folder's config.json
    (services.common.nets) and whose weights are model.safetensors. Input: normalized pixels
    [batch, channels, height, width] FP32 from preprocess; output: [batch, labels] logits."""

    def __init__(self, model_dir: Path) -> None:
        import json

        import torch
        from safetensors.torch import load_file

        from services.common.nets import ARCHITECTURES

        self._torch = torch
        self.device = torch_device()
        config = json.loads((model_dir / "config.json").read_text())
        self.model = ARCHITECTURES[config["architecture"]](len(config["labels"]))
        self.model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
        self.model.eval().to(self.device)

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        if not np.isfinite(inputs["pixel_values"]).all():
            raise ValueError("input 'pixel_values' holds NaN or infinite values")

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        pixels = np.ascontiguousarray(inputs["pixel_values"], dtype=np.float32)
        with torch.inference_mode():
            pixels = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy()).to(self.device)
            return {"logits": self.model(pixels).to(torch.float32).cpu().numpy()}


def _causal_lm(model_dir: Path):
    from services.inference.generation import CausalLMRuntime

    return CausalLMRuntime(model_dir)


def _sequence_classification(model_dir: Path):
    from services.inference.hf_classifiers import SequenceClassificationRuntime

    return SequenceClassificationRuntime(model_dir)


def _token_classification(model_dir: Path):
    from services.inference.hf_tokens import TokenClassificationRuntime

    return TokenClassificationRuntime(model_dir)


def _masked_lm(model_dir: Path):
    from services.inference.hf_masked import MaskedLMRuntime

    return MaskedLMRuntime(model_dir)


def _question_answering(model_dir: Path):
    from services.inference.hf_qa import QuestionAnsweringRuntime

    return QuestionAnsweringRuntime(model_dir)


def _vision_classification(model_dir: Path):
    from services.inference.hf_vision import VisionClassificationRuntime

    return VisionClassificationRuntime(model_dir)


RUNTIMES: dict[str, Callable[[Path], Runtime]] = {
    "causal_lm": _causal_lm,  # served by the GenerationScheduler (ModelStreamInfer), not a batcher
    "sentence_embedding": SentenceEmbeddingRuntime,
    "embedding_classifier": EmbeddingClassifierRuntime,
    "image_classifier": ImageClassifierRuntime,
    "vision_classification": _vision_classification,
    "sequence_classification": _sequence_classification,
    "token_classification": _token_classification,
    "masked_lm": _masked_lm,
    "question_answering": _question_answering,
}


def token_embeddings_output(kind: str, engine: str, model_dir: Path) -> dict | None:
    """The TOKEN_EMBEDDINGS output a runtime kind has on an engine ({name, datatype, dims without
    the batch axis}), or None. The onnx engine exports only the pooled graph: it has none."""
    if kind != "sentence_embedding" or engine != "torch":
        return None
    import json

    from services.inference.sentence_modules import encoder_dir

    folder = encoder_dir(model_dir)
    hidden = json.loads((folder / "config.json").read_text()).get("hidden_size")
    if not isinstance(hidden, int):  # named otherwise (DistilBERT's `dim`): transformers' own mapping
        from transformers import AutoConfig

        hidden = AutoConfig.from_pretrained(str(folder)).hidden_size
    # Read before each Triton load (triton_launcher.complete, or auto_complete_config in a stub of
    # its own): config.json spares transformers' import, ~4.4 s of CPU per load of the model.
    return {"name": TOKEN_EMBEDDINGS, "datatype": "FP32", "dims": (-1, int(hidden))}


@dataclass(frozen=True)
class RuntimeOptions:
    """How a catalog entry's runtime runs: its engine (catalog `inference.runtime_engine`), its
    intra-op threads, the folder where an engine keeps what it derives from the weights once
    (the ONNX export), and the most rows the engine runs at once."""

    engine: str = "torch"
    threads: int = 1
    cache_dir: Path | None = None
    chunk_rows: int = 0  # most rows per engine run (catalog `chunk_rows`); 0: the whole batch

    @classmethod
    def of(cls, entry: ModelEntry, models_dir: Path) -> RuntimeOptions:
        """An entry's options; the cache lies in its store folder, beside the built `model/`."""
        spec = entry.inference
        cache = entry.store_dir(models_dir) / spec.runtime_engine
        return cls(spec.runtime_engine, spec.threads, cache, spec.run_chunk_rows)


def load_runtime(kind: str, model_dir: Path, options: RuntimeOptions | None = None) -> Runtime:
    """The runtime of `kind` for a model folder, on the options' engine (default: torch)."""
    options = options or RuntimeOptions()
    factories = RUNTIMES
    if options.engine == "onnx":
        from services.inference.onnx_engine import ONNX_RUNTIMES

        factories = ONNX_RUNTIMES
    elif options.engine != "torch":
        raise ValueError(f"unknown runtime engine {options.engine!r}; known: torch, onnx")
    try:
        factory = factories[kind]
    except KeyError:
        raise ValueError(
            f"unknown runtime {kind!r} for engine {options.engine!r}; known: {', '.join(factories)}"
        ) from None
    runtime = factory(model_dir, options) if options.engine == "onnx" else factory(model_dir)
    runtime.chunk_rows = options.chunk_rows
    return runtime

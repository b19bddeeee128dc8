"""The `onnx` runtime engine: an encoder runtime exported once with torch.onnx, run by onnxruntime.

The torch runtime reads the folder exactly as the torch engine does (modules.json, Pooling, Dense,
a classifier head); its `forward` is traced into one ONNX graph that ends where execute() ends
(the pooled embedding, or the logits), so only [batch, dim] leaves the session. The graph is cached
in the options' cache folder under a key of the weights' files and the exporter, written atomically
under a file lock (the embedded server and Triton's stub may load the same model at once), and run
by an onnxruntime session on the CPU provider. Validation and padding are the torch runtime's.

A batch of more than `chunk_rows` rows runs as several session runs (runtime.run_in_chunks): rows
sorted by length, each chunk cut to the last column any of its rows uses; less padding, and a
chunk's activations stay in the core's cache (catalog.CHUNK_ROWS_PER_THREAD).

optimum is not used: optimum-onnx 0.1.0, its newest release, requires transformers < 4.58 and
fails to import under transformers 5.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.inference.runtime import (
    EmbeddingClassifierRuntime,
    Runtime,
    RuntimeOptions,
    SentenceEmbeddingRuntime,
    run_in_chunks,
)

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph changes: older cache files are then ignored
OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def graph_inputs(runtime: SentenceEmbeddingRuntime) -> tuple[str, ...]:
    """The exported graph's inputs: token_type_ids too when the encoder has token types (the
    session is fed zeros, the encoder's own default, when a request does not send them)."""
    return INPUTS if runtime.type_vocab_size > 0 else INPUTS[:2]


def cache_key(model_dir: Path, kind: str, inputs: tuple[str, ...]) -> str:
    """A key that changes with any file of the folder (path, size, mtime), the exporter and torch."""
    import torch

    digest = hashlib.sha256(f"{EXPORT_VERSION}|{OPSET}|{torch.__version__}|{kind}|{','.join(inputs)}".encode())
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(f"|{path.relative_to(model_dir)}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _sample(inputs: tuple[str, ...]) -> tuple:
    """Two rows of eight tokens, the second padded: the trace must keep the attention-mask path."""
    import torch

    ids = torch.full((2, 8), 101, dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    mask[1, 5:] = 0
    return (ids, mask, torch.zeros_like(ids))[: len(inputs)]


def export(runtime: SentenceEmbeddingRuntime, inputs: tuple[str, ...], path: Path) -> None:
    """Trace the runtime's forward into an ONNX file at `path` (written beside it, then renamed)."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = runtime.model  # registered: its weights become the graph's initializers

        def forward(self, *tensors):
            return runtime.forward(*tensors)

    axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
    axes.update({name: {0: "batch"} for name in runtime.output_names})
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(handle)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about Python branches on shapes
            torch.onnx.export(
                Graph().eval(), _sample(inputs), tmp, dynamo=False, opset_version=OPSET, input_names=list(inputs),
                output_names=list(runtime.output_names), dynamic_axes=axes, do_constant_folding=True,
            )  # fmt: skip
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the file from a Triton run as another user
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def exported(runtime: SentenceEmbeddingRuntime, model_dir: Path, kind: str, cache_dir: Path) -> Path:
    """The cached ONNX file of this folder and runtime, exported first when it is not there."""
    from filelock import FileLock

    inputs = graph_inputs(runtime)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{kind}-{cache_key(model_dir, kind, inputs)}.onnx"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            log.info("exporting to ONNX", extra={"fields": {"model_dir": str(model_dir), "path": str(path)}})
            export(runtime, inputs, path)
    return path


def session(path: Path, threads: int):
    """An onnxruntime CPU session: all graph optimizations, `threads` intra-op threads that sleep
    when idle (spinning would take the cores from the mesh's other processes between batches)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxEncoderRuntime(Runtime):
    """A sentence-embedding or embedding-classifier runtime run by onnxruntime. The torch runtime
    is kept only for its checks (its weights are dropped once the session is up)."""

    def __init__(self, runtime: SentenceEmbeddingRuntime, model_dir: Path, kind: str, options: RuntimeOptions) -> None:
        cache_dir = options.cache_dir or Path(tempfile.gettempdir()) / "meshserve-onnx"
        self.path = exported(runtime, model_dir, kind, cache_dir)
        self.session = session(self.path, options.threads)
        self.input_names = tuple(node.name for node in self.session.get_inputs())
        self.output_names = runtime.output_names
        self.pad_values = dict(runtime.pad_values)
        runtime.model = runtime.dense = None  # validate() reads only the config's limits
        self.checks = runtime

    def validate(self, inputs: dict[str, np.ndarray]) -> None:
        self.checks.validate(inputs)

    def execute(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(inputs["input_ids"], dtype=np.int64)
        feed = {"input_ids": ids}
        for name in self.input_names[1:]:
            feed[name] = np.ascontiguousarray(inputs[name], dtype=np.int64) if name in inputs else np.zeros_like(ids)
        return run_in_chunks(self._run, feed, self.chunk_rows)

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(list(self.output_names), feed), strict=True))


def _onnx(cls: type[SentenceEmbeddingRuntime], kind: str) -> Callable[[Path, RuntimeOptions], Runtime]:
    def load(model_dir: Path, options: RuntimeOptions) -> Runtime:
        return OnnxEncoderRuntime(cls(model_dir), model_dir, kind, options)

    return load


ONNX_RUNTIMES: dict[str, Callable[[Path, RuntimeOptions], Runtime]] = {
    "sentence_embedding": _onnx(SentenceEmbeddingRuntime, "sentence_embedding"),
    "embedding_classifier": _onnx(EmbeddingClassifierRuntime, "embedding_classifier"),
}

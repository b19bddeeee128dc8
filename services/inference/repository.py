"""The embedded model repository: loads catalog models into runtimes + batchers, tracks their
state (LOADING / READY / UNAVAILABLE / UNLOADING) the way Triton's repository index reports it."""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from services.common.catalog import Catalog, ModelEntry, TensorSpec
from services.common.errors import ErrorCode, MeshError
from services.common.modelstore import is_built, model_dir
from services.inference.batcher import DynamicBatcher
from services.inference.generation import GenerationScheduler
from services.inference.runtime import RuntimeOptions, load_runtime, set_torch_threads, token_embeddings_output
from services.inference.stats import ModelStats

log = logging.getLogger(__name__)


async def in_own_thread(fn, *args):
    """`fn(*args)` on a thread of its own that ends with the call. libgomp keeps the worker team of
    a thread that ran a multi-threaded op until that thread exits, and once the teams' threads
    outnumber the CPUs every team stops spinning (batcher._WideLane). A load's warm-up at its
    entry's `threads` on a pooled thread (asyncio.to_thread) left such a team for good: on 2 cores,
    a 2-thread model's own workers then ran every op throttled (sdpa at 32 rows 200 us against 100)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # handed to the awaiting coroutine
            future.set_exception(exc)

    threading.Thread(target=run, name="model-load", daemon=True).start()
    return await asyncio.wrap_future(future)


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass
class ModelSlot:
    """One repository model and, when READY, its batcher."""

    entry: ModelEntry
    state: ModelState = ModelState.UNAVAILABLE
    reason: str = "unloaded"
    batcher: DynamicBatcher | GenerationScheduler | None = None
    stats: ModelStats = field(default_factory=ModelStats)
    version: str = "1"

    @property
    def name(self) -> str:
        return self.entry.inference.name


def with_runtime_outputs(entry: ModelEntry, models_dir: Path) -> ModelEntry:
    """The entry with the optional outputs its runtime serves on request (a sentence embedder's
    `token_embeddings`) added to its contract, as Triton's Python backend adds them to the model's
    config: a client may then ask for them by name."""
    spec = entry.inference
    extra = token_embeddings_output(spec.runtime, spec.runtime_engine, model_dir(entry, models_dir))
    if extra is None or any(t.name == extra["name"] for t in spec.outputs):
        return entry
    outputs = (*spec.outputs, TensorSpec(**extra))
    return entry.model_copy(update={"inference": spec.model_copy(update={"outputs": outputs})})


class ModelRepository:
    def __init__(self, catalog: Catalog, models_dir: Path) -> None:
        self.catalog = catalog
        self.models_dir = models_dir
        self.slots = {entry.inference.name: ModelSlot(entry) for entry in catalog.models}
        self._locks = {name: asyncio.Lock() for name in self.slots}

    def slot(self, name: str) -> ModelSlot:
        try:
            return self.slots[name]
        except KeyError:
            raise MeshError(ErrorCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found") from None

    def ready(self, name: str, version: str = "") -> ModelSlot:
        """The slot of a READY model; NOT_FOUND / UNAVAILABLE otherwise (Triton's wording)."""
        slot = self.slot(name)
        if version and version != slot.version:
            raise MeshError(ErrorCode.NOT_FOUND, f"Request for unknown model: '{name}' version {version} is not found")
        if slot.state is not ModelState.READY or slot.batcher is None:
            code = ErrorCode.MODEL_LOADING if slot.state is ModelState.LOADING else ErrorCode.UPSTREAM_UNAVAILABLE
            raise MeshError(code, f"Request for unknown model: '{name}' has no available versions ({slot.reason})")
        return slot

    async def load(self, name: str) -> ModelSlot:
        slot = self.slot(name)
        async with self._locks[name]:
            if slot.state is ModelState.READY:
                return slot
            entry = slot.entry
            if not is_built(entry, self.models_dir):
                slot.state, slot.reason = ModelState.UNAVAILABLE, "not built: run `meshserve models build`"
                raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"failed to load '{name}': {slot.reason}")
            slot.state, slot.reason = ModelState.LOADING, "loading"
            started = time.perf_counter()
            try:
                runtime, entry = await in_own_thread(self._load_runtime, entry)
            except Exception as exc:
                log.exception("model load failed", extra={"fields": {"model": name}})
                slot.state, slot.reason = ModelState.UNAVAILABLE, f"load failed: {type(exc).__name__}"
                raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, f"failed to load '{name}'") from exc
            slot.entry = entry
            if entry.inference.runtime == "causal_lm":
                slot.batcher = GenerationScheduler(name, runtime, entry.inference, slot.stats)
            else:
                slot.batcher = DynamicBatcher(name, runtime, entry.inference, slot.stats)
            slot.state, slot.reason = ModelState.READY, ""
            log.info(
                "model ready", extra={"fields": {"model": name, "load_s": round(time.perf_counter() - started, 2)}}
            )
            return slot

    def _load_runtime(self, entry: ModelEntry):
        """Load thread (`in_own_thread`): the entry's runtime, and the entry with the runtime's
        optional outputs."""
        folder = model_dir(entry, self.models_dir)
        if entry.inference.runtime_engine == "torch":  # the load's own warm-up passes, as the model's workers will run
            set_torch_threads(entry.inference.threads)
        runtime = load_runtime(entry.inference.runtime, folder, RuntimeOptions.of(entry, self.models_dir))
        return runtime, with_runtime_outputs(entry, self.models_dir)

    async def unload(self, name: str) -> None:
        slot = self.slot(name)
        async with self._locks[name]:
            if slot.batcher is None:
                slot.state, slot.reason = ModelState.UNAVAILABLE, "unloaded"
                return
            slot.state, slot.reason = ModelState.UNLOADING, "unloading"
            batcher, slot.batcher = slot.batcher, None
            await batcher.close()
            slot.state, slot.reason = ModelState.UNAVAILABLE, "unloaded"

    async def load_all(self) -> None:
        for name in self.slots:
            try:
                await self.load(name)
            except MeshError as err:
                log.error("model not loaded", extra={"fields": {"model": name, "reason": err.message}})

    async def close(self) -> None:
        for name in self.slots:
            await self.unload(name)

    def all_ready(self) -> bool:
        return all(slot.state is ModelState.READY for slot in self.slots.values())

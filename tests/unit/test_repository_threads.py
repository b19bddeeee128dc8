"""torch keeps its intra-op thread count per thread (each thread's OpenMP state), so every model's
worker threads run with their own catalog entry's `threads`, whatever the other models loaded in
the same inference process asked for and whatever the load order."""

from __future__ import annotations

import asyncio
import os
import re
import threading

import numpy as np
import pytest

from services.common.catalog import Catalog
from services.inference.repository import ModelRepository
from tests.helpers import MODEL_ID

torch = pytest.importorskip("torch")

DIGITS = "meshserve/digits-cnn"
SENTIMENT = "meshserve/sentiment-minilm"


def _seen_by_the_worker(slot) -> tuple[int, int]:
    """(torch's count, OpenMP's max team size) in the model's forward-pass worker thread."""

    def probe() -> tuple[int, int]:
        info = torch.__config__.parallel_info()
        return torch.get_num_threads(), int(re.search(r"omp_get_max_threads\(\) : (\d+)", info).group(1))

    return slot.batcher._executor.submit(probe).result(timeout=30)


def _run(scenario):
    """asyncio.run(scenario()), leaving this thread's torch count as it found it."""
    before = torch.get_num_threads()
    try:
        return asyncio.run(scenario())
    finally:
        torch.set_num_threads(before)


def _layout(entry, instances: int, threads: int):
    return entry.model_copy(
        update={"inference": entry.inference.model_copy(update={"instances": instances, "threads": threads})}
    )


@pytest.mark.parametrize("order", [(MODEL_ID, DIGITS), (DIGITS, MODEL_ID)])
def test_each_model_runs_with_its_own_threads_whatever_the_load_order(catalog, models_dir, order):
    layouts = {MODEL_ID: (1, 2), DIGITS: (1, 1)}  # one wide instance beside a 1-thread one
    entries = [_layout(catalog.get(model_id), *layouts[model_id]) for model_id in order]
    before = torch.get_num_threads()
    repository = ModelRepository(Catalog(entries), models_dir)

    async def load_and_probe() -> list[tuple[int, int]]:
        slots = [await repository.load(entry.inference.name) for entry in entries]
        try:
            # The last-loaded model's worker starts first, then the other's, then both again: a
            # worker's count never follows what another thread set after it.
            seen = [_seen_by_the_worker(slot) for slot in (slots[1], slots[0], slots[1], slots[0])]
        finally:
            for entry in entries:
                await repository.unload(entry.inference.name)
        return seen

    try:
        seen = asyncio.run(load_and_probe())
    finally:
        torch.set_num_threads(before)
    last, first = (e.inference.threads for e in reversed(entries))
    assert seen == [(last, last), (first, first), (last, last), (first, first)]


def test_a_batch_alone_runs_on_every_instance_thread_and_concurrent_ones_on_their_own(catalog, models_dir):
    """all-MiniLM ships as two 1-thread instances: a lone batch (batch 1 at low load) runs on both
    threads, and while another batch runs each runs on its own one. Every lone batch runs on the
    same thread (libgomp stops spinning once the teams of several threads outnumber the CPUs)."""
    entry = _layout(catalog.get(MODEL_ID), 2, 1)
    repository = ModelRepository(Catalog([entry]), models_dir)
    seen: list[tuple[int, int]] = []
    second_started = threading.Event()

    async def scenario() -> None:
        slot = await repository.load(entry.inference.name)
        runtime, execute = slot.batcher.runtime, slot.batcher.runtime.execute
        loop, first_running = asyncio.get_running_loop(), asyncio.Event()

        def observed(stacked):  # the real forward pass, after noting the worker's thread and count
            seen.append((torch.get_num_threads(), threading.get_ident()))
            if len(seen) == 1:
                loop.call_soon_threadsafe(first_running.set)
                assert second_started.wait(30), "the second batch never started beside the first"
            elif len(seen) == 2:
                second_started.set()
            return execute(stacked)

        runtime.execute = observed
        ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
        request = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        try:
            first = slot.batcher.submit(request, 1)
            await asyncio.wait_for(first_running.wait(), 60)  # it holds until the second starts
            second = slot.batcher.submit(request, 1)
            (a, _), (b, _) = await asyncio.wait_for(asyncio.gather(first, second), 60)
            (c, _) = await asyncio.wait_for(slot.batcher.submit(request, 1), 60)  # alone again
            np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)
            np.testing.assert_allclose(a["embedding"], c["embedding"], atol=1e-5)
        finally:
            await repository.unload(entry.inference.name)

    _run(scenario)
    assert [threads for threads, _ in seen] == [2, 1, 2]
    (_, first), (_, second), (_, third) = seen
    assert first == third != second


def test_lone_batches_of_every_model_share_one_wide_thread(catalog, models_dir):
    """Two 2 x 1 models in one process: their lone batches run two threads wide on one and the same
    thread; a lone batch that finds that thread busy with the other model runs on its own
    instance's thread, one thread wide."""
    entries = [_layout(catalog.get(model_id), 2, 1) for model_id in (MODEL_ID, SENTIMENT)]
    repository = ModelRepository(Catalog(entries), models_dir)
    seen: dict[str, list[tuple[int, int]]] = {entry.inference.name: [] for entry in entries}
    release = threading.Event()

    async def scenario() -> None:
        slots = [await repository.load(entry.inference.name) for entry in entries]
        loop, holding = asyncio.get_running_loop(), asyncio.Event()
        for slot in slots:
            runtime, execute = slot.batcher.runtime, slot.batcher.runtime.execute

            def observed(stacked, name=slot.entry.inference.name, execute=execute):
                seen[name].append((torch.get_num_threads(), threading.get_ident()))
                if not release.is_set() and name == entries[0].inference.name and len(seen[name]) == 2:
                    loop.call_soon_threadsafe(holding.set)
                    assert release.wait(30), "the other model's batch never ran"
                return execute(stacked)

            runtime.execute = observed
        ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
        embed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        try:
            await asyncio.wait_for(slots[0].batcher.submit(embed, 1), 60)  # lone: the wide thread
            await asyncio.wait_for(slots[1].batcher.submit(embed, 1), 60)  # the other model's: the same
            held = slots[0].batcher.submit(embed, 1)  # holds the wide thread ...
            await asyncio.wait_for(holding.wait(), 60)
            await asyncio.wait_for(slots[1].batcher.submit(embed, 1), 60)  # ... so this one runs on its own
            release.set()
            await asyncio.wait_for(held, 60)
            await asyncio.wait_for(slots[1].batcher.submit(embed, 1), 60)  # lone again: the wide thread
        finally:
            release.set()
            for entry in entries:
                await repository.unload(entry.inference.name)

    _run(scenario)
    minilm, sentiment = seen.values()
    wide = minilm[0][1]
    assert minilm == [(2, wide), (2, wide)]
    assert sentiment[0] == (2, wide) and sentiment[2] == (2, wide)
    assert sentiment[1][0] == 1 and sentiment[1][1] != wide


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts the process's threads in /proc")
def test_a_load_leaves_no_thread_behind(catalog, models_dir, monkeypatch):
    """A 2-thread model's load (its warm-up runs 2 threads wide) runs on a thread that ends with it,
    and libgomp's worker for that thread's team goes too: a team that outlived the load would make
    the model's own workers' team one too many for the cores, and libgomp then stops spinning in
    every team (each op waits for sleeping workers)."""
    entry = _layout(catalog.get(MODEL_ID), 1, 2)
    repository = ModelRepository(Catalog([entry]), models_dir)
    loaders: list[threading.Thread] = []
    load = ModelRepository._load_runtime

    def noted(self, entry):
        loaders.append(threading.current_thread())
        return load(self, entry)

    monkeypatch.setattr(ModelRepository, "_load_runtime", noted)
    before = _native_threads()

    async def scenario() -> int:
        await repository.load(entry.inference.name)
        try:
            loaders[0].join(timeout=10)
            assert not loaders[0].is_alive()
            for _ in range(300):  # libgomp's workers leave once their master has: bounded wait
                if _native_threads() <= before:
                    break
                await asyncio.sleep(0.01)
            return _native_threads()
        finally:
            await repository.unload(entry.inference.name)

    assert _run(scenario) <= before

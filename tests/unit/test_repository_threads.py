"""torch keeps its intra-op thread count per thread (each thread's OpenMP state), so every model's
worker threads run with their own catalog entry's `threads`, whatever the other models loaded in
the same inference process asked for and whatever the load order."""

from __future__ import annotations

import asyncio
import re

import pytest

from services.common.catalog import Catalog
from services.inference.repository import ModelRepository
from tests.helpers import MODEL_ID

torch = pytest.importorskip("torch")

DIGITS = "meshserve/digits-cnn"


def _seen_by_the_worker(slot) -> tuple[int, int]:
    """(torch's count, OpenMP's max team size) in the model's forward-pass worker thread."""

    def probe() -> tuple[int, int]:
        info = torch.__config__.parallel_info()
        return torch.get_num_threads(), int(re.search(r"omp_get_max_threads\(\) : (\d+)", info).group(1))

    return slot.batcher._executor.submit(probe).result(timeout=30)


@pytest.mark.parametrize("order", [(MODEL_ID, DIGITS), (DIGITS, MODEL_ID)])
def test_each_model_runs_with_its_own_threads_whatever_the_load_order(catalog, models_dir, order):
    entries = [catalog.get(model_id) for model_id in order]
    assert {e.inference.threads for e in entries} == {1, 2}  # the catalog's all-MiniLM 2, digits 1
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

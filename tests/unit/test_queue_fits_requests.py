"""The largest request a model accepts fits its idle inference queue: the gateway sends its chunks
all at once, and a request that could never be queued must not be refused as a retryable 503
(OVERLOADED). A catalog that breaks this is refused when it is loaded."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import yaml

from services.common.catalog import Catalog
from services.common.settings import REPO_ROOT
from services.inference.batcher import DynamicBatcher
from services.inference.stats import ModelStats
from tests.unit.test_batcher import SumRuntime, spec

CATALOG = Catalog.load(REPO_ROOT / "catalog.yaml")
BATCHED = [m for m in CATALOG.models if m.inference.runtime != "causal_lm"]


@pytest.mark.parametrize("entry", BATCHED, ids=lambda m: m.id)
async def test_a_request_of_max_items_rows_is_queued_whole_on_an_idle_model(entry):
    limits = entry.inference
    batcher = DynamicBatcher(
        "sum",
        SumRuntime(),
        spec(max_batch_size=limits.max_batch_size, max_queue_size=limits.max_queue_size),
        ModelStats(),
    )
    rows, chunk = entry.preprocess.max_items, limits.max_batch_size
    # What the gateway does: one ModelInfer per chunk of max_batch_size rows, all sent together
    # (submitted here before the scheduler runs once: the queue holds every chunk at the same time).
    futures = [
        batcher.submit({"x": np.full((min(chunk, rows - start), 1), start, dtype=np.int64)}, min(chunk, rows - start))
        for start in range(0, rows, chunk)
    ]
    results = await asyncio.gather(*futures)
    assert sum(len(out["sum"]) for out, _ in results) == rows
    await batcher.close()


def test_a_catalog_whose_largest_request_exceeds_the_queue_is_refused_at_load(tmp_path):
    data = yaml.safe_load((REPO_ROOT / "catalog.yaml").read_text())
    entry = next(m for m in data["models"] if m["id"] == BATCHED[0].id)
    entry["preprocess"]["max_items"] = 4096
    entry["inference"]["max_queue_size"] = 1024
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"max_items \(4096\) exceeds inference.max_queue_size \(1024\)"):
        Catalog.load(path)

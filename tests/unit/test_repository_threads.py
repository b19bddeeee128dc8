"""torch's intra-op thread count is process-wide: the inference service's repository keeps it at
the most that any torch model loaded in the process asked for, whatever the load order."""

from __future__ import annotations

import asyncio

import pytest

from services.common.catalog import Catalog
from services.inference.repository import ModelRepository
from tests.helpers import MODEL_ID

torch = pytest.importorskip("torch")

DIGITS = "meshserve/digits-cnn"


@pytest.mark.parametrize("order", [(MODEL_ID, DIGITS), (DIGITS, MODEL_ID)])
def test_a_one_thread_model_loaded_last_leaves_torch_at_the_most_asked(catalog, models_dir, order):
    entries = [catalog.get(model_id) for model_id in order]
    wanted = max(e.inference.threads for e in entries)
    assert {e.inference.threads for e in entries} == {1, 2}  # the catalog's all-MiniLM 2, digits 1
    before = torch.get_num_threads()
    repository = ModelRepository(Catalog(entries), models_dir)

    async def load_in_order():
        for entry in entries:
            await repository.load(entry.inference.name)

    try:
        asyncio.run(load_in_order())
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)

"""The model catalog as callers see it: a model by id, the task a request runs, whether a model
and the mesh are ready."""

from __future__ import annotations

from services.common.catalog import Catalog, ModelEntry
from services.gateway.pipeline.runner import Pipeline, Readiness


class ModelDirectory:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.catalog: Catalog = pipeline.catalog

    def get(self, model_id: str) -> ModelEntry:
        return self.catalog.get(model_id)

    def resolve(self, model_id: str, task: str | None) -> tuple[ModelEntry, str]:
        """The model and the task to run: `task`, else the model's default (NOT_FOUND,
        UNSUPPORTED_TASK otherwise)."""
        return self.pipeline.resolve(model_id, task)

    async def ready(self, entry: ModelEntry) -> bool:
        return await self.pipeline.model_ready(entry)

    async def readiness(self) -> Readiness:
        return await self.pipeline.readiness()

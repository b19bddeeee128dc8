"""One face over tritonclient's two asyncio clients, so that the conformance suite runs unchanged
over KServe v2 gRPC (`tritonclient.grpc.aio`) and HTTP/REST (`tritonclient.http.aio`).

The clients are used as they are; only their answers are put in one shape: gRPC's `as_json=True`
writes 64-bit integers as strings and wraps the model config in `{"config": ...}` and the index in
`{"models": [...]}`, where the HTTP client returns Triton's JSON as the server wrote it."""

from __future__ import annotations

import tritonclient.grpc as grpc_module
import tritonclient.grpc.aio as grpc_aio
import tritonclient.http as http_module
import tritonclient.http.aio as http_aio

from tests.helpers import START_TIMEOUT_S

PROTOCOLS = ["grpc", "http"]


class KServeClient:
    def __init__(self, protocol: str, server: dict) -> None:
        self.protocol = protocol
        if protocol == "grpc":
            self.module, self.raw = grpc_module, grpc_aio.InferenceServerClient(server["url"])
        else:
            # conn_timeout bounds every call, 60 s by default: on a loaded 2-core machine a Triton model
            # load has taken longer, and Triton (2.51) crashed when the client hung up on a load in flight.
            self.module, self.raw = (
                http_module,
                http_aio.InferenceServerClient(server["http_url"], conn_timeout=START_TIMEOUT_S),
            )

    def __getattr__(self, name):  # calls whose arguments and answers are the same in both clients
        return getattr(self.raw, name)

    def _as_json(self) -> dict:
        return {"as_json": True} if self.protocol == "grpc" else {}

    def input(self, name: str, shape: list[int], datatype: str):
        return self.module.InferInput(name, shape, datatype)

    def output(self, name: str):
        return self.module.InferRequestedOutput(name)

    async def server_metadata(self) -> dict:
        return await self.raw.get_server_metadata(**self._as_json())

    async def model_metadata(self, name: str) -> dict:
        meta = await self.raw.get_model_metadata(name, **self._as_json())
        for tensor in (*meta["inputs"], *meta["outputs"]):
            tensor["shape"] = [int(d) for d in tensor["shape"]]
        return meta

    async def model_config(self, name: str) -> dict:
        config = await self.raw.get_model_config(name, **self._as_json())
        return config["config"] if self.protocol == "grpc" else config

    async def model_stats(self, name: str) -> dict:
        stats = (await self.raw.get_inference_statistics(name, **self._as_json()))["model_stats"][0]
        return {key: int(value) if key.endswith("_count") else value for key, value in stats.items()}

    async def index(self) -> list[dict]:
        index = await self.raw.get_model_repository_index(**self._as_json())
        return index.get("models", []) if self.protocol == "grpc" else index

    async def shared_memory_regions(self) -> list[dict]:
        status = await self.raw.get_system_shared_memory_status(**self._as_json())
        return list(status.get("regions", {}).values()) if self.protocol == "grpc" else status

"""The HF `use_cache` response cache: repeated identical requests are answered without running the
pipeline, as on the HF Inference API.

Keyed on the model, task, inputs and parameters (their deterministic protobuf bytes, hashed, so a
large image costs 16 bytes of key), plus the response variant (a client's dialect). Bounded in
entries and age (cachetools' TTL + LRU); per gateway process. Only deterministic tasks use it.
"""

from __future__ import annotations

import hashlib

from cachetools import TTLCache
from meshserve.tasks.v1 import tasks_pb2
from prometheus_client import Counter

LOOKUPS = Counter("meshserve_gateway_cache_lookups_total", "Response cache lookups by result.", ["model", "result"])


def cache_key(
    model_id: str, task: str, inputs: tasks_pb2.TaskInputs, parameters: tasks_pb2.TaskParameters, variant: str = ""
) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    for part in (model_id.encode(), task.encode(), variant.encode()):
        digest.update(len(part).to_bytes(4, "little") + part)
    digest.update(inputs.SerializeToString(deterministic=True))
    digest.update(b"\0params\0" + parameters.SerializeToString(deterministic=True))
    return digest.digest()


class ResponseCache:
    def __init__(self, *, max_entries: int, ttl_s: float) -> None:
        self._entries: TTLCache | None = TTLCache(max_entries, ttl_s) if max_entries > 0 else None

    def get(self, model_id: str, key: bytes):
        if self._entries is None:
            return None
        value = self._entries.get(key)
        LOOKUPS.labels(model_id, "hit" if value is not None else "miss").inc()
        return value

    def put(self, key: bytes, value) -> None:
        if self._entries is not None:
            self._entries[key] = value

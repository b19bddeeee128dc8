"""Request, slot and hold ids: unique across replicas and processes, cheap to make.

A random prefix per process and a counter after it: a uuid4 per request showed in profiles of the
gateway's cached path (bench/README.md).
"""

from __future__ import annotations

import itertools
import uuid

_PROCESS = uuid.uuid4().hex[:16]
_SERIAL = itertools.count()


def new_id() -> str:
    """A new id, unique across processes (32 hex digits at most for the first 2**64 ids)."""
    return f"{_PROCESS}{next(_SERIAL):x}"

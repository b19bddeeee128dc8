"""Both control stores answer the ControlStore protocol with the same calls: callers never need to
know which one they hold (issue 15: no branching on the store's kind outside its constructor)."""

from __future__ import annotations

import inspect

import pytest

from services.gateway.control.local_store import LocalControlStore
from services.gateway.control.redis_store import RedisControlStore
from services.gateway.control.store import ControlStore

PROTOCOL_METHODS = sorted(
    name for name, member in vars(ControlStore).items() if not name.startswith("_") and inspect.isfunction(member)
)


def test_the_protocol_has_the_admission_the_completion_and_their_fast_paths():
    assert PROTOCOL_METHODS == ["admit", "close", "finish", "spent", "try_admit_now", "try_finish_now"]


@pytest.mark.parametrize("store_class", [LocalControlStore, RedisControlStore])
@pytest.mark.parametrize("name", PROTOCOL_METHODS)
def test_each_store_implements_every_method_with_the_protocols_signature(store_class, name):
    wanted, found = getattr(ControlStore, name), getattr(store_class, name)
    assert list(inspect.signature(found).parameters) == list(inspect.signature(wanted).parameters)
    assert inspect.iscoroutinefunction(found) == inspect.iscoroutinefunction(wanted)

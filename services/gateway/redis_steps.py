"""Lua steps of the rate limiter and the budget book, sent to a shared Redis in one round trip.

With Redis every step of the control plane is one Lua script (atomic on its own). Admission takes
two (the limiter's and the budget's), completion two more; each round trip costs the gateway ~70 µs
on a loaded machine, most of it redis-py and the socket, not Redis. Metering sends the two steps of
a phase together in one pipeline (EVALSHA, no MULTI: each script is atomic by itself, and neither
depends on the other's result), then undoes whichever step went through when the other refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


class Step(NamedTuple):
    """One script call: registered on the shared client, with its keys and arguments."""

    script: AsyncScript
    keys: list[str]
    args: list[Any]


async def run(client: aioredis.Redis, steps: Sequence[Step]) -> list[Any]:
    """Every step's reply, in order, or the exception Redis answered it with. One round trip; a
    script Redis does not hold yet (first use, a restarted Redis: NOSCRIPT, so it did not run) is
    run again alone, which loads it. A connection failure raises (redis.RedisError)."""
    pipe = client.pipeline(transaction=False)
    for step in steps:
        pipe.evalsha(step.script.sha, len(step.keys), *step.keys, *step.args)
    replies = await pipe.execute(raise_on_error=False)
    for index, (step, reply) in enumerate(zip(steps, replies, strict=True)):
        if isinstance(reply, NoScriptError):
            try:
                replies[index] = await step.script(step.keys, step.args)
            except aioredis.ResponseError as exc:
                replies[index] = exc
    return replies

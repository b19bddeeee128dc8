"""Round trips to a shared Redis: the control store's Lua steps, several in one pipeline.

`run()` sends steps in one round trip (EVALSHA, no MULTI: each script is atomic by itself) and
reloads a script Redis lost; a `Batcher` sends the steps of concurrent callers together: while one
round trip is out, the steps that arrive wait and go in the next one (a caller alone goes at
once). Why: a round trip's CPU in redis-py dwarfs a script's (bench/README.md, "Control plane:
profiling notes").
"""

from __future__ import annotations

import asyncio
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


class Batcher:
    """`run()` for concurrent callers: one round trip out at a time, the steps that come meanwhile
    go together in the next one (up to `max_steps` scripts a round trip). Each caller gets its own
    steps' replies, or the error of the round trip that carried them."""

    def __init__(self, client: aioredis.Redis, *, max_steps: int = 128) -> None:
        self._client = client
        self._max_steps = max_steps
        self._waiting: list[tuple[Sequence[Step], asyncio.Future]] = []
        self._busy = False  # a round trip is out (or the task sending the waiting ones runs)
        self._drainer: asyncio.Task | None = None

    async def run(self, steps: Sequence[Step]) -> list[Any]:
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((steps, future))
            return await future
        self._busy = True
        try:
            return await run(self._client, steps)
        finally:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._waiting:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        batch: list[tuple[Sequence[Step], asyncio.Future]] = []
        try:
            while self._waiting:
                batch = self._next_batch()
                if batch:
                    await self._send(batch)
        finally:  # (cancelled: the callers still waiting get an error, not a hang)
            self._busy = False
            left, self._waiting = batch + self._waiting, []
            for _, future in left:
                if not future.done():
                    future.set_exception(aioredis.ConnectionError("the Redis step batcher stopped"))

    def _next_batch(self) -> list[tuple[Sequence[Step], asyncio.Future]]:
        batch, count = [], 0
        while self._waiting and (not batch or count + len(self._waiting[0][0]) <= self._max_steps):
            steps, future = self._waiting.pop(0)
            if not future.cancelled():  # its caller left before they were sent: they are not
                batch.append((steps, future))
                count += len(steps)
        return batch

    async def _send(self, batch: list[tuple[Sequence[Step], asyncio.Future]]) -> None:
        try:
            replies = await run(self._client, [step for steps, _ in batch for step in steps])
        except Exception as exc:  # every caller of this round trip gets its error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for steps, future in batch:
            if not future.done():
                future.set_result(replies[start : start + len(steps)])
            start += len(steps)

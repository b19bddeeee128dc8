"""The pipe between the gateway and its usage ledger writer process (`writer.py`): the framing of
the messages both ends exchange, and `WriterProcess`, the gateway's end, which starts the writer,
sends it batches and waits for their acknowledgements.

Protocol, both directions framed as a 4-byte big-endian length and a pickle (both ends are this
package, over a private pipe):

    gateway -> writer   first {"url": <database URL>, "nice": <int>}; then (seq, rows), rows as
                        tuples in UsageRecord field order
    writer -> gateway   (seq, done, written, rejected, error): rows done from the front of the batch
                        (written, or refused by the database as invalid: no retry can write those),
                        rows written, [(request_id, reason)] of the refused ones, and None or
                        "Type: message" when the rows after `done` were not written. The writer's
                        first message, (0, 0, 0, [], None), says it is up.

The protocol has the writer's own stdout (fd 1 is pointed at stderr in the writer, so nothing that
prints can corrupt it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import struct
import sys
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

WRITER_MODULE = "services.gateway.ledger.writer"  # run with `python -m`
STARTUP_TIMEOUT_S = 60.0  # from start to the writer's "up" (it imports SQLAlchemy and the driver)
UP = (0, 0, 0, [], None)  # the writer's first acknowledgement
_LENGTH = struct.Struct(">I")

Acknowledgement = tuple[int, int, list[tuple[str, str]], str | None]  # done, written, rejected, error


class LedgerWriteError(Exception):
    """A batch was not committed (the database refused it, or the writer process is gone); its
    rows stay queued in the gateway."""


def frame(message: Any) -> bytes:
    """One message as it goes down the pipe."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


def read_frame(stream: BinaryIO) -> Any | None:
    """The next message of a blocking stream (the writer's stdin); None at its end."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # EOF: the gateway closed the ledger or died
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


class WriterProcess:
    """The gateway's handle on its writer process: started by start() or the first write, started
    again after it died. One write at a time (the ledger serializes them)."""

    def __init__(self, url: str, *, nice: int = 10) -> None:
        """`nice`: how far below the gateway's CPU priority the writer runs (0-19)."""
        self._url = url
        self._nice = nice
        self._process: asyncio.subprocess.Process | None = None
        self._seq = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        await self._started()

    async def _started(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        if self._process is not None:
            log.warning("usage ledger writer process exited with %s; starting a new one", self._process.returncode)
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            WRITER_MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # stderr: the gateway's, so the writer's log lines land with the gateway's
        )
        self._process.stdin.write(frame({"url": self._url, "nice": self._nice}))  # on argv it would show in `ps`
        try:  # its first acknowledgement (seq 0): it is up, with its signal handlers and its engine
            await self._acknowledged(self._process, 0, STARTUP_TIMEOUT_S)
        except BaseException:
            self._discard()
            raise
        return self._process

    async def _acknowledged(self, process: asyncio.subprocess.Process, seq: int, timeout_s: float | None) -> tuple:
        """Read acknowledgements up to the one of `seq`. (An abandoned write kills the writer, so
        an older acknowledgement cannot come first; the check is a guard.)"""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    (size,) = _LENGTH.unpack(await process.stdout.readexactly(_LENGTH.size))
                    ack = pickle.loads(await process.stdout.readexactly(size))
                    if ack[0] == seq:
                        return ack
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            await process.wait()
            raise LedgerWriteError(f"the writer process is gone (exit code {process.returncode})") from exc

    async def write(self, rows: list[tuple], timeout_s: float | None = None) -> Acknowledgement:
        """Send one batch and wait for its acknowledgement: (rows done, rows written, rejected rows,
        error), as the protocol says. Raises LedgerWriteError when the writer is gone (nothing
        acknowledged), TimeoutError after `timeout_s` (the writer is killed; the batch may have
        committed)."""
        process = await self._started()
        self._seq += 1
        seq = self._seq
        try:
            process.stdin.write(frame((seq, rows)))
            await process.stdin.drain()
            _, done, written, rejected, error = await self._acknowledged(process, seq, timeout_s)
        except ConnectionError as exc:  # its stdin: it died
            self._discard()
            raise LedgerWriteError(f"the writer process is gone (exit code {process.returncode})") from exc
        except BaseException:
            # A stream read halfway (cancelled, timed out) or a dead process cannot be used again:
            # the next write starts a new writer.
            self._discard()
            raise
        return done, written, rejected, error

    def _discard(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Close the writer's stdin and wait for it to exit (killed after `timeout_s`)."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.stdin.close()
        try:
            async with asyncio.timeout(timeout_s):
                await process.wait()
        except TimeoutError:
            log.error("usage ledger writer process did not exit in %.0f s; killed", timeout_s)
            process.kill()
            await process.wait()

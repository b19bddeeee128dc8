"""The usage ledger's writer process: it receives batches of usage rows on its stdin, inserts each
batch in one transaction, and acknowledges the batch on its stdout once it is committed.

Why a process and not a thread: the rows of a busy gateway (5,000 a second answered from its
cache) cost Python work to insert: building the statement's parameters, the driver binding them,
SQLAlchemy's connection and transaction handling. In a thread of the gateway that work holds the
GIL the event loop needs, and the two hand it back and forth; profiles of the gateway under cached
load had the writer thread in 12 % of samples. Here the gateway only pickles plain tuples (~0.1 µs
a row) and writes them to a pipe.

What stays true: a row leaves the gateway's queue only when this process has acknowledged its
commit, so a failed write, a crash of this process, or a gateway stopped by SIGTERM lose nothing
(the gateway keeps the rows, starts a new writer and retries). A writer that dies after a commit
but before its acknowledgement can make the retry write that batch twice, as a thread could.

Protocol, both directions framed as a 4-byte big-endian length and a pickle (both ends are this
module, over a private pipe):

    gateway -> writer   first {"url": <database URL>}; then (seq, rows), rows as tuples in
                        UsageRecord field order
    writer -> gateway   (seq, done, written, rejected, error): rows done from the front of the batch
                        (written, or refused by the database as invalid: no retry can write those),
                        rows written, [(request_id, reason)] of the refused ones, and None or
                        "Type: message" when the rows after `done` were not written. The writer's
                        first message, (0, 0, 0, [], None), says it is up.

The protocol has the writer's own stdout (fd 1 is pointed at stderr in the writer, so nothing that
prints can corrupt it).

The writer exits when its stdin closes: when the gateway closes the ledger, or when the gateway
dies. It ignores SIGINT and SIGTERM, which reach it with the gateway's process group: stopping is
the gateway's decision, taken after it has sent everything (the SIGTERM drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import signal
import struct
import sys
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
STARTUP_TIMEOUT_S = 60.0  # from start to the writer's "up" (it imports SQLAlchemy and the driver)


class LedgerWriteError(Exception):
    """A batch was not committed (the database refused it, or the writer process is gone); its
    rows stay queued in the gateway."""


def _frame(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(payload)) + payload


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
            "services.gateway.ledger.writer",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            # stderr: the gateway's, so the writer's log lines land with the gateway's
        )
        self._process.stdin.write(_frame({"url": self._url, "nice": self._nice}))  # on argv it would show in `ps`
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

    async def write(
        self, rows: list[tuple], timeout_s: float | None = None
    ) -> tuple[int, int, list[tuple[str, str]], str | None]:
        """Send one batch and wait for its acknowledgement: (rows done, rows written, rejected rows,
        error), as the protocol says. Raises LedgerWriteError when the writer is gone (nothing
        acknowledged), TimeoutError after `timeout_s` (the writer is killed; the batch may have
        committed)."""
        process = await self._started()
        self._seq += 1
        seq = self._seq
        try:
            process.stdin.write(_frame((seq, rows)))
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


# --- the writer process ----------------------------------------------------------------------------


def _read(stream: BinaryIO) -> Any | None:
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None  # EOF: the gateway closed the ledger or died
    (size,) = _LENGTH.unpack(head)
    payload = stream.read(size)
    if len(payload) < size:
        return None
    return pickle.loads(payload)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    protocol_out = os.fdopen(os.dup(1), "wb")  # the protocol keeps stdout; fd 1 now goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from services.common.logs import setup_logging
    from services.gateway.db import make_engine
    from services.gateway.ledger.usage import insert_rows

    setup_logging("gateway", os.environ.get("MESHSERVE_LOG_LEVEL", "INFO"))
    stdin, stdout = sys.stdin.buffer, protocol_out
    config = _read(stdin)
    if config is None:
        return 0
    # Below the gateway: woken by its pipe, the writer would otherwise often run on (and preempt)
    # the gateway's core. It needs ~5 µs of CPU a row, ~3 % of a core at 6k requests/s.
    os.nice(config["nice"])
    engine = make_engine(config["url"])
    stdout.write(_frame((0, 0, 0, [], None)))  # up
    stdout.flush()
    try:
        while (message := _read(stdin)) is not None:
            seq, rows = message
            try:
                ack = (seq, *insert_rows(engine, rows))
            except Exception as exc:  # nothing written: the gateway keeps the rows, retries, logs it
                ack = (seq, 0, 0, [], f"{type(exc).__name__}: {exc}")
            stdout.write(_frame(ack))
            stdout.flush()
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

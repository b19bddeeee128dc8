"""SIGTERM to the gateway in the middle of a burst: after it drained, exited and was restarted by
`meshserve up` on the same ledger database, every request it acknowledged (a 200 with its body)
has exactly one usage row, and no request has two. Every request of the burst sends the same
X-Request-Id, as a careless (or forging) client does: the ledger keys rows by the gateway's own id,
returned in the response's X-Request-Id, and keeps the client's beside it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import time

import httpx
import psutil
import pytest

from tests.helpers import MODEL_ID, serving_only, start_mesh

pytestmark = pytest.mark.xdist_group("faults")

TOTAL, CONCURRENCY, SIGNAL_AFTER = 200, 16, 40  # the burst, and how many 200s come before the signal
ROUTES = (f"/models/{MODEL_ID}", "/v1/embeddings")
CLIENT_ID = "one-id-for-the-whole-burst"
HEADERS = {"x-use-cache": "false", "x-request-id": CLIENT_ID}


@pytest.fixture
def ledger_mesh(models_dir, tmp_path):
    """A mesh whose gateway writes its usage ledger to a SQLite file of this test."""
    db = tmp_path / "ledger.db"
    env = {"MESHSERVE_GATEWAY_LEDGER": "true", "MESHSERVE_GATEWAY_DATABASE_URL": f"sqlite:///{db}"}
    env |= serving_only(tmp_path, MODEL_ID)  # the ledger is the subject
    running = start_mesh(tmp_path, env)
    yield running, db
    running.stop()


def request_for(i: int) -> tuple[str, dict]:
    """The i-th request of the burst: two routes in turn, every input distinct (nothing cached)."""
    route = ROUTES[i % len(ROUTES)]
    text = f"sentence {i} of the burst"
    return route, {"inputs": text} if route.startswith("/models/") else {"model": MODEL_ID, "input": text}


async def burst(url: str, on_ok) -> list[dict]:
    """TOTAL requests, CONCURRENCY at a time; each outcome with the response's X-Request-Id.
    `on_ok(n)` is called when the n-th 200 has been received in full."""
    results: list[dict] = []
    pending = list(range(TOTAL))
    acknowledged = 0
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal acknowledged
            while pending:
                i = pending.pop(0)
                route, body = request_for(i)
                entry: dict = {"i": i}
                try:
                    reply = await client.post(route, json=body, headers=HEADERS)
                    entry.update(status=reply.status_code, request_id=reply.headers.get("x-request-id"))
                    reply.json()  # the whole body arrived
                except (httpx.HTTPError, ValueError) as exc:
                    entry.update(status=None, error=type(exc).__name__)
                results.append(entry)
                if entry["status"] == 200:
                    acknowledged += 1
                    on_ok(acknowledged)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 180)
    return results


def ledger_rows(db) -> dict[str, list[str | None]]:
    """The usage table read-only: the client's request ids of the rows, per (gateway) request id."""
    rows: dict[str, list[str | None]] = {}
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        for request_id, client_request_id in conn.execute("SELECT request_id, client_request_id FROM usage"):
            rows.setdefault(request_id, []).append(client_request_id)
    return rows


def rows_once_written(db, request_ids: set[str], timeout_s: float = 30.0) -> dict[str, list[str | None]]:
    """The ledger once it holds a row for each of `request_ids`, or as it is after `timeout_s`. The
    old gateway wrote its rows before it exited; a live gateway's writer commits every 0.2 s."""
    deadline = time.monotonic() + timeout_s
    while not request_ids <= (rows := ledger_rows(db)).keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    return rows


def exited(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for_new_gateway(mesh, old_pid: int, timeout_s: float = 90.0) -> psutil.Process:
    """The gateway `meshserve up` started in place of `old_pid`, once it answers /readyz."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        fresh = [p for p in mesh.children("gateway") if p.pid != old_pid]
        if fresh and exited(old_pid):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(mesh.url + "/readyz", timeout=2).status_code == 200:
                    return fresh[0]
        time.sleep(0.2)
    raise TimeoutError(f"no new gateway in {timeout_s} s:\n{mesh.log()[-3000:]}")


def test_every_acknowledged_request_has_one_ledger_row_after_sigterm_and_restart(ledger_mesh):
    mesh, db = ledger_mesh
    gateway = mesh.child("gateway")
    signalled: list[int] = []

    def on_ok(acknowledged: int) -> None:
        if acknowledged == SIGNAL_AFTER and not signalled:
            signalled.append(acknowledged)
            gateway.send_signal(signal.SIGTERM)

    results = asyncio.run(burst(mesh.url, on_ok))
    assert signalled, "the burst ended before the signal was sent"
    restarted = wait_for_new_gateway(mesh, gateway.pid)
    # The old gateway drained and exited by itself (code 0), and the supervisor started another.
    assert re.search(r"gateway exited with code 0; restarting", mesh.log()), mesh.log()[-3000:]

    acknowledged = [r for r in results if r["status"] == 200]
    assert len(acknowledged) >= SIGNAL_AFTER
    # Refused at connect while the gateway was down, never half-done: no other status.
    assert {r["status"] for r in results} <= {200, None}, [r for r in results if r["status"] not in (200, None)][:3]
    assert all(r["request_id"] for r in acknowledged)
    assert len({r["request_id"] for r in acknowledged}) == len(acknowledged)  # the ids are the server's, unique

    rows = rows_once_written(db, {r["request_id"] for r in acknowledged})
    assert [rid for rid, found in rows.items() if len(found) > 1] == []  # no request written twice
    missing = [r for r in acknowledged if r["request_id"] not in rows]
    assert missing == [], f"{len(missing)} of {len(acknowledged)} acknowledged requests have no usage row"
    assert {rows[r["request_id"]][0] for r in acknowledged} == {CLIENT_ID}  # the client's id, kept beside

    # The restarted gateway writes to the same ledger: a request it answers gets its row there too.
    route, body = request_for(TOTAL)
    reply = httpx.post(mesh.url + route, json=body, headers=HEADERS, timeout=60)
    assert reply.status_code == 200, reply.text
    rows_once_written(db, {reply.headers["x-request-id"]})
    assert ledger_rows(db).get(reply.headers["x-request-id"]) == [CLIENT_ID]
    assert restarted.is_running()

"""UsageLedger against real databases: a SQLite file in tmp_path, and a real Postgres server started
here when its binaries are installed (the same tests, parametrized over both)."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from services import cli
from services.gateway import db
from services.gateway import ledger as ledger_package
from services.gateway.ledger import UsageLedger, UsageRecord, usage
from tests.helpers import pg_binary

DAY1 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DAY2 = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SENTIMENT = "meshserve/sentiment-minilm"


def rec(i: int = 0, *, key_id: str | None = "key-a", model: str = MINILM, time: datetime = DAY1, **kw) -> UsageRecord:
    fields = dict(
        request_id=f"req-{i}",
        key_id=key_id,
        model=model,
        task="feature-extraction",
        provider="local",
        input_tokens=10,
        output_tokens=0,
        items=2,
        compute_s=0.5,
        cost_usd=0.25,
        status=200,
        latency_s=0.01,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        time=time,
        route="/v1/embeddings",
    )
    return UsageRecord(**{**fields, **kw})


async def eventually(predicate, what: str, within_s: float = 60.0) -> None:
    """Wait for a condition that the background writer makes true (a liveness bound, not a timing
    assertion: generous, and only hit when the behaviour is broken)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def write_failures() -> float:
    return REGISTRY.get_sample_value("meshserve_gateway_ledger_write_failures_total") or 0.0


# --- databases -----------------------------------------------------------------------------------


_pg_binary = pg_binary  # (tests/helpers.py)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres_user() -> dict:
    """Postgres refuses to run as root: drop to the `postgres` account when the tests run as root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run the Postgres server as")
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


PG_OPTIONS = ["-c", "fsync=off", "-c", "TimeZone=Asia/Tokyo"]


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway Postgres on a free loopback port; its session time zone is not UTC on purpose."""
    initdb, postgres = _pg_binary("initdb"), _pg_binary("postgres")
    if not (initdb and postgres):
        pytest.skip("no PostgreSQL server binaries (initdb, postgres): pip install pgserver (`make test` does it)")
    pytest.importorskip("psycopg", reason="the psycopg driver is not installed")
    account = _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="meshserve-pg-"))
    if account:
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", _free_port()
    subprocess.run(
        [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        check=True,
        capture_output=True,
        **account,
    )
    with open(folder / "server.log", "wb") as server_log:
        server = subprocess.Popen(
            [postgres, "-D", str(data), "-k", str(folder), "-h", "127.0.0.1", "-p", str(port), *PG_OPTIONS],
            stdout=server_log,
            stderr=subprocess.STDOUT,
            **account,
        )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_for_postgres(url, server, folder / "server.log")
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_postgres(url: str, server: subprocess.Popen, server_log: Path) -> None:
    import psycopg

    dsn = url.replace("postgresql+psycopg", "postgresql")
    for _ in range(300):
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited: {server_log.read_text()}")
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            threading.Event().wait(0.1)
    raise RuntimeError(f"postgres never accepted connections: {server_log.read_text()}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """A fresh, empty database: a SQLite file, or a new database on the test Postgres server."""
    if request.param == "sqlite":
        yield db.default_url(tmp_path)
        return
    server_url = request.getfixturevalue("postgres_server")
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield server_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def engines(database_url):
    """Opens engines on the test database (one per simulated replica); disposes them afterwards."""
    opened: list[sa.Engine] = []

    def open_engine() -> sa.Engine:
        opened.append(db.make_engine(database_url))
        return opened[-1]

    yield open_engine
    for engine in opened:
        engine.dispose()


def watch_statements(engine: sa.Engine) -> list[tuple[str, int]]:
    """Every statement the engine sends from now on, with the thread that sent it."""
    seen: list[tuple[str, int]] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _seen(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append((statement, threading.get_ident()))

    return seen


def inserts(seen: list[tuple[str, int]]) -> int:
    return sum(statement.lstrip().upper().startswith("INSERT") for statement, _ in seen)


# --- writing -------------------------------------------------------------------------------------


def write_batches() -> float:
    return REGISTRY.get_sample_value("meshserve_gateway_ledger_write_seconds_count") or 0.0


async def test_records_are_written_in_a_few_batches(engines):
    ledger = UsageLedger(engines(), flush_interval_s=3600, max_batch=1000)
    await ledger.start()
    batches_before = write_batches()
    for i in range(2500):
        ledger.record(rec(i))
    await ledger.flush()
    assert await ledger.count() == 2500
    assert write_batches() - batches_before == 3  # 1000-row batches, not 2500 writes
    await ledger.close()


async def test_record_does_no_database_io_and_the_writes_happen_in_the_writer_process(engines):
    engine = engines()
    ledger = UsageLedger(engine, flush_interval_s=3600, max_batch=100_000)
    await ledger.start()
    seen = watch_statements(engine)
    for i in range(10_000):
        ledger.record(rec(i))
    assert seen == []  # recording is an append: the request path never waits on the database
    await ledger.flush()
    assert inserts(seen) == 0  # this process sent no INSERT: the writer process wrote the rows
    assert await ledger.count() == 10_000
    await ledger.totals(by="day")
    await ledger.query(limit=1)
    assert seen and threading.get_ident() not in {thread for _, thread in seen}  # reads: off the loop
    await ledger.close()


async def test_a_killed_writer_process_loses_no_rows(engines):
    ledger = UsageLedger(engines(), flush_interval_s=3600)
    await ledger.start()
    for i in range(100):
        ledger.record(rec(i))
    await ledger.flush()
    first = ledger._writer_process.pid
    os.kill(first, signal.SIGKILL)
    for i in range(100, 300):
        ledger.record(rec(i))
    with pytest.raises(Exception, match="writer process is gone"):
        await ledger.flush()  # the rows stay queued
    await ledger.flush()  # a new writer process takes them
    assert ledger._writer_process.pid != first
    assert await ledger.count() == 300
    assert len({row["request_id"] for row in await ledger.query(limit=1000)}) == 300
    await ledger.close()


async def test_the_writer_process_ignores_the_signals_of_its_process_group(engines):
    """SIGTERM and SIGINT reach the writer with the gateway's process group (Ctrl-C, a supervisor):
    it keeps writing until the gateway has drained and closes it."""
    ledger = UsageLedger(engines(), flush_interval_s=3600)
    await ledger.start()
    pid = ledger._writer_process.pid  # start() returns once the writer said it is up
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(pid, sig)
    for i in range(50):
        ledger.record(rec(i))
    await ledger.close()
    assert ledger._writer_process.pid == pid  # the same process wrote them, then exited
    reader = UsageLedger(engines())
    assert await reader.count() == 50


async def test_the_writer_process_runs_below_the_gateways_cpu_priority(engines):
    """It is woken by the gateway's pipe and would often run on the gateway's core: below the
    request path, it takes the time the request path leaves."""
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    for nice in (10, 3):
        ledger = UsageLedger(engines(), writer_nice=nice)
        await ledger.start()
        try:
            assert os.getpriority(os.PRIO_PROCESS, ledger._writer_process.pid) == min(19, mine + nice)
        finally:
            await ledger.close()


async def test_the_background_writer_writes_without_being_asked(engines):
    ledger = UsageLedger(engines(), flush_interval_s=0.05)
    await ledger.start()
    for i in range(5):
        ledger.record(rec(i))

    async def all_written() -> bool:
        return await ledger.count() == 5

    await eventually(all_written, "the writer task wrote the queued rows")
    await ledger.close()


async def test_close_writes_everything_still_queued(engines):
    ledger = UsageLedger(engines(), flush_interval_s=3600, max_batch=1000)
    await ledger.start()
    for i in range(2500):
        ledger.record(rec(i))
    await ledger.close()
    reader = UsageLedger(engines())
    assert await reader.count() == 2500


async def test_a_row_the_database_rejects_does_not_hold_back_the_others(engines, caplog):
    ledger = UsageLedger(engines(), flush_interval_s=3600)
    await ledger.start()
    ledger.record(rec(1))
    ledger.record(rec(2, model=None))  # NOT NULL: no retry can ever write it
    ledger.record(rec(3))
    with caplog.at_level(logging.ERROR, logger="services.gateway.ledger.queue"):
        await ledger.flush()
    assert [row["request_id"] for row in await ledger.query()] == ["req-3", "req-1"]
    assert "req-2" in caplog.text
    await ledger.close()


async def test_two_replicas_on_one_database_lose_no_rows(engines):
    replicas = [UsageLedger(engines(), flush_interval_s=0.01, max_batch=50) for _ in range(2)]
    for ledger in replicas:
        await ledger.start()
    for i in range(2000):
        for n, ledger in enumerate(replicas):
            ledger.record(rec(i, request_id=f"replica{n}-{i}"))
        if i % 100 == 0:
            await asyncio.sleep(0)  # let both writers run while rows keep coming
    await asyncio.gather(*(ledger.flush() for ledger in replicas))
    await asyncio.gather(*(ledger.close() for ledger in replicas))
    reader = UsageLedger(engines())
    assert await reader.count() == 4000
    ids = {row["request_id"] for row in await reader.query(limit=10_000)}
    assert len(ids) == 4000


# --- failing writes (SQLite: a second connection holds the write lock) -------------------------


def impatient_engine(path: Path) -> sa.Engine:
    """The production engine, but giving up on a locked database after 50 ms instead of 30 s (the
    writer process opens its engine from this URL)."""
    return db.make_engine(f"sqlite:///{path}?timeout=0.05")


def lock_database(path: Path) -> sqlite3.Connection:
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    return holder


async def test_a_failed_write_is_retried_and_its_rows_arrive_once_the_database_is_free(tmp_path):
    path = tmp_path / "gateway.db"
    engine = impatient_engine(path)
    ledger = UsageLedger(engine, flush_interval_s=0.02)
    await ledger.start()
    failures_before = write_failures()
    holder = lock_database(path)
    for i in range(10):
        ledger.record(rec(i))

    async def a_write_failed() -> bool:
        return write_failures() > failures_before

    await eventually(a_write_failed, "a write hit the locked database")
    holder.execute("COMMIT")
    holder.close()

    async def all_written() -> bool:
        return await ledger.count() == 10

    await eventually(all_written, "the kept rows were written after the lock was released")
    await ledger.close()
    engine.dispose()


async def test_close_gives_up_after_its_bound_and_says_how_many_rows_it_lost(tmp_path, caplog):
    path = tmp_path / "gateway.db"
    engine = impatient_engine(path)
    ledger = UsageLedger(engine, flush_interval_s=0.02, close_timeout_s=0.2)
    await ledger.start()
    holder = lock_database(path)
    for i in range(3):
        ledger.record(rec(i))
    with caplog.at_level(logging.ERROR, logger="services.gateway.ledger.queue"):
        await ledger.close()
    holder.execute("ROLLBACK")
    holder.close()
    assert "3 rows it could not write" in caplog.text
    engine.dispose()


# --- reading -------------------------------------------------------------------------------------


async def spread_ledger(engine: sa.Engine) -> UsageLedger:
    """Six rows over two UTC days, two models and two keys (one with auth off)."""
    ledger = UsageLedger(engine, flush_interval_s=3600)
    await ledger.start()
    tokyo = timezone(timedelta(hours=9))
    for i, (key, model, time) in enumerate(
        [
            ("key-a", MINILM, DAY1),
            ("key-a", SENTIMENT, DAY1 + timedelta(hours=1)),
            ("key-b", MINILM, datetime(2026, 3, 2, 8, 59, tzinfo=tokyo)),  # 23:59 UTC on day 1
            ("key-a", MINILM, DAY2),
            ("key-b", SENTIMENT, DAY2 + timedelta(hours=1)),
            (None, SENTIMENT, DAY2 + timedelta(hours=2)),
        ]
    ):
        ledger.record(rec(i, key_id=key, model=model, time=time, input_tokens=10 * (i + 1), cost_usd=0.5))
    await ledger.flush()
    return ledger


def sums(requests: int, input_tokens: int) -> dict:
    return {
        "requests": requests,
        "input_tokens": input_tokens,
        "output_tokens": 0,
        "items": 2 * requests,
        "compute_s": pytest.approx(0.5 * requests),
        "cost_usd": pytest.approx(0.5 * requests),
    }


async def test_totals_by_utc_day_model_and_key(engines):
    ledger = await spread_ledger(engines())
    assert await ledger.totals(by="day") == [
        {"day": "2026-03-01", **sums(3, 10 + 20 + 30)},
        {"day": "2026-03-02", **sums(3, 40 + 50 + 60)},
    ]
    assert await ledger.totals(by="model") == [
        {"model": SENTIMENT, **sums(3, 20 + 50 + 60)},
        {"model": MINILM, **sums(3, 10 + 30 + 40)},
    ]
    by_key = {row["key_id"]: row for row in await ledger.totals(by="key")}
    assert by_key == {
        "key-a": {"key_id": "key-a", **sums(3, 10 + 20 + 40)},
        "key-b": {"key_id": "key-b", **sums(2, 30 + 50)},
        None: {"key_id": None, **sums(1, 60)},
    }
    assert await ledger.totals(by="day", model=MINILM, since=DAY2) == [{"day": "2026-03-02", **sums(1, 40)}]
    await ledger.close()


async def test_query_and_count_filter_by_key_model_and_time(engines):
    ledger = await spread_ledger(engines())
    rows = await ledger.query()
    assert [row["request_id"] for row in rows] == [f"req-{i}" for i in (5, 4, 3, 2, 1, 0)]  # newest first
    assert rows[-1]["time"] == DAY1 and rows[-1]["time"].tzinfo is not None
    assert rows[3]["time"] == datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    assert {row["request_id"] for row in await ledger.query(key_id="key-b")} == {"req-2", "req-4"}
    assert {row["request_id"] for row in await ledger.query(model=SENTIMENT, key_id="key-a")} == {"req-1"}
    day2 = await ledger.query(since=DAY2.replace(hour=0), until=DAY2 + timedelta(hours=2))  # until excluded
    assert [row["request_id"] for row in day2] == ["req-4", "req-3"]
    assert [row["request_id"] for row in await ledger.query(limit=2, offset=1)] == ["req-4", "req-3"]
    assert await ledger.count() == 6
    assert await ledger.count(key_id="key-a", since=DAY1 + timedelta(minutes=1)) == 2
    assert await ledger.count(model="nope") == 0
    assert await ledger.totals(by="model", model="nope") == []
    await ledger.close()


# --- the `meshserve usage` command ---------------------------------------------------------------


def test_usage_command_prints_totals_as_a_table_or_json(tmp_path, monkeypatch, capsys):
    url = db.default_url(tmp_path)
    engine = db.make_engine(url)

    async def fill() -> None:
        await (await spread_ledger(engine)).close()

    asyncio.run(fill())
    engine.dispose()
    monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", url)

    assert cli.main(["usage"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["day", "requests", "input_tokens"]
    assert [line.split()[:3] for line in table[1:]] == [["2026-03-01", "3", "60"], ["2026-03-02", "3", "150"]]

    assert cli.main(["usage", "--by", "key", "--model", MINILM, "--until", "2026-03-01", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["key_id"], row["requests"], row["input_tokens"]) for row in rows] == [
        ("key-a", 1, 10),
        ("key-b", 1, 30),
    ]


def test_usage_command_on_a_database_with_no_ledger_yet(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", db.default_url(tmp_path))
    assert cli.main(["usage", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_usage_table_is_registered_on_the_shared_metadata():
    assert db.metadata.tables["usage"] is usage
    assert {index.name for index in usage.indexes} == {"ix_usage_key_id_time", "ix_usage_time", "ux_usage_request_id"}


async def test_usage_route_answers_503_when_the_database_is_unavailable(tmp_path):
    """GET /v1/usage flushes and reads the ledger; a locked or unreachable database is the
    server's trouble, not the caller's: a retryable 503 in the API's error shape, never a 500."""
    import httpx

    from services.gateway.api.http_app import create_app
    from services.gateway.control.plane import ControlPlane
    from services.gateway.main import build_pipeline
    from services.gateway.service import GatewayServices
    from services.gateway.settings import GatewaySettings

    path = tmp_path / "gateway.db"
    settings = GatewaySettings(home=str(tmp_path), database_url=f"sqlite:///{path}?timeout=0.05", auth=False)
    control = ControlPlane.from_settings(settings)
    await control.start(settings)
    pipeline = build_pipeline(settings)  # channels connect lazily: nothing is dialled
    app = create_app(settings, GatewayServices.build(settings, pipeline, control=control))
    control.ledger.record(rec(1))
    holder = lock_database(path)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            reply = await client.get("/v1/usage")
        assert reply.status_code == 503, reply.text
        assert "database is unavailable" in reply.json()["error"]["message"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        await control.close()
        await pipeline.close()


def test_a_batch_that_fails_halfway_through_its_row_by_row_retry_reports_what_it_wrote(tmp_path):
    """The writer's fallback (after an invalid row) commits row by row; when the database then
    fails, the rows already written are reported done, so the gateway's retry does not write them
    twice."""
    from services.gateway.ledger.schema import row_values
    from services.gateway.ledger.writer import insert_rows

    engine = db.make_engine(f"sqlite:///{tmp_path / 'gateway.db'}")
    ledger_package.migrate.upgrade(engine)  # the tables, as the migrations make them
    inserts_seen = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _fail_the_fourth_insert(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts_seen.append(statement)
            if len(inserts_seen) == 4:  # 1: the batch; 2, 3: rows 1 and 2 (bad); 4: row 3
                raise sa.exc.OperationalError(statement, parameters, Exception("disk I/O error"))

    rows = [row_values(rec(1)), row_values(rec(2, model=None)), row_values(rec(3)), row_values(rec(4))]
    done, written, rejected, error = insert_rows(engine, rows)
    assert (done, written) == (2, 1) and [r for r, _ in rejected] == ["req-2"]
    assert error and "disk I/O error" in error
    with engine.connect() as conn:
        assert [r[0] for r in conn.execute(sa.select(usage.c.request_id))] == ["req-1"]
    engine.dispose()


# --- the package -------------------------------------------------------------------------------


def test_the_writer_process_module_runs_without_the_package_importing_it_first():
    """`python -m services.gateway.ledger.writer` is how the gateway starts its writer: the package
    must not import that module itself (runpy would run a second copy and warn on the gateway's
    stderr). Given no configuration, the writer exits 0 at once."""
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-m", "services.gateway.ledger.writer"],
        input=b"",
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr == b""


def test_the_ledger_modules_import_one_way():
    """No import cycle inside the ledger: the writer process and the reports stand on the schema,
    the queue on all but the writer process, and nothing imports the queue back."""
    package = Path(ledger_package.__file__).parent
    imports = {}
    for module in package.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("services.gateway.ledger."):
                found.add(node.module.rsplit(".", 1)[1])
        imports[module.stem] = found
    assert imports == {
        "__init__": {"migrate", "pipe", "queue", "reports", "schema"},
        "schema": set(),
        "migrate": set(),
        "pipe": set(),
        "reports": {"schema"},
        "writer": {"pipe", "schema"},
        "queue": {"migrate", "pipe", "reports", "schema"},
    }

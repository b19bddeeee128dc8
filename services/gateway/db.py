"""The gateway's database: API keys and the usage ledger, in SQLite (WAL) by default or Postgres by
URL, through SQLAlchemy Core. Several gateway replicas share it (Postgres, or one SQLite file on one
host). Calls are synchronous and short; request paths run them in a worker thread.

Every table (the usage ledger's, the key store's) is created and changed by Alembic migrations only
(services/gateway/ledger/migrate.py, `meshserve db upgrade`); `metadata` describes what they make."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa

log = logging.getLogger(__name__)
T = TypeVar("T")

metadata = sa.MetaData()


def default_url(home: Path) -> str:
    return f"sqlite:///{(home / 'gateway.db').resolve()}"


def make_engine(url: str) -> sa.Engine:
    """An engine for the URL; SQLite gets WAL (readers never block the writer), a busy timeout
    (several processes write the same file: 30 s, or the URL's `?timeout=<seconds>`) and NORMAL
    sync (WAL keeps it crash-safe), and a private file (private_sqlite_file)."""
    if url.startswith("sqlite"):
        parsed = sa.make_url(url)
        if parsed.database and parsed.database != ":memory:":
            private_sqlite_file(Path(parsed.database))
        timeout_s = float(parsed.query.get("timeout", 30))
        engine = sa.create_engine(url, connect_args={"timeout": timeout_s, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={int(timeout_s * 1000)}")
            cursor.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def private_sqlite_file(path: Path) -> None:
    """Make the database file (API key hashes, everyone's usage) readable by its owner only: its
    folder is created 0700, the file created or narrowed to 0600 before SQLite opens it. SQLite
    creates its -wal and -shm files with the database file's permissions; ones left from before
    are narrowed too."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):  # another owner's file: theirs to fix
            if part.stat().st_mode & 0o077:
                part.chmod(0o600)


def retry_locked(operation: Callable[[], T], attempts: int = 5) -> T:
    """Run an idempotent start-up operation, again after SQLite's "database is locked" (replicas
    starting together on one file: some of SQLite's lock conflicts fail at once instead of waiting
    for the busy timeout, e.g. a transaction that read and then writes on a stale snapshot)."""
    for attempt in range(attempts):
        try:
            return operation()
        except sa.exc.OperationalError as err:
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            log.warning("database is locked during start-up (another replica starting?); trying again")
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")

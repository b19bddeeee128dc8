"""The gateway's database: API keys and the usage ledger, in SQLite (WAL) by default or Postgres by
URL, through SQLAlchemy Core. Several gateway replicas share it (Postgres, or one SQLite file on one
host). Calls are synchronous and short; request paths run them in a worker thread."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

metadata = sa.MetaData()


def default_url(home: Path) -> str:
    return f"sqlite:///{(home / 'gateway.db').resolve()}"


def make_engine(url: str) -> sa.Engine:
    """An engine for the URL; SQLite gets WAL (readers never block the writer), a busy timeout
    (several processes write the same file: 30 s, or the URL's `?timeout=<seconds>`) and NORMAL
    sync (WAL keeps it crash-safe)."""
    if url.startswith("sqlite"):
        parsed = sa.make_url(url)
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
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


def create_tables(engine: sa.Engine, tables: list[sa.Table] | None = None) -> None:
    """Create the tables (default: every table on `metadata`) that do not exist yet. Replicas that
    start together race between "does it exist" and CREATE: the loser sees "already exists" and
    checks again."""
    for attempt in range(5):
        try:
            metadata.create_all(engine, tables=tables)
            return
        except (sa.exc.OperationalError, sa.exc.ProgrammingError, sa.exc.IntegrityError) as err:
            # SQLite: create_all reads (does it exist?), then writes, in one transaction; another
            # replica's CREATE in between fails it with "database is locked" at once (a stale
            # snapshot), not after the busy timeout. Postgres: two CREATE TABLE of one name at once
            # collide on the type catalog's unique index.
            raced = ("already exists", "database is locked", "pg_type_typname_nsp_index")
            if not any(text in str(err) for text in raced) or attempt == 4:
                raise
            time.sleep(0.05 * (attempt + 1))

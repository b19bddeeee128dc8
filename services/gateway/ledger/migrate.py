"""The gateway database's schema revisions, through Alembic (`migrations/`): which revision a database
is at, upgrading it (`meshserve db upgrade`), and the gateway's start-up check. The revisions make
and change the usage table and, from 0003, the API-key tables (api_keys, key_version): nothing
else creates a table of the gateway's (the key store and the usage ledger both start through
`ensure_schema`).

At start-up (`ensure_schema`) a database with no usage table yet is upgraded to the head at once (a
first `meshserve up`); one at the head starts. An older one (a release before migrations, an older
revision) is upgraded too when it is a SQLite file (one host: `meshserve up`, `make test`, a dev
box), after a copy of the file is kept beside it (`gateway.db.before-<revision>`); a server
database (Postgres, shared by replicas) refuses to start with one line that says to back it up and
run `meshserve db upgrade`: changing a shared table of money is the operator's step, once, not a
side effect of whichever replica restarts first. (`UsageLedger(auto_upgrade=...)` decides otherwise
either way.) A revision this release does not know (a newer release's) always refuses.

An upgrade runs in one transaction that first takes a lock (SQLite: BEGIN IMMEDIATE, the database's
write lock; Postgres: a transaction-scoped advisory lock), then reads the revision again: replicas
starting together on an empty database upgrade it once, the others wait and find it done. Postgres
and SQLite both run DDL inside the transaction, so a failed upgrade leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from services.gateway.db import private_sqlite_file

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)
# Alembic says at INFO which plugins it set up (when imported) and which dialect (each time it looks
# at a database): noise in the gateway's log. upgrade() logs what it changed. (Alembic is imported
# when used: the writer process imports this package and never needs it.)
for _name in ("alembic.runtime.plugins", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_LOCK_KEY = 0x6D657368_6C656467  # pg_advisory_xact_lock's key: "meshledg"


class LedgerSchemaError(RuntimeError):
    """The gateway database (usage ledger, API keys) is not at the revision this release needs (one
    line, for the log)."""


def config(connection: sa.Connection | None = None) -> Config:
    """Alembic's Config for the ledger's migrations (no alembic.ini), on `connection`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The revision this release needs."""
    from alembic.script import ScriptDirectory

    revision = ScriptDirectory.from_config(config()).get_current_head()
    assert revision is not None
    return revision


def revisions() -> list[str]:
    """Every revision this release knows, newest first."""
    from alembic.script import ScriptDirectory

    return [script.revision for script in ScriptDirectory.from_config(config()).walk_revisions()]


def current(engine: sa.Engine) -> str | None:
    """The database's revision; None before any (an empty database, or a release before migrations)."""
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: sa.Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _has_usage_table(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table("usage")


def _locked(conn: sa.Connection) -> None:
    """Take the migration lock in `conn`'s transaction (before it reads anything)."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # pysqlite has not begun one yet: DDL would autocommit
    elif conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})


def upgrade(engine: sa.Engine, target: str = "head", *, only_if_empty: bool = False) -> tuple[str | None, str | None]:
    """Upgrade the database to `target`, in one locked transaction: (revision before, after).
    `only_if_empty`: upgrade only a database with no revision and no usage table (else unchanged)."""
    from alembic import command

    with engine.begin() as conn:
        _locked(conn)
        before = _revision(conn)
        if only_if_empty and (before is not None or _has_usage_table(conn)):
            return before, before
        command.upgrade(config(conn), target)
        after = _revision(conn)
    if after != before:
        log.info("gateway database: upgraded from revision %s to %s", before or "(none)", after)
    return before, after


def ensure_schema(engine: sa.Engine, auto_upgrade: bool | None = None) -> str:
    """The gateway's start-up check: the revision, once the database is at the head. An empty one is
    upgraded here; an older one too when `auto_upgrade` (None: when it is a SQLite file, after a
    copy of it is kept beside it). Else LedgerSchemaError: the operator runs `meshserve db upgrade`."""
    want = head()
    have = current(engine)
    if have is None:
        with engine.connect() as conn:
            empty = not _has_usage_table(conn)
        if empty:
            _, have = upgrade(engine, only_if_empty=True)  # another replica may have done it first
    if have == want:
        return have
    url = engine.url.render_as_string(hide_password=True)
    if have is not None and have not in set(revisions()):
        raise LedgerSchemaError(
            f"the gateway database {url} is at schema revision {have}, which this release does not know "
            f"(it needs {want}): run the release that upgraded it"
        )
    sqlite_file = _sqlite_file(engine)
    if auto_upgrade or (auto_upgrade is None and sqlite_file is not None):
        if sqlite_file is not None:
            copy = backup_sqlite(sqlite_file, f"before-{want}")
            log.warning("gateway database: upgrading %s from revision %s; its copy from before: %s", url, have, copy)
        return upgrade(engine)[1] or want
    state = f"is at schema revision {have}" if have else "has a usage table from a release before schema migrations"
    raise LedgerSchemaError(
        f"the gateway database {url} {state}; this release needs revision {want}: "
        "back it up, then run `meshserve db upgrade`"
    )


def _sqlite_file(engine: sa.Engine) -> Path | None:
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return Path(engine.url.database)


def backup_sqlite(path: Path, suffix: str) -> Path:
    """A consistent copy of a SQLite database (SQLite's online backup: safe while others write),
    private like the database, named `<file>.<suffix>` (a number added when that exists)."""
    copy, n = path.with_name(f"{path.name}.{suffix}"), 1
    while copy.exists():
        n += 1
        copy = path.with_name(f"{path.name}.{suffix}.{n}")
    private_sqlite_file(copy)
    with contextlib.closing(sqlite3.connect(path)) as source, contextlib.closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    return copy

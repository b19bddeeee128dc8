"""The gateway process against a ledger database of an older schema revision. Postgres: it refuses to
start, saying to run `meshserve db upgrade`; after that command it starts. A SQLite file (one host,
`meshserve up`): it upgrades it, keeping a copy from before. (No mesh: the gateway stops at its
control plane's start, before it dials anything; else it serves /health with its stages away.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
import sqlalchemy as sa

from services import cli
from services.gateway import db
from services.gateway.ledger import migrate
from tests.helpers import REPO, free_port
from tests.unit import test_ledger

postgres_server = test_ledger.postgres_server  # a real Postgres server (its binaries: pgserver or the system's)


def gateway(home, url: str, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "MESHSERVE_HOME": str(home),
        "MESHSERVE_GATEWAY_DATABASE_URL": url,
        "MESHSERVE_GATEWAY_HTTP_PORT": str(port),
        "MESHSERVE_GATEWAY_GRPC_PORT": "0",
        "MESHSERVE_GATEWAY_HOST": "127.0.0.1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.gateway.main"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def serves(process: subprocess.Popen, port: int) -> bool:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            time.sleep(0.2)
    return False


@pytest.fixture
def old_ledger(tmp_path, monkeypatch, postgres_server):
    """A Postgres database of its own, at revision 0001."""
    name = f"startup_{tmp_path.name[-12:].replace('-', '_').lower()}"
    admin = sa.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = postgres_server.rsplit("/", 1)[0] + f"/{name}"
    monkeypatch.setenv("MESHSERVE_GATEWAY_DATABASE_URL", url)
    assert cli.main(["db", "upgrade", "--revision", "0001"]) == 0
    yield tmp_path, url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()


def test_the_gateway_upgrades_an_old_sqlite_ledger_and_keeps_a_copy(tmp_path):
    path = tmp_path / "gateway.db"
    migrate.upgrade(db.make_engine(f"sqlite:///{path}"), "0001")
    port = free_port()
    started = gateway(tmp_path, f"sqlite:///{path}", port)
    try:
        assert serves(started, port)
    finally:
        started.terminate()
        started.communicate(timeout=60)
    assert migrate.current(db.make_engine(f"sqlite:///{path}")) == migrate.head() == "0003"
    assert migrate.current(db.make_engine(f"sqlite:///{path}.before-0003")) == "0001"


def test_the_gateway_refuses_an_old_postgres_ledger_until_db_upgrade(old_ledger, capsys):
    home, url = old_ledger
    refused = gateway(home, url, free_port())
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode != 0
    assert "is at schema revision 0001; this release needs revision 0003" in out
    assert "run `meshserve db upgrade`" in out
    assert cli.main(["db", "upgrade"]) == 0
    assert "0001 -> 0003" in capsys.readouterr().out
    port = free_port()
    started = gateway(home, url, port)
    try:
        assert serves(started, port)
    finally:
        started.terminate()
        started.communicate(timeout=60)


def test_the_refusal_is_one_line_without_a_traceback(old_ledger):
    home, url = old_ledger
    refused = gateway(home, url, free_port())
    out, _ = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert "Traceback" not in out

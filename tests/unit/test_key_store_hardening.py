"""The key store at rest: a private database file, salted token hashes, rows of older releases
still verifying (and rehashed), and an operator's weak admin token refused at start."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys

import pytest
import sqlalchemy as sa

from services.common.settings import REPO_ROOT
from services.gateway.control.keys import KeyStore, api_keys
from services.gateway.control.plane import ControlPlane, WeakAdminToken
from services.gateway.db import make_engine
from services.gateway.settings import GatewaySettings
from tests.unit.test_ledger import database_url, postgres_server  # noqa: F401  (SQLite and Postgres)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _row(store: KeyStore, key_id: str):
    with store.engine.connect() as conn:
        return conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).one()._mapping


@pytest.fixture
def store(tmp_path):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    yield store
    store.engine.dispose()


def test_the_database_and_its_wal_are_readable_by_the_owner_only(tmp_path):
    home = tmp_path / "home"
    store = KeyStore(make_engine(f"sqlite:///{home / 'gateway.db'}"))
    store.init_schema()
    store.create("team", ["inference"])
    with store.engine.connect():  # an open connection keeps the -wal and -shm files
        files = [home / "gateway.db", home / "gateway.db-wal", home / "gateway.db-shm"]
        assert {f.name: oct(_mode(f)) for f in files} == {f.name: "0o600" for f in files}
    assert _mode(home) == 0o700  # the folder the gateway created
    store.engine.dispose()


def test_a_database_left_world_readable_is_narrowed(tmp_path):
    path = tmp_path / "gateway.db"
    path.touch(mode=0o644)
    os.chmod(path, 0o644)
    make_engine(f"sqlite:///{path}").dispose()
    assert _mode(path) == 0o600


async def test_the_stored_hash_is_salted_not_the_tokens_sha256(store):
    token = "msk_shared_" + secrets.token_urlsafe(32)
    store.create("a", ["read"], key_id="a", token=token)
    store.create("b", ["read"], key_id="b", token=token)
    a, b = _row(store, "a"), _row(store, "b")
    assert hashlib.sha256(token.encode()).hexdigest() not in (a["secret_sha256"], b["secret_sha256"])
    assert a["secret_sha256"] != b["secret_sha256"] and a["secret_salt"] != b["secret_salt"]
    key, own = store.create("c", ["read"])
    await store.reload()
    assert store.authenticate(own).id == key.id


async def test_a_row_of_an_older_release_still_authenticates_and_is_rehashed(store):
    key, token = store.create("old", ["inference"])
    legacy = hashlib.sha256(token.encode()).hexdigest()
    with store.engine.begin() as conn:
        conn.execute(api_keys.update().values(secret_sha256=legacy, secret_salt=None))
    await store.reload()
    assert store.authenticate(token).id == key.id
    await store.rehash_legacy()  # what the poll does after a verification
    row = _row(store, key.id)
    assert row["secret_salt"] and row["secret_sha256"] != legacy
    assert store.authenticate(token).id == key.id  # the reloaded, salted view
    with pytest.raises(Exception, match="invalid API key"):
        store.authenticate(token + "x")


async def test_a_database_of_an_older_release_gains_the_salt_column(database_url):  # noqa: F811
    engine = make_engine(database_url)
    old = sa.MetaData()
    table = sa.Table("api_keys", old, *(c.copy() for c in api_keys.columns if c.name != "secret_salt"))
    old.create_all(engine)
    token = "msk_k1_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        conn.execute(
            table.insert().values(
                id="k1",
                name="from an older release",
                secret_sha256=hashlib.sha256(token.encode()).hexdigest(),
                scopes=["read"],
                models=[],
                tasks=[],
                created_at=sa.func.now(),
            )
        )
    store = KeyStore(engine)
    store.init_schema()
    store.init_schema()  # idempotent
    await store.reload()
    assert store.authenticate(token).id == "k1"
    engine.dispose()


def test_the_admin_row_of_an_older_release_is_rehashed_at_start(store):
    token = "msk_admin_" + secrets.token_hex(32)
    store.ensure_admin(token)
    with store.engine.begin() as conn:
        conn.execute(
            api_keys.update().values(secret_sha256=hashlib.sha256(token.encode()).hexdigest(), secret_salt=None)
        )
    store.ensure_admin(token)
    row = _row(store, "admin")
    assert row["secret_salt"] and row["secret_sha256"] != hashlib.sha256(token.encode()).hexdigest()


@pytest.mark.parametrize("weak", ["changeme", "correct-horse-battery-staple", "a" * 64, "ab" * 20])
def test_a_weak_admin_token_is_refused_at_start(tmp_path, weak):
    settings = GatewaySettings(home=str(tmp_path), admin_token=weak)
    with pytest.raises(WeakAdminToken, match="MESHSERVE_ADMIN_TOKEN is too weak") as err:
        ControlPlane.from_settings(settings)
    assert weak not in str(err.value)


def test_a_strong_admin_token_is_accepted(tmp_path):
    settings = GatewaySettings(home=str(tmp_path), admin_token="msk_admin_" + secrets.token_hex(32), ledger=False)
    ControlPlane.from_settings(settings).keys.engine.dispose()


def test_the_gateway_process_exits_with_the_reason(tmp_path):
    env = {
        **os.environ,
        "MESHSERVE_HOME": str(tmp_path),
        "MESHSERVE_ADMIN_TOKEN": "hunter2hunter2",
        "MESHSERVE_GATEWAY_HTTP_PORT": "0",
        "MESHSERVE_GATEWAY_GRPC_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway.main"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "MESHSERVE_ADMIN_TOKEN is too weak" in done.stderr and "hunter2" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr  # the operator gets the reason, not a stack
    [line] = [line for line in done.stderr.splitlines() if "too weak" in line]
    assert json.loads(line)["level"] == "error"

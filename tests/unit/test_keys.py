"""The key store on a real SQLite file: hashing, verification, revocation, expiry, and replicas
initialising the same database at once."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from services.common.errors import ErrorCode, MeshError
from services.gateway.control.keys import KeyStore, api_keys
from services.gateway.db import make_engine


@pytest.fixture
def store(tmp_path):
    store = KeyStore(make_engine(f"sqlite:///{tmp_path / 'keys.db'}"))
    store.init_schema()
    yield store
    store.engine.dispose()


async def test_token_is_stored_only_as_a_hash_and_verifies(store):
    key, token = store.create("team", ["inference"])
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(api_keys)).one()._mapping
    # The whole secret (it may itself contain "_": a short last piece could match any hex by chance).
    assert token not in str(dict(row)) and token.split("_", 2)[2] not in str(dict(row))
    await store.reload()
    assert store.authenticate(token).id == key.id
    for wrong in (token + "x", token[:-1], f"msk_{key.id}_nope", "nope"):
        with pytest.raises(MeshError) as err:
            store.authenticate(wrong)
        assert err.value.code is ErrorCode.UNAUTHENTICATED and wrong not in err.value.message


async def test_revoked_and_expired_keys_are_refused(store):
    _, revoked = store.create("a", ["read"])
    _, expired = store.create("b", ["read"], expires_at=datetime.now(UTC) - timedelta(seconds=1))
    store.revoke(revoked.split("_")[1])
    await store.reload()
    for token in (revoked, expired):
        with pytest.raises(MeshError, match="revoked or has expired"):
            store.authenticate(token)


def test_replicas_initialising_one_database_together(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    stores = [KeyStore(make_engine(url)) for _ in range(4)]
    errors = []

    def start(s):
        try:
            s.init_schema()
            s.ensure_admin("the-admin-token")
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert stores[0]._version_now() >= 0  # exactly one version row: scalar_one() does not raise
    assert [k.id for k in stores[0].all()] == ["admin"]


async def test_a_remembered_credential_is_forgotten_when_the_keys_change_or_it_expires(store):
    """The authenticator remembers credentials it verified (a dict lookup instead of hashing the
    token on every request); a revocation, any other key change, or the key's expiry ends that."""
    from services.gateway.control.auth import Authenticator

    auth = Authenticator(store, enabled=True, metrics_public=True)
    key, token = store.create("team", ["inference"])
    soon_key, soon = store.create("brief", ["inference"], expires_at=datetime.now(UTC) + timedelta(seconds=1))
    await store.reload()
    credential = f"Bearer {token}".encode()
    assert auth.remembered(credential, "inference") is None  # never verified
    principal = await auth.principal(token, "inference")
    auth.remember(credential, principal)
    assert auth.remembered(credential, "inference") is principal
    assert auth.remembered(credential, "admin") is None  # a scope the key lacks: verify (and refuse)
    assert auth.remembered(f"Bearer {token}x".encode(), "inference") is None
    soon_credential = f"Bearer {soon}".encode()
    auth.remember(soon_credential, await auth.principal(soon, "inference"))
    assert auth.remembered(soon_credential, "inference").key.id == soon_key.id
    threading.Event().wait(1.1)
    assert auth.remembered(soon_credential, "inference") is None  # expired
    with pytest.raises(MeshError, match="revoked or has expired"):
        await auth.principal(soon, "inference")
    store.revoke(key.id)
    await store.reload()  # what every replica does when the key version changes
    assert auth.remembered(credential, "inference") is None
    with pytest.raises(MeshError, match="revoked or has expired"):
        await auth.principal(token, "inference")

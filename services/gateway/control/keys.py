"""API keys: creation, verification, revocation, and an in-process view shared by replicas.

A token is `msk_<id>_<secret>`: the id finds the key without a scan (an O(1) lookup, so a salt
per key costs nothing), the secret (32 random bytes) is checked against its hash with a
constant-time comparison. Only the hash is stored, HMAC-SHA256 keyed by a random salt of the key's
own: equal tokens never store equal hashes and no table precomputed for SHA-256 applies. The token
is shown once, at creation. A long random secret needs no slow hash (a password would): guessing
256 bits is not a brute-force problem; the one token an operator chooses, the admin token, gets a
strength check at start (control.admin_token.check_admin_token).

Rows of older releases hold the token's plain SHA-256 and no salt: they still verify, and the
first successful verification rehashes the row (the admin key's at start, others' by the poll
that follows; replicas see the new row at their next reload).

Every replica keeps all keys in memory (authentication is a dict lookup, no I/O on the request
path) and reloads them when the shared `key_version` row changes, polled every `refresh_s`; a
replica that creates or revokes a key reloads at once. So a revoked key stops working on the
replica that revoked it immediately and on the others within `refresh_s`.

The tables are made and changed by the gateway database's Alembic migrations (revision 0003 and
later: services/gateway/ledger/migrations), like the usage table; `init_schema()` is the same
start-up check the usage ledger makes. A key's budget is exact money (a Decimal of USD).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import sqlalchemy as sa

from services.common.errors import ErrorCode, MeshError
from services.common.money import usd
from services.gateway.control.budgets import MAX_BUDGET_USD
from services.gateway.db import metadata, retry_locked
from services.gateway.ledger import Money, ensure_schema

log = logging.getLogger(__name__)

SCOPES = ("inference", "read", "admin")
PERIODS = ("day", "month", "total")
TOKEN_PREFIX = "msk_"
# A provider's name as providers.yaml allows it (control does not import the providers package).
PROVIDER_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    # HMAC-SHA256(key=secret_salt, token) in hex; rows of older releases: SHA-256(token), no salt.
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("secret_salt", sa.String(32), nullable=True),
    sa.Column("scopes", sa.JSON, nullable=False),
    sa.Column("models", sa.JSON, nullable=False),  # [] = every model
    sa.Column("tasks", sa.JSON, nullable=False),  # [] = every task
    sa.Column("providers", sa.JSON, nullable=True),  # [] or NULL (a row of an older release) = every provider
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_minute", sa.Integer),
    sa.Column("concurrent_requests", sa.Integer),
    # (21 digits: up to budgets.MAX_BUDGET_USD, a billion USD, and beyond)
    sa.Column("budget_usd", Money(21), comment="USD per period, exact to the nano-dollar"),
    sa.Column("budget_period", sa.String(8)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)
# One row (id 1): replicas starting together on an empty database must not insert two.
key_version = sa.Table(
    "key_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.Integer, nullable=False),
)


@dataclass(frozen=True)
class ApiKey:
    """A stored key, without its secret."""

    id: str
    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()
    providers: tuple[str, ...] = ()  # () = every provider
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None
    budget_usd: Decimal | None = None  # USD per period, exact
    budget_period: str | None = None
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    secret_sha256: str = field(default="", repr=False)
    secret_salt: str | None = field(default=None, repr=False)  # None: a row of an older release

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or _aware(self.expires_at) > now)

    def public(self) -> dict:
        """The key as shown to admins: everything but the secret's hash."""
        return {
            "id": self.id,
            "name": self.name,
            "scopes": list(self.scopes),
            "models": list(self.models),
            "tasks": list(self.tasks),
            "providers": list(self.providers),
            "requests_per_minute": self.requests_per_minute,
            "tokens_per_minute": self.tokens_per_minute,
            "concurrent_requests": self.concurrent_requests,
            "budget_usd": None if self.budget_usd is None else float(self.budget_usd),  # a JSON number
            "budget_period": self.budget_period,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
        }


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite drops the zone


def _iso(value: datetime | None) -> str | None:
    return _aware(value).isoformat() if value else None


def _sha256(secret: str) -> str:
    """The hash of rows of older releases (no salt)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_hash(token: str, salt: str | None) -> str:
    """What a row stores for a token: HMAC-SHA256 keyed by the row's salt (hex), or the plain
    SHA-256 of a row of an older release (no salt)."""
    if salt is None:
        return _sha256(token)
    return hmac.new(bytes.fromhex(salt), token.encode(), hashlib.sha256).hexdigest()


def new_salt() -> str:
    return secrets.token_hex(16)


def _row_to_key(row) -> ApiKey:
    m = row._mapping
    return ApiKey(
        id=m["id"],
        name=m["name"],
        scopes=tuple(m["scopes"]),
        models=tuple(m["models"]),
        tasks=tuple(m["tasks"]),
        providers=tuple(m.get("providers") or ()),
        requests_per_minute=m["requests_per_minute"],
        tokens_per_minute=m["tokens_per_minute"],
        concurrent_requests=m["concurrent_requests"],
        budget_usd=m["budget_usd"],
        budget_period=m["budget_period"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        secret_sha256=m["secret_sha256"],
        secret_salt=m["secret_salt"],
    )


def validate_spec(scopes, models, tasks, budget_usd, budget_period, providers=()) -> None:
    unknown = [s for s in scopes if s not in SCOPES]
    if not scopes or unknown:
        raise MeshError(
            ErrorCode.INVALID_INPUT, f"`scopes` must be a non-empty subset of {list(SCOPES)}", param="scopes"
        )
    if budget_period is not None and budget_period not in PERIODS:
        raise MeshError(
            ErrorCode.INVALID_INPUT, f"`budget_period` must be one of {list(PERIODS)}", param="budget_period"
        )
    if budget_usd is not None and not 0 <= budget_usd <= MAX_BUDGET_USD:
        raise MeshError(
            ErrorCode.INVALID_INPUT, f"`budget_usd` must be >= 0 and at most {MAX_BUDGET_USD:,.0f}", param="budget_usd"
        )
    bad = [p for p in providers if not isinstance(p, str) or not PROVIDER_NAME.fullmatch(p)]
    if bad:
        raise MeshError(
            ErrorCode.INVALID_INPUT,
            f"`providers` must be provider names (lowercase letters, digits, '.', '_', '-'; at most 64): {bad[0]!r}",
            param="providers",
        )


class KeyStore:
    """Keys in the gateway database, mirrored in memory for request-time checks."""

    def __init__(self, engine: sa.Engine, *, refresh_s: float = 0.25) -> None:
        self.engine = engine
        self.refresh_s = refresh_s
        self._keys: dict[str, ApiKey] = {}
        self._version = -1
        self._task: asyncio.Task | None = None
        self._last_miss_refresh = float("-inf")
        self._miss_refresh: asyncio.Task | None = None
        # Compared against when the id is unknown, so a miss costs the same as a hit.
        self._decoy_salt = new_salt()
        self._decoy = token_hash(secrets.token_urlsafe(32), self._decoy_salt)
        self._legacy: dict[str, str] = {}  # key id -> its token, verified against an unsalted row

    # -- synchronous database operations (the CLI uses them directly) ---------------------------
    def init_schema(self, auto_upgrade: bool | None = None) -> None:
        """The database at the schema this release needs, through its migrations (an empty one is
        created, an older SQLite file upgraded after a copy; else LedgerSchemaError: the operator
        runs `meshserve db upgrade`; see ledger.migrate.ensure_schema)."""
        retry_locked(lambda: ensure_schema(self.engine, auto_upgrade))

    def _bump(self, conn) -> None:
        conn.execute(key_version.update().values(version=key_version.c.version + 1))

    def create(
        self,
        name: str,
        scopes: list[str],
        *,
        models: list[str] | None = None,
        tasks: list[str] | None = None,
        providers: list[str] | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        concurrent_requests: int | None = None,
        budget_usd: Decimal | float | None = None,
        budget_period: str | None = None,
        expires_at: datetime | None = None,
        key_id: str | None = None,
        token: str | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; returns it and its token (the only time the token exists)."""
        validate_spec(scopes, models or [], tasks or [], budget_usd, budget_period, providers or [])
        budget_usd = None if budget_usd is None else usd(budget_usd)  # exact, to the nano-dollar
        key_id = key_id or secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        token = token or f"{TOKEN_PREFIX}{key_id}_{secret}"
        salt = new_salt()
        values = {
            "id": key_id,
            "name": name,
            "secret_sha256": token_hash(token, salt),
            "secret_salt": salt,
            "scopes": list(dict.fromkeys(scopes)),
            "models": list(models or []),
            "tasks": list(tasks or []),
            "providers": list(dict.fromkeys(providers or [])),
            "requests_per_minute": requests_per_minute,
            "tokens_per_minute": tokens_per_minute,
            "concurrent_requests": concurrent_requests,
            "budget_usd": budget_usd,
            "budget_period": budget_period or ("month" if budget_usd is not None else None),
            "created_at": datetime.now(UTC),
            "expires_at": expires_at,
            "revoked_at": None,
        }
        with self.engine.begin() as conn:
            conn.execute(api_keys.insert().values(**values))
            self._bump(conn)
        return _row_to_key(_Row(values)), token

    def revoke(self, key_id: str) -> ApiKey:
        with self.engine.begin() as conn:
            done = conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            ).rowcount
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise MeshError(ErrorCode.NOT_FOUND, f"no API key with id {key_id!r}", param="id")
            if done:
                self._bump(conn)
        return _row_to_key(row)

    def all(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            return [_row_to_key(r) for r in conn.execute(sa.select(api_keys).order_by(api_keys.c.created_at))]

    def ensure_admin(self, token: str) -> None:
        """The bootstrap admin key (id `admin`) takes the configured admin token. Replicas that
        start together may race here: the loser finds the key in place and retries."""
        for attempt in range(5):
            try:
                return retry_locked(lambda: self._ensure_admin(token))
            except sa.exc.IntegrityError:
                if attempt == 4:
                    raise

    def _ensure_admin(self, token: str) -> None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == "admin")).first()
        if row is not None:
            stored, salt = row._mapping["secret_sha256"], row._mapping["secret_salt"]
            if hmac.compare_digest(stored, token_hash(token, salt)):
                if salt is None:
                    self._rehash("admin", token)
                return
        with self.engine.begin() as conn:
            conn.execute(api_keys.delete().where(api_keys.c.id == "admin"))
            self._bump(conn)
        self.create("admin (bootstrap)", ["admin"], key_id="admin", token=token)

    def _rehash(self, key_id: str, token: str) -> bool:
        """Replace an unsalted row's hash of `token` by a salted one (only if the row still holds
        that unsalted hash: another replica may have done it first)."""
        salt = new_salt()
        with self.engine.begin() as conn:
            done = conn.execute(
                api_keys.update()
                .where(api_keys.c.id == key_id, api_keys.c.secret_salt.is_(None))
                .where(api_keys.c.secret_sha256 == _sha256(token))
                .values(secret_sha256=token_hash(token, salt), secret_salt=salt)
            ).rowcount
            if done:
                self._bump(conn)
        if done:
            log.info("API key %s: its hash was upgraded to a salted HMAC-SHA256", key_id)
        return bool(done)

    async def rehash_legacy(self) -> None:
        """Rehash the unsalted rows whose tokens were verified since the last call (the poll calls
        it), then reload the view."""
        pending, self._legacy = self._legacy, {}
        changed = False
        for key_id, token in pending.items():
            changed |= await asyncio.to_thread(self._rehash, key_id, token)
        if changed:
            await self.reload()

    def _load(self) -> tuple[int, dict[str, ApiKey]]:
        with self.engine.connect() as conn:
            version = conn.execute(sa.select(key_version.c.version)).scalar_one()
            keys = {k.id: k for k in (_row_to_key(r) for r in conn.execute(sa.select(api_keys)))}
        return version, keys

    def _version_now(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(key_version.c.version)).scalar_one()

    # -- the in-memory view ---------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.init_schema)
        await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def reload(self) -> None:
        version, keys = await asyncio.to_thread(self._load)
        # Two reloads can overlap (the poll and a revocation's own reload) and end in either order:
        # never go back to an older view (a revoked key would work again until the next poll).
        if version >= self._version:
            self._version, self._keys = version, keys

    @property
    def view(self) -> object:
        """The current in-memory view of the keys: a new object after every reload (compare with
        `is` to know whether anything derived from the keys is stale)."""
        return self._keys

    def knows(self, token: str) -> bool:
        """Whether the token names a key id this view has (else it may be newer than the view)."""
        return not token.startswith(TOKEN_PREFIX) or token[len(TOKEN_PREFIX) :].split("_", 1)[0] in self._keys

    async def refresh_for(self, token: str) -> None:
        """A token for an unknown key id may have been created on another replica a moment ago:
        check the key version once (at most every refresh_s / 4) before refusing it."""
        if self.knows(token):
            return
        if self._miss_refresh is None or self._miss_refresh.done():
            loop = asyncio.get_running_loop()
            if loop.time() - self._last_miss_refresh < self.refresh_s / 4:
                return  # just checked: an unknown id now is unknown
            self._last_miss_refresh = loop.time()
            self._miss_refresh = loop.create_task(self._refresh_if_changed())
        await asyncio.shield(self._miss_refresh)  # concurrent misses share one check

    async def _refresh_if_changed(self) -> None:
        try:
            if await asyncio.to_thread(self._version_now) != self._version:
                await self.reload()
        except Exception:  # the database is briefly unavailable: judge the token by the last view (401)
            log.warning("API key refresh failed", exc_info=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                if self._legacy:
                    await self.rehash_legacy()
                if await asyncio.to_thread(self._version_now) != self._version:
                    await self.reload()
            except Exception:  # the database is briefly unavailable: keep the last view
                log.warning("API key refresh failed", exc_info=True)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def authenticate(self, token: str) -> ApiKey:
        """The active key of a token; UNAUTHENTICATED otherwise. Never echoes the token."""
        key = None
        if token.startswith(TOKEN_PREFIX):
            key = self._keys.get(token[len(TOKEN_PREFIX) :].split("_", 1)[0])
        if key is None:
            key = self._keys.get("admin")
        if key is not None:
            stored, salt = key.secret_sha256, key.secret_salt
        else:
            stored, salt = self._decoy, self._decoy_salt
        if not hmac.compare_digest(stored, token_hash(token, salt)) or key is None:
            raise MeshError(ErrorCode.UNAUTHENTICATED, "invalid API key")
        if salt is None and len(self._legacy) < 10_000:  # verified against an unsalted row: rehash it
            self._legacy[key.id] = token
        if key.revoked_at is not None or (key.expires_at is not None and not key.active(datetime.now(UTC))):
            raise MeshError(ErrorCode.UNAUTHENTICATED, "this API key was revoked or has expired")
        return key


class _Row:
    """Adapter so a dict of column values reads like a result row."""

    def __init__(self, values: dict) -> None:
        self._mapping = values

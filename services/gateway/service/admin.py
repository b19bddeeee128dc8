"""API keys and the usage report: what the admin routes (`/admin/keys`, `/v1/usage`) and the
`meshserve keys` command do, over the control plane's key store and the usage ledger."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field

from services.common.errors import ErrorCode, MeshError
from services.gateway.control.auth import Principal
from services.gateway.control.budgets import MAX_BUDGET_USD
from services.gateway.control.keys import ApiKey, KeyStore
from services.gateway.control.plane import ControlPlane
from services.gateway.ledger import LedgerWriteError

log = logging.getLogger(__name__)

MAX_LIMIT = 10**9  # rate limits per key (they fit every database's INTEGER column)
MAX_EXPIRES_IN_S = 10 * 365.25 * 86400  # a key's lifetime: 10 years (a datetime overflows near 1e11 s)


class KeyRequest(BaseModel):
    """`POST /admin/keys`: a new API key."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str = Field(..., min_length=1, max_length=200)
    scopes: list[Literal["inference", "read", "admin"]] = Field(["inference", "read"])
    models: list[str] = Field([], description="Models the key may use; empty: all.")
    tasks: list[str] = Field([], description="Tasks the key may run; empty: all.")
    providers: list[str] = Field([], description="Providers the key may use (`local`: this mesh); empty: all.")
    requests_per_minute: int | None = Field(None, ge=1, le=MAX_LIMIT)
    tokens_per_minute: int | None = Field(None, ge=1, le=MAX_LIMIT)
    concurrent_requests: int | None = Field(None, ge=1, le=MAX_LIMIT)
    budget_usd: float | None = Field(None, ge=0, le=MAX_BUDGET_USD, description="At most 1e9 (USD per period).")
    budget_period: Literal["day", "month", "total"] | None = None
    expires_in_s: float | None = Field(
        None, gt=0, le=MAX_EXPIRES_IN_S, description="Lifetime, at most 10 years; unset: no expiry."
    )


def create_key(store: KeyStore, spec: KeyRequest) -> tuple[ApiKey, str]:
    """Store the key a spec describes; returns it and its token (`POST /admin/keys` and
    `meshserve keys create`)."""
    expires = datetime.now(UTC) + timedelta(seconds=spec.expires_in_s) if spec.expires_in_s else None
    return store.create(
        spec.name,
        list(spec.scopes),
        models=spec.models,
        tasks=spec.tasks,
        providers=spec.providers,
        requests_per_minute=spec.requests_per_minute,
        tokens_per_minute=spec.tokens_per_minute,
        concurrent_requests=spec.concurrent_requests,
        budget_usd=spec.budget_usd,
        budget_period=spec.budget_period,
        expires_at=expires,
    )


def _date(value: str | None, field: str) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MeshError(ErrorCode.INVALID_INPUT, f"`{field}` must be an ISO date or time", param=field) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class AdminService:
    """Key management and usage reports; the caller's scopes were checked before (auth.REST_SCOPES)."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    def _keys(self) -> KeyStore:
        if self.control.keys is None:
            raise MeshError(ErrorCode.NOT_IMPLEMENTED, "authentication is off (--no-auth): there are no API keys")
        return self.control.keys

    async def create_key(self, spec: KeyRequest) -> tuple[ApiKey, str]:
        """A new key, known to this replica at once; returns it and its token (shown once)."""
        keys = self._keys()
        key, token = await asyncio.to_thread(create_key, keys, spec)
        await keys.reload()
        return key, token

    async def list_keys(self) -> list[ApiKey]:
        return await asyncio.to_thread(self._keys().all)

    async def revoke_key(self, key_id: str) -> ApiKey:
        keys = self._keys()
        key = await asyncio.to_thread(keys.revoke, key_id)
        await keys.reload()
        return key

    async def usage(
        self, principal: Principal, *, key_id: str | None, model: str | None, since: str | None, until: str | None,
        by: str, limit: int,
    ) -> tuple[list, list]:  # fmt: skip
        """(rows, totals by `by`) of the usage ledger; a non-admin key sees only its own usage."""
        ledger = self.control.ledger
        if ledger is None:
            raise MeshError(ErrorCode.NOT_IMPLEMENTED, "the usage ledger is off (MESHSERVE_GATEWAY_LEDGER=false)")
        if not principal.key.has_scope("admin"):
            if key_id not in (None, principal.key_id):
                raise MeshError(ErrorCode.PERMISSION_DENIED, "a non-admin key sees only its own usage", param="key_id")
            key_id = principal.key_id
        filters = {"key_id": key_id, "model": model, "since": _date(since, "since"), "until": _date(until, "until")}
        try:
            await ledger.flush()  # a caller reading right after a request sees it
            rows = await ledger.query(**filters, limit=limit)
            totals = await ledger.totals(by=by, **filters)
        except (LedgerWriteError, sa.exc.SQLAlchemyError, OSError) as exc:  # the database is away: retryable
            log.warning("usage query failed: %s", type(exc).__name__)
            raise MeshError(ErrorCode.UPSTREAM_UNAVAILABLE, "the usage ledger's database is unavailable") from exc
        return rows, totals

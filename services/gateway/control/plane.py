"""The gateway's control plane, assembled from settings: keys and authentication, the control
store (rate limits and budgets: in process, or in Redis when a URL is set), the usage ledger, and
the metering that ties them to each request."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.gateway.control.admin_token import WeakAdminToken, admin_token, check_admin_token
from services.gateway.control.auth import Authenticator
from services.gateway.control.metering import Metering
from services.gateway.settings import GatewaySettings

if TYPE_CHECKING:
    from services.gateway.control.keys import KeyStore
    from services.gateway.control.store import ControlStore
    from services.gateway.ledger import UsageLedger

__all__ = ["ControlPlane", "WeakAdminToken", "control_store"]  # WeakAdminToken: what main.py catches

log = logging.getLogger(__name__)


def control_store(url: str | None) -> ControlStore:
    """The store a URL names: none or `memory://`, in process; `redis://…` / `rediss://…`, in Redis."""
    if not url or url.startswith("memory://"):
        from services.gateway.control.local_store import LocalControlStore

        return LocalControlStore()
    if url.startswith(("redis://", "rediss://")):
        try:
            from services.gateway.control.redis_store import RedisControlStore
        except ModuleNotFoundError as exc:
            raise ValueError(f"control store {url!r} needs the Redis client: pip install 'meshserve[redis]'") from exc

        return RedisControlStore(url)
    raise ValueError(f"unsupported control store {url!r}: use memory:// or redis://")


@dataclass
class ControlPlane:
    """Who may call (auth, keys), what it may use and what it spent (metering over the store and
    the ledger); `start()` and `close()` run them with the gateway."""

    auth: Authenticator
    metering: Metering
    keys: KeyStore | None = None
    ledger: UsageLedger | None = None
    store: ControlStore | None = None  # rate limits and budgets (closed here)

    @classmethod
    def disabled(cls, settings: GatewaySettings) -> ControlPlane:
        """No authentication, limits, budgets or ledger (tests of the pipeline alone)."""
        return cls(Authenticator(None, enabled=False, metrics_public=True), Metering.disabled())

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> ControlPlane:
        """Everything on unless settings turn it off; the store in Redis when `redis_url` is set."""
        from services.gateway.control.keys import KeyStore
        from services.gateway.db import default_url, make_engine
        from services.gateway.ledger import UsageLedger

        if settings.auth and settings.admin_token:  # refused before anything starts
            check_admin_token(settings.admin_token.get_secret_value(), "MESHSERVE_ADMIN_TOKEN")
        engine = make_engine(settings.database_url or default_url(Path(settings.home)))
        keys = KeyStore(engine, refresh_s=settings.key_refresh_s) if settings.auth else None
        store = control_store(settings.redis_url) if settings.auth else None
        ledger = UsageLedger(engine, writer_nice=settings.ledger_writer_nice) if settings.ledger else None
        metering = Metering(store, ledger, timeout_s=settings.request_timeout_s)
        auth = Authenticator(keys, enabled=settings.auth, metrics_public=settings.metrics_public, store=store)
        return cls(auth, metering, keys, ledger, store)

    async def start(self, settings: GatewaySettings) -> None:
        if self.keys is not None:
            await self.keys.start()
            await asyncio.to_thread(self.keys.ensure_admin, admin_token(settings))
            await self.keys.reload()
        else:
            log.warning("AUTHENTICATION IS OFF (--no-auth): anyone who reaches this gateway can use and administer it")
        if self.ledger is not None:
            await self.ledger.start()

    async def close(self) -> None:
        """Flush the ledger (nothing acknowledged is lost), then close the stores."""
        if self.ledger is not None:
            await self.ledger.close()
        for part in (self.keys, self.store):
            if part is not None:
                await part.close()

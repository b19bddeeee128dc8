"""The gateway's control plane, assembled from settings: keys and authentication, the control
store (rate limits and budgets: in process, or in Redis when a URL is set), the usage ledger, and
the metering that ties them to each request; and the admin token's bootstrap and strength check."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.gateway.control.auth import Authenticator
from services.gateway.control.metering import Metering
from services.gateway.settings import ADMIN_TOKEN_FILE, GatewaySettings

if TYPE_CHECKING:
    from services.gateway.control.keys import KeyStore
    from services.gateway.control.store import ControlStore
    from services.gateway.ledger import UsageLedger

log = logging.getLogger(__name__)


ADMIN_TOKEN_MIN_CHARS = 32
ADMIN_TOKEN_MIN_BITS = 128


class WeakAdminToken(ValueError):
    """The operator's admin token is too easy to guess: the gateway refuses to start with it."""


def check_admin_token(token: str, where: str) -> None:
    """Refuse an admin token shorter than 32 characters or below 128 bits by a generous estimate
    (length x log2 of its distinct characters: an upper bound, so it only catches tokens that are
    surely weak, like a word, a short phrase or a repeated pattern). The admin token opens every
    key, budget and usage row; unlike a generated key it is chosen by a person."""
    bits = len(token) * math.log2(len(set(token))) if len(set(token)) > 1 else 0.0
    if len(token) < ADMIN_TOKEN_MIN_CHARS or bits < ADMIN_TOKEN_MIN_BITS:
        raise WeakAdminToken(
            f"the admin token in {where} is too weak ({len(token)} characters, at most {bits:.0f} bits; needed: "
            f"{ADMIN_TOKEN_MIN_CHARS} characters and {ADMIN_TOKEN_MIN_BITS} bits): use a random one, e.g. "
            f'MESHSERVE_ADMIN_TOKEN="msk_admin_$(openssl rand -hex 32)", or unset it to have one generated '
            f"into $MESHSERVE_HOME/{ADMIN_TOKEN_FILE}"
        )


def admin_token(settings: GatewaySettings) -> str:
    """MESHSERVE_ADMIN_TOKEN, else the token saved in MESHSERVE_HOME/admin-token, else a new one
    written there (mode 0600; the folder 0700 when created here) so that `make up` can print it and
    later runs keep it. A token the operator chose must pass check_admin_token."""
    if settings.admin_token:
        token = settings.admin_token.get_secret_value()
        check_admin_token(token, "MESHSERVE_ADMIN_TOKEN")
        return token
    path = Path(settings.home) / ADMIN_TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        check_admin_token(token, str(path))
        return token
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Written whole to a private file, then linked into place: gateway replicas starting together on
    # one home all end up with the one token that won the link, never a half-written file.
    token = "msk_admin_" + secrets.token_urlsafe(32)
    fd, draft = tempfile.mkstemp(prefix=".admin-token-", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.link(draft, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        os.unlink(draft)
    return token


def control_store(url: str | None) -> ControlStore:
    """The store a URL names: none or `memory://`, in process; `redis://…` / `rediss://…`, in Redis."""
    if not url or url.startswith("memory://"):
        from services.gateway.control.local_store import LocalControlStore

        return LocalControlStore()
    if url.startswith(("redis://", "rediss://")):
        from services.gateway.control.redis_store import RedisControlStore

        return RedisControlStore(url)
    raise ValueError(f"unsupported control store {url!r}: use memory:// or redis://")


@dataclass
class ControlPlane:
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

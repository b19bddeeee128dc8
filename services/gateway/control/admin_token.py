"""The admin token: the operator's own (checked for strength) or one generated into MESHSERVE_HOME.

The admin token opens every key, budget and usage row; unlike a generated key it may be chosen by
a person, so a token that is surely weak stops the gateway before anything starts.
"""

from __future__ import annotations

import math
import os
import secrets
import tempfile
from pathlib import Path

from services.gateway.settings import ADMIN_TOKEN_FILE, GatewaySettings

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

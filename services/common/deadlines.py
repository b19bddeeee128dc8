"""The caller's deadline, carried through a request so that every downstream call shrinks to it."""

from __future__ import annotations

import contextvars
import time

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("meshserve_deadline", default=None)


def set_absolute(deadline_monotonic: float | None) -> contextvars.Token:
    return _deadline.set(deadline_monotonic)


def set_from_grpc(context) -> contextvars.Token:
    """Adopt the deadline of an incoming gRPC call (None when the caller set none)."""
    remaining = context.time_remaining()
    return _deadline.set(time.monotonic() + remaining if remaining is not None else None)


def reset(token: contextvars.Token) -> None:
    try:
        _deadline.reset(token)
    except ValueError:  # reset from another context (a resumed stream): nothing to undo there
        pass


def timeout_for(default_s: float) -> float:
    """Seconds a downstream call may take: the default, shrunk to the caller's remaining time."""
    deadline = _deadline.get()
    if deadline is None:
        return default_s
    return max(0.001, min(default_s, deadline - time.monotonic()))

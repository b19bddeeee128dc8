"""Who asks and under which ids: the transport-neutral context every use case takes (REST routes
and the gRPC servicer build it; the service layer never sees a request object)."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.control.auth import Principal


@dataclass(slots=True)
class CallContext:
    """One caller's request: its principal (the key, or anonymous with auth off), the gateway's
    request id (the ledger row's), the route label metrics and the ledger record, and the
    caller's own request id when it sent one."""

    principal: Principal
    request_id: str
    route: str
    client_request_id: str | None = None

"""Operations endpoints: liveness (`/health`, `/healthz`), readiness of every downstream hop
(`/readyz`, red while draining) and the Prometheus metrics (`/metrics`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway.api.deps import services_of
from services.gateway.api.http_io import json_response

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness")
@router.get("/healthz", summary="Liveness", include_in_schema=False)
async def health():
    return json_response({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness of every downstream hop",
    responses={503: {"description": "Not ready, or draining: `{status, checks}` as for 200"}},
)
async def readyz(request: Request):
    if request.app.state.is_draining():
        return json_response({"status": "draining"}, 503, {"Retry-After": "1"})
    readiness = await services_of(request).models.readiness()
    status = 200 if readiness.ready else 503
    headers = None if readiness.ready else {"Retry-After": "1"}
    return json_response(
        {"status": "ready" if readiness.ready else "unavailable", "checks": readiness.checks}, status, headers
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

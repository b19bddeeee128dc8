"""Settings of the gateway (env prefix MESHSERVE_GATEWAY_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import CommonSettings, UpstreamSettings

ADMIN_TOKEN_FILE = "admin-token"  # in MESHSERVE_HOME, when MESHSERVE_ADMIN_TOKEN is not set


class GatewaySettings(CommonSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_GATEWAY_", extra="ignore")

    http_port: int = Field(8080, description="REST port (HF + OpenAI routes, /metrics, /docs).")
    grpc_port: int = Field(8081, description="Typed gRPC API port (meshserve.gateway.v1.GatewayService).")
    preprocess_address: str = Field("127.0.0.1:50051", description="host:port of the preprocess service.")
    inference_address: str = Field("127.0.0.1:8001", description="host:port of the KServe v2 inference service.")
    postprocess_address: str = Field("127.0.0.1:50052", description="host:port of the postprocess service.")
    providers_file: Path | None = Field(
        None,
        description="The inference providers (providers.yaml: remote OpenAI / TGI / TEI / HF servers beside the local "
        "mesh, routing policy, failover); unset: providers.yaml beside the catalog file; no file: only the local mesh.",
    )
    request_timeout_s: float = Field(60.0, description="Deadline of one request across every hop.")
    upstream_attempts: int = Field(3, description="Attempts per upstream call that fails UNAVAILABLE.")
    max_body_bytes: int = Field(
        8 * 1024 * 1024,
        description="Largest request body accepted (413 above); also the largest message of the gateway's gRPC API "
        "(RESOURCE_EXHAUSTED above).",
    )
    coalesce: bool = Field(
        True,
        description="Merge concurrent embeddings and text/image classification requests into shared pipeline calls.",
    )
    coalesce_max_rows: int = Field(32, description="Most texts or images in one merged call.")
    coalesce_max_in_flight: int = Field(
        3, ge=1, description="Merged calls of one model and parameters running at once (more overlap the stages)."
    )
    cache_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="HF `use_cache` response cache size in bytes; 0 turns it off."
    )
    cache_max_entry_bytes: int = Field(1024 * 1024, ge=0, description="Largest response the cache keeps.")
    cache_shared: bool = Field(
        False,
        description="One response cache for every API key (public data only: a key's X-Cache HIT then tells "
        "it that another key sent the same input); default: a cache per key.",
    )
    cache_ttl_s: float = Field(600.0, description="How long a cached HF response is reused.")
    readiness_cache_s: float = Field(1.0, description="How long a /readyz result is reused.")
    shutdown_grace_s: float = Field(20.0, description="How long in-flight requests may finish after SIGTERM.")

    auth: bool = Field(
        True,
        description="Require API keys; false (what --no-auth sets) turns keys, rate limits and budgets off and logs a "
        "warning: for experiments only.",
    )
    admin_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("MESHSERVE_ADMIN_TOKEN", "MESHSERVE_GATEWAY_ADMIN_TOKEN"),
        description="Token of the bootstrap admin key; unset: generated into MESHSERVE_HOME/admin-token.",
    )
    metrics_public: bool = Field(True, description="Serve /metrics without a token (false: needs `read`).")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of keys + usage ledger (default sqlite:///$MESHSERVE_HOME/gateway.db; Postgres: "
        "postgresql+psycopg://USER:PASSWORD@HOST:5432/DB).",
    )
    redis_url: str | None = Field(
        None,
        description="Redis URL (redis://host:6379/0) for rate-limit and budget state shared by replicas; unset: in process.",
    )
    ledger: bool = Field(True, description="Write one usage row per request.")
    ledger_writer_nice: int = Field(
        10, ge=0, le=19, description="CPU priority of the ledger's writer process below the gateway's (nice)."
    )
    key_refresh_s: float = Field(0.25, description="How often a replica checks the database for key changes.")
    max_header_bytes: int = Field(
        64 * 1024, gt=0, description="Largest request line + headers of one HTTP request (431 and close above)."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a request's headers may take to arrive, from the connection's start or the "
        "request's first byte; the connection is closed after it (slow or idle clients).",
    )
    keep_alive_timeout_s: float = Field(30.0, gt=0, description="An idle keep-alive HTTP connection closes after it.")
    max_connections: int = Field(
        1024,
        gt=0,
        description="Most HTTP connections (or requests in progress) at once; a request beyond gets 503 `overloaded` "
        "(JSON, Retry-After).",
    )

    @property
    def providers_path(self) -> Path:
        return self.providers_file if self.providers_file is not None else self.catalog.parent / "providers.yaml"

    def upstream(self, address: str) -> UpstreamSettings:
        return UpstreamSettings(address=address, timeout_s=self.request_timeout_s, max_attempts=self.upstream_attempts)

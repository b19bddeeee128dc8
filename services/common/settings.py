"""Settings shared by every service. Each service defines its own subclass with its own env prefix.

Nothing here reads the environment at import time: a settings object is built in `main()` (or by a
test) and passed in.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
# The built-in catalog ships inside the package (a checkout's ./catalog.yaml links to it), so a
# non-editable `pip install .` serves it too.
DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "catalog.yaml"

# Largest gRPC message between the services (the gateway's own gRPC API takes REST's 8 MiB body
# limit instead). Twice that external limit: an 8 MiB image body crosses gateway -> preprocess as
# one bytes field plus a few fields of framing, and preprocess answers with int64 ids + mask, 16
# bytes a token, up to max_items x max_length of the catalog (2048 x 256 x 16 = 8 MiB for
# all-MiniLM-L6-v2) plus tensor framing; inference and postprocess messages are chunks or pooled
# outputs of those, smaller still.
INTERNAL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def _shared(name: str) -> AliasChoices:
    """Env name of a field every service reads from the same variable (MESHSERVE_<NAME>), whatever
    the service's own prefix. (The bare name is no alias: it would match $HOME and $HOST.) The field
    name still works as a keyword argument (populate_by_name)."""
    return AliasChoices(f"MESHSERVE_{name.upper()}")


class CommonSettings(BaseSettings):
    """Fields every service has. Env: MESHSERVE_HOME, MESHSERVE_CATALOG, MESHSERVE_CATALOG_DIR, MESHSERVE_LOG_LEVEL, MESHSERVE_HOST."""

    model_config = SettingsConfigDict(env_prefix="MESHSERVE_", extra="ignore", populate_by_name=True)

    home: Path = Field(
        Path(".meshserve"),
        validation_alias=_shared("home"),
        description="State: the model store, databases, the admin token, the generated Triton repository.",
    )
    catalog: Path = Field(
        DEFAULT_CATALOG,
        validation_alias=_shared("catalog"),
        description="The model catalog (YAML); the built-in one ships in the package (a checkout's catalog.yaml links to it).",
    )
    catalog_dir: Path | None = Field(
        None,
        validation_alias=_shared("catalog_dir"),
        description="Added models, one entry per YAML file (**/*.yaml), served beside the catalog; "
        "unset: $MESHSERVE_HOME/catalog.d (`meshserve models add` writes there).",
    )
    log_level: str = Field(
        "INFO",
        validation_alias=_shared("log_level"),
        description="Root level of the JSON logs on stderr (with trace ids).",
    )
    host: str = Field("127.0.0.1", validation_alias=_shared("host"), description="Address the servers bind.")
    shutdown_grace_s: float = Field(10.0, description="How long in-flight calls may finish after SIGTERM.")
    drain_wait_s: float = Field(
        0.0, description="Time between NOT_SERVING and closing listeners, so that balancers notice."
    )

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def catalog_d(self) -> Path:
        """The folder of added entries: catalog_dir, else $MESHSERVE_HOME/catalog.d."""
        return self.catalog_dir if self.catalog_dir is not None else self.home / "catalog.d"


class GrpcServiceSettings(CommonSettings):
    """A gRPC service with a Prometheus endpoint."""

    grpc_port: int = Field(0, description="gRPC listen port (0 picks a free port).")
    metrics_port: int = Field(0, description="Prometheus /metrics HTTP port (0 picks a free port, -1 off).")
    max_message_bytes: int = Field(
        INTERNAL_MAX_MESSAGE_BYTES,
        gt=0,
        description="Largest gRPC message accepted or sent (RESOURCE_EXHAUSTED over): twice the gateway's body limit, "
        "room for an 8 MiB body plus framing and for the token tensors preprocess returns.",
    )
    service_token: SecretStr | None = Field(
        None,
        validation_alias=_shared("service_token"),
        description="The mesh's shared service token (MESHSERVE_SERVICE_TOKEN): when set, the stages refuse every "
        "call without it in the x-meshserve-service-token header, except health checks. `meshserve up` sets a "
        "random one per run.",
    )
    service_token_file: Path | None = Field(
        None,
        validation_alias=_shared("service_token_file"),
        description="A file holding the service token (MESHSERVE_SERVICE_TOKEN_FILE), read when service_token is unset.",
    )


class UpstreamSettings(BaseSettings):
    """Where one upstream gRPC service lives and how it is called."""

    model_config = SettingsConfigDict(extra="ignore")

    address: str = Field(..., description="host:port of the upstream gRPC service.")
    timeout_s: float = Field(30.0, description="Default deadline of one call when the caller sets none.")
    max_attempts: int = Field(3, description="Attempts for calls that fail UNAVAILABLE (grpc retry policy).")
    max_message_bytes: int = Field(
        INTERNAL_MAX_MESSAGE_BYTES, gt=0, description="Largest gRPC message sent to or accepted from the upstream."
    )
    service_token: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("service_token", "MESHSERVE_SERVICE_TOKEN"),
        description="The token sent to the upstream in x-meshserve-service-token (env MESHSERVE_SERVICE_TOKEN).",
    )
    service_token_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("service_token_file", "MESHSERVE_SERVICE_TOKEN_FILE"),
        description="A file holding that token, read when service_token is unset (env MESHSERVE_SERVICE_TOKEN_FILE).",
    )

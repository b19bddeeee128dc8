"""providers.yaml: the routing policy and the providers (the local mesh and remote servers) as
strict pydantic models, and `load_providers`, whose errors name the file and the field."""

from __future__ import annotations

import re
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common import money
from services.common.catalog import TASKS, PricingSpec
from services.gateway.providers.types import LOCAL, POLICIES

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Names a provider cannot take: policies, and the path segments of the gateway's own routes.
RESERVED = frozenset(
    {
        "auto",
        *POLICIES,
        "v1",
        "models",
        "api",
        "metrics",
        "admin",
        "docs",
        "health",
        "healthz",
        "readyz",
        "openapi.json",
        "rerank",
        "embed",
        "generate",
        "generate_stream",
        "info",
        "pipeline",
    }
)
KINDS = ("local", "openai", "tgi", "tei", "hf")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerSpec(_Strict):
    failures: int = Field(5, ge=1, description="Consecutive failures of a provider x model that open its breaker.")
    open_s: float = Field(10.0, gt=0, description="How long an open breaker refuses before a half-open probe.")
    half_open_probes: int = Field(1, ge=1, description="Concurrent probes a half-open breaker lets through.")


class RoutingSpec(_Strict):
    policy: Literal["fastest", "cheapest", "preferred"] = Field("fastest", description="The policy of a bare model id.")
    max_attempts: int = Field(3, ge=1, description="Attempts per request, all providers together.")
    budget_s: float = Field(30.0, gt=0, description="Time for all attempts (never beyond the request deadline).")
    backoff_base_s: float = Field(0.02, ge=0, description="Full-jitter backoff base before attempt k >= 2.")
    backoff_max_s: float = Field(1.0, ge=0)
    max_retry_after_s: float = Field(
        10.0, ge=0, description="A Retry-After up to this cools the provider that long; longer: it is treated as down."
    )
    ewma_alpha: float = Field(0.3, gt=0, le=1, description="Weight of the newest sample in the stats' EWMAs.")
    probe_after_s: float = Field(5.0, gt=0, description="`fastest`: a candidate unmeasured this long is probed.")
    breaker: BreakerSpec = BreakerSpec()


class Timeouts(_Strict):
    connect_s: float = Field(2.0, gt=0)
    first_byte_s: float = Field(30.0, gt=0, description="Response headers and the first streamed event.")
    total_s: float = Field(120.0, gt=0)


class ProviderModel(_Strict):
    """How a provider serves one model: its name upstream and what differs from the provider's defaults."""

    upstream: str | None = Field(None, description="The provider's name for the model; None: the meshserve id.")
    pricing: PricingSpec | None = None
    context_length: int | None = Field(None, gt=0)
    tasks: tuple[str, ...] = Field((), description="Required for a model that is not in the catalog.")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for task in v:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        return v


class ProviderSpec(_Strict):
    name: str
    kind: Literal["local", "openai", "tgi", "tei", "hf"]
    base_url: str | None = Field(None, description="openai: the /v1 root; tgi, tei, hf: the server root.")
    api_key_env: str | None = Field(None, description="The env var holding the API key (never the key itself).")
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Timeouts()
    max_concurrency: int = Field(64, ge=1)
    rpm: int | None = Field(None, ge=1, description="Requests per minute to this provider; None: unlimited.")
    pricing: PricingSpec | None = None
    context_length: int | None = Field(None, gt=0)
    # meshserve id -> ProviderModel; the file may give a string (the upstream name) or null (same name).
    # The local provider with no models serves every catalog model.
    models: dict[str, ProviderModel] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME.fullmatch(v):
            raise ValueError(f"provider name {v!r} must match {NAME.pattern}")
        if v in RESERVED:
            raise ValueError(f"provider name {v!r} is reserved; reserved: {', '.join(sorted(RESERVED))}")
        return v

    @field_validator("models", mode="before")
    @classmethod
    def _shorthand(cls, v: object) -> object:
        if not isinstance(v, dict):
            return v
        return {k: {"upstream": m} if isinstance(m, str) else ({} if m is None else m) for k, m in v.items()}

    @model_validator(mode="after")
    def _complete(self) -> ProviderSpec:
        if (self.name == LOCAL) != (self.kind == "local"):
            raise ValueError(f"provider {self.name!r}: kind 'local' is the provider named 'local' and only it")
        if self.kind == "local" and (self.pricing is not None or any(m.pricing for m in self.models.values())):
            raise ValueError("provider 'local': its prices are the catalog entries' `pricing`; set them there")
        if self.kind != "local" and not self.base_url:
            raise ValueError(f"provider {self.name!r}: base_url is required for kind {self.kind!r}")
        if self.kind != "local" and not self.models:
            raise ValueError(f"provider {self.name!r}: models must list at least one model")
        return self

    def upstream_name(self, model_id: str) -> str:
        model = self.models.get(model_id)
        return model.upstream if model is not None and model.upstream else model_id


class ProvidersConfig(_Strict):
    routing: RoutingSpec = RoutingSpec()
    providers: tuple[ProviderSpec, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> ProvidersConfig:
        seen: set[str] = set()
        for spec in self.providers:
            if spec.name in seen:
                raise ValueError(f"provider name {spec.name!r} is used twice")
            seen.add(spec.name)
        return self

    @property
    def remote(self) -> tuple[ProviderSpec, ...]:
        return tuple(p for p in self.providers if p.kind != "local")

    def check_models(self, catalog_ids: Collection[str]) -> None:
        """Models outside the catalog must say their tasks; the local provider serves catalog models
        only. ValueError names the field (providers.<i>.models.<id>...)."""
        for i, spec in enumerate(self.providers):
            for model_id, model in spec.models.items():
                where = f"providers.{i}.models.{model_id}"
                if model_id in catalog_ids:
                    continue
                if spec.kind == "local":
                    raise ValueError(f"{where}: the local provider serves catalog models only; {model_id!r} is not one")
                if not model.tasks:
                    raise ValueError(f"{where}.tasks: a model that is not in the catalog must list its tasks")


def _readable(exc: ValidationError) -> str:
    """pydantic's errors on one line: `field.path: message; ...`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "file"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def load_providers(path: Path, *, catalog_ids: Collection[str] | None = None) -> ProvidersConfig:
    """The providers file; a missing file is a config with no providers (only the local mesh).
    A bad file raises ValueError naming the file and the field, on one line. With `catalog_ids`
    the models are checked against the catalog too (ProvidersConfig.check_models)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ProvidersConfig()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the providers file: {exc}") from None
    try:
        data = money.load_yaml(text)  # prices exactly as written, as the catalog reads them
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return ProvidersConfig()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a providers file holds one YAML mapping (routing, providers)")
    try:
        config = ProvidersConfig.model_validate(data)
        if catalog_ids is not None:
            config.check_models(catalog_ids)
    except ValidationError as exc:
        raise ValueError(f"{path}: {_readable(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return config

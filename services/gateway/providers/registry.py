"""Which providers serve which model for which op: parsing `id[:provider|:policy]`, the ordered
candidates of a request (policy, key restrictions, unhealthy ones last), Retry-After cooldowns and
the per-provider data of /v1/models."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.catalog import Catalog, ModelEntry, PricingSpec
from services.common.errors import ErrorCode, MeshError
from services.gateway.providers.breaker import OPEN, Breakers
from services.gateway.providers.config import ProviderModel, ProvidersConfig, ProviderSpec
from services.gateway.providers.gate import ProviderGates
from services.gateway.providers.policies import rank
from services.gateway.providers.stats import ProviderStats
from services.gateway.providers.types import LOCAL, POLICIES, Candidate

# The ops each kind of provider serves (see the design's table).
OPS: dict[str, frozenset[str]] = {
    "local": frozenset({"chat", "completion", "embed", "rerank", "task"}),
    "openai": frozenset({"chat", "completion", "embed"}),
    "tgi": frozenset({"chat", "completion"}),
    "tei": frozenset({"embed", "rerank"}),
    "hf": frozenset({"chat", "completion", "embed", "task"}),
}
_TASK_OPS = {
    "text-generation": ("chat", "completion"),
    "feature-extraction": ("embed",),
    "sentence-similarity": ("embed",),
    "text-ranking": ("rerank",),
}
_ZERO = PricingSpec()


def ops_of(tasks: Iterable[str]) -> frozenset[str]:
    """The ops a model's tasks allow: every task can run as `task`, some as more."""
    ops = {"task"}
    for task in tasks:
        ops.update(_TASK_OPS.get(task, ()))
    return frozenset(ops)


def default_op(task: str) -> str:
    return _TASK_OPS.get(task, ("task",))[0]


@dataclass(frozen=True, slots=True)
class RemoteModel:
    """A model only remote providers serve; quacks like a ModelEntry where metering and listings need it."""

    id: str
    tasks: tuple[str, ...]
    pricing: PricingSpec = _ZERO
    context_length: int | None = None

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def owned_by(self) -> str:
        return self.id.split("/", 1)[0] if "/" in self.id else "meshserve"


@dataclass(frozen=True, slots=True)
class Selection:
    """The candidates of one request, in the order to try them (unhealthy ones last)."""

    model_id: str
    candidates: tuple[Candidate, ...]
    explicit: bool  # a provider was named: only it is tried
    policy: str


def local_only(selection: Selection) -> bool:
    """The common case: the local mesh is the only candidate (the routes keep their local path)."""
    return len(selection.candidates) == 1 and selection.candidates[0].provider == LOCAL


def _local_context(entry: ModelEntry) -> int | None:
    pre = entry.preprocess
    return pre.max_total_tokens or pre.max_length


class ProviderRegistry:
    """The providers of every model, built once from the config and the catalog."""

    def __init__(
        self,
        config: ProvidersConfig,
        catalog: Catalog,
        *,
        stats: ProviderStats | None = None,
        breakers: Breakers | None = None,
        gates: ProviderGates | None = None,
    ) -> None:
        self.config = config
        self.routing = config.routing
        self.catalog = catalog
        catalog_ids = {m.id for m in catalog.models}
        config.check_models(catalog_ids)
        self.stats = stats or ProviderStats(config.routing.ewma_alpha)
        self.breakers = breakers or Breakers(config.routing.breaker)
        self.gates = gates or ProviderGates(config.providers)
        self.specs = self._ordered_specs(config)
        self.kinds = {spec.name: spec.kind for spec in self.specs}
        self.names = tuple(spec.name for spec in self.specs)
        self._cooled: dict[tuple[str, str], float] = {}
        self.remote_models = self._remote_models(catalog_ids)
        # (model id, op) -> candidates in preferred order, with the ops each (provider, model) serves.
        self._by_model: dict[str, tuple[tuple[Candidate, frozenset[str]], ...]] = self._candidates_by_model()
        self._by_op: dict[tuple[str, str], tuple[Candidate, ...]] = {}
        for model_id, served in self._by_model.items():
            for op in ("chat", "completion", "embed", "rerank", "task"):
                self._by_op[(model_id, op)] = tuple(c for c, ops in served if op in ops)
        self._single: dict[tuple[str, str], Selection] = {}

    @staticmethod
    def _ordered_specs(config: ProvidersConfig) -> tuple[ProviderSpec, ...]:
        specs = config.providers
        if not any(spec.kind == "local" for spec in specs):
            specs = (ProviderSpec(name=LOCAL, kind="local"), *specs)
        return specs

    def _remote_models(self, catalog_ids: set[str]) -> dict[str, RemoteModel]:
        """The models outside the catalog: tasks from the first provider that lists them."""
        found: dict[str, RemoteModel] = {}
        for spec in self.specs:
            for model_id, model in spec.models.items():
                if model_id in catalog_ids or model_id in found:
                    continue
                found[model_id] = RemoteModel(
                    id=model_id,
                    tasks=model.tasks,
                    pricing=model.pricing or spec.pricing or _ZERO,
                    context_length=model.context_length or spec.context_length,
                )
        return found

    def _candidate(self, spec: ProviderSpec, model_id: str, model: ProviderModel | None) -> Candidate:
        entry = None if spec.kind != "local" else self.catalog.get(model_id)
        pricing = (model and model.pricing) or spec.pricing or (entry.pricing if entry is not None else _ZERO)
        context = (model and model.context_length) or spec.context_length
        if context is None and entry is not None:
            context = _local_context(entry)
        upstream = (model and model.upstream) or model_id
        return Candidate(spec.name, spec.kind, model_id, upstream, pricing, context)

    def _candidates_by_model(self) -> dict[str, tuple[tuple[Candidate, frozenset[str]], ...]]:
        served: dict[str, list[tuple[Candidate, frozenset[str]]]] = {}
        for spec in self.specs:
            if spec.kind == "local" and not spec.models:
                models: dict[str, ProviderModel | None] = {m.id: None for m in self.catalog.models}
            else:
                models = dict(spec.models)
            for model_id, model in models.items():
                tasks = (model and model.tasks) or self.model(model_id).tasks
                ops = ops_of(tasks) & OPS[spec.kind]
                served.setdefault(model_id, []).append((self._candidate(spec, model_id, model), ops))
        return {model_id: tuple(items) for model_id, items in served.items()}

    # -- lookups -------------------------------------------------------------------------------
    def known(self, model_id: str) -> bool:
        return model_id in self._by_model or model_id in self.remote_models

    def model(self, model_id: str) -> ModelEntry | RemoteModel:
        """The catalog entry, or the RemoteModel of a model only remote providers serve."""
        remote = self.remote_models.get(model_id)
        return remote if remote is not None else self.catalog.get(model_id)

    def model_ids(self) -> list[str]:
        return [m.id for m in self.catalog.models if m.id in self._by_model] + list(self.remote_models)

    def providers_of(self, model_id: str) -> tuple[str, ...]:
        return tuple(c.provider for c, _ops in self._by_model.get(model_id, ()))

    def spec(self, provider: str) -> ProviderSpec:
        for spec in self.specs:
            if spec.name == provider:
                return spec
        raise MeshError(ErrorCode.NOT_FOUND, f"unknown provider {provider!r}; providers: {', '.join(self.names)}")

    # -- parsing --------------------------------------------------------------------------------
    def parse(self, model: str) -> tuple[str, str | None, str | None]:
        """`id`, `id:provider` or `id:policy` (auto: the default policy) -> (model id, provider, policy)."""
        if self.known(model):
            return model, None, None
        base, sep, suffix = model.rpartition(":")
        if not sep or not self.known(base):
            raise MeshError(ErrorCode.MODEL_NOT_FOUND, f"Model {model!r} does not exist", param="model")
        if suffix in self.kinds:
            return base, suffix, None
        if suffix in POLICIES:
            return base, None, suffix
        if suffix == "auto":
            return base, None, self.routing.policy
        raise MeshError(
            ErrorCode.INVALID_INPUT,
            f"unknown provider or policy {suffix!r} in model {model!r}; providers: {', '.join(self.names)}; "
            f"policies: auto, {', '.join(POLICIES)}",
            param="model",
        )

    # -- selection ------------------------------------------------------------------------------

    def _unserved(self, model_id: str, op: str) -> str:
        """Why a model cannot serve an op, with the tasks it does serve."""
        what = "does not generate text" if op in ("chat", "completion") else f"does not serve {op}"
        tasks = self.model(model_id).tasks
        return f"Model {model_id!r} {what}; it serves: {', '.join(tasks)}"

    def candidates(
        self,
        model_id: str,
        op: str,
        *,
        provider: str | None = None,
        policy: str | None = None,
        allowed: frozenset[str] | None = None,
    ) -> Selection:
        """The providers to try for `model_id` and `op`, in order: the policy's order with breaker-open,
        cooled and saturated ones moved to the end (the attempt loop skips those while it can)."""
        policy = policy or self.routing.policy
        served = self._by_op.get((model_id, op))
        if served is None:
            if not self.known(model_id):
                raise MeshError(ErrorCode.MODEL_NOT_FOUND, f"Model {model_id!r} does not exist", param="model")
            served = ()
        if provider is not None:
            return self._explicit(model_id, op, provider, served, allowed, policy)
        if not served:
            raise MeshError(ErrorCode.UNSUPPORTED_TASK, self._unserved(model_id, op), param="model")
        if len(served) == 1 and (allowed is None or served[0].provider in allowed):
            return self._single_selection(model_id, op, served, policy)
        if allowed is not None:
            served = tuple(c for c in served if c.provider in allowed)
            if not served:
                raise self._denied(model_id, op, allowed)
            if len(served) == 1:
                return Selection(model_id, served, False, policy)
        ranked = rank(served, policy, self.stats, op, probe_after_s=self.routing.probe_after_s)
        return Selection(model_id, self._healthy_first(ranked), False, policy)

    def _single_selection(self, model_id: str, op: str, served: tuple[Candidate, ...], policy: str) -> Selection:
        key = (model_id, op, policy)
        selection = self._single.get(key)
        if selection is None:
            selection = self._single[key] = Selection(model_id, served, False, policy)
        return selection

    def _denied(self, model_id: str, op: str, allowed: frozenset[str]) -> MeshError:
        theirs = ", ".join(c.provider for c in self._by_op.get((model_id, op), ()))
        return MeshError(
            ErrorCode.PERMISSION_DENIED,
            f"this key may not use the providers of model {model_id!r} ({theirs}); "
            f"it allows: {', '.join(sorted(allowed)) or 'none'}",
            param="model",
        )

    def _explicit(
        self,
        model_id: str,
        op: str,
        provider: str,
        served: tuple[Candidate, ...],
        allowed: frozenset[str] | None,
        policy: str,
    ) -> Selection:
        if provider not in self.kinds:
            raise MeshError(
                ErrorCode.INVALID_INPUT,
                f"unknown provider {provider!r}; providers: {', '.join(self.names)}",
                param="model",
            )
        if allowed is not None and provider not in allowed:
            raise MeshError(
                ErrorCode.PERMISSION_DENIED,
                f"this key may not use provider {provider!r}; it allows: {', '.join(sorted(allowed)) or 'none'}",
                param="model",
            )
        chosen = tuple(c for c in served if c.provider == provider)
        if chosen:
            return Selection(model_id, chosen, True, policy)
        if provider in self.providers_of(model_id):
            theirs = ", ".join(c.provider for c in served) or "none"
            raise MeshError(
                ErrorCode.UNSUPPORTED_TASK,
                f"provider {provider!r} does not serve model {model_id!r} for {op}; its providers for {op}: {theirs}",
                param="model",
            )
        raise MeshError(
            ErrorCode.INVALID_INPUT,
            f"provider {provider!r} does not serve model {model_id!r}; its providers: "
            f"{', '.join(self.providers_of(model_id)) or 'none'}",
            param="model",
        )

    def unavailable(self, c: Candidate, now: float | None = None) -> bool:
        """Breaker open, cooled by a Retry-After, or its gate full."""
        return (
            self.breakers.refuses(c.provider, c.model_id)
            or self.cooled_for(c.provider, c.model_id, now) > 0
            or self.gates.saturated(c.provider)
        )

    def _healthy_first(self, ranked: list[Candidate]) -> tuple[Candidate, ...]:
        now = time.monotonic()
        down = [c for c in ranked if self.unavailable(c, now)]
        if not down:
            return tuple(ranked)
        return tuple(c for c in ranked if c not in down) + tuple(down)

    # -- Retry-After cooldowns --------------------------------------------------------------------
    def cool(self, provider: str, model: str, until: float) -> None:
        """Skip this provider x model until `until` (time.monotonic()): it sent a Retry-After."""
        key = (provider, model)
        if until > self._cooled.get(key, 0.0):
            self._cooled[key] = until

    def cooled_for(self, provider: str, model: str, now: float | None = None) -> float:
        """Seconds this provider x model stays cooled (0: not cooled)."""
        if not self._cooled:
            return 0.0
        until = self._cooled.get((provider, model))
        if until is None:
            return 0.0
        left = until - (time.monotonic() if now is None else now)
        if left <= 0:
            del self._cooled[(provider, model)]
            return 0.0
        return left

    # -- listing ----------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """Per model: id, owned_by, tasks and its providers (HF router's shape of /v1/models data)."""
        listed = []
        for model_id in self.model_ids():
            entry = self.model(model_id)
            op = default_op(entry.default_task)
            pool = self._by_op.get((model_id, op)) or ()
            order = rank(pool, self.routing.policy, self.stats, op, probe=False) if pool else []
            default = self._healthy_first(order)[0] if order else None
            providers = [self._listing(c, op, c == default) for c, _ops in self._by_model[model_id]]
            listed.append(
                {
                    "id": model_id,
                    "owned_by": entry.owned_by,
                    "tasks": list(entry.tasks),
                    "providers": providers,
                }
            )
        return listed

    def _listing(self, c: Candidate, op: str, is_default: bool) -> dict:
        s = self.stats.sample(c.provider, c.model_id)
        if self.breakers.state(c.provider, c.model_id) == OPEN:
            status = "error"
        elif self.cooled_for(c.provider, c.model_id) > 0:
            status = "cooling"
        else:
            status = "live"
        return {
            "provider": c.provider,
            "kind": c.kind,
            "status": status,
            "context_length": c.context_length,
            "pricing": {
                "input": c.pricing.input_per_1k_tokens_usd * 1000,
                "output": c.pricing.output_per_1k_tokens_usd * 1000,
            },
            "latency_s": s.latency_s if s else None,
            "ttft_s": s.ttft_s if s else None,
            "throughput": s.tokens_per_s if s else None,
            "error_rate": s.error_rate if s and s.count else None,
            "is_default": is_default,
        }

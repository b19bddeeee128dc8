"""Inference providers: the local mesh and remote OpenAI / TGI / TEI / HF-compatible servers behind
one model id; selection policies, live health (EWMA stats, circuit breakers), and failover that is
safe for streams and money. Imports neither the pipeline nor the control plane: the service layer
(service/routing.py) joins them. `Providers` is the one object the gateway builds and holds."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from services.common.catalog import Catalog
from services.common.errors import ErrorCode, MeshError
from services.gateway.providers.config import ProvidersConfig, RoutingSpec, load_providers
from services.gateway.providers.failover import attempt_each
from services.gateway.providers.registry import ProviderRegistry, Selection
from services.gateway.providers.types import Attempt, Candidate

if TYPE_CHECKING:
    from services.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class Providers:
    """The providers of this gateway: registry (selection), stats, breakers, gates, and one
    upstream client per remote provider."""

    def __init__(self, config: ProvidersConfig, registry: ProviderRegistry, upstreams: dict[str, Any]) -> None:
        self.config = config
        self.routing: RoutingSpec = config.routing
        self.registry = registry
        self.stats = registry.stats
        self.breakers = registry.breakers
        self.gates = registry.gates
        self._upstreams = upstreams
        # True when a remote provider is configured; False: every request takes the local path.
        self.active = bool(config.remote)

    @classmethod
    def build(cls, settings: GatewaySettings, catalog: Catalog) -> Providers:
        """From settings.providers_path (a missing file: only the local mesh). ValueError on a bad file."""
        path = settings.providers_path
        config = load_providers(path, catalog_ids={m.id for m in catalog.models})
        return cls.from_config(config, catalog)

    @classmethod
    def from_config(cls, config: ProvidersConfig, catalog: Catalog) -> Providers:
        registry = ProviderRegistry(config, catalog)
        upstreams: dict[str, Any] = {}
        if config.remote:
            # Imported here: the adapters (aiohttp) are needed only when a remote provider is configured.
            from services.gateway.providers.upstreams import make_upstream

            upstreams = {spec.name: make_upstream(spec) for spec in config.remote}
            log.info("providers: %s", ", ".join(f"{s.name} ({s.kind})" for s in config.remote))
        return cls(config, registry, upstreams)

    def upstream(self, name: str) -> Any:
        """The upstream client of a remote provider (an `upstreams.Upstream`)."""
        try:
            return self._upstreams[name]
        except KeyError:
            raise MeshError(ErrorCode.INTERNAL, f"provider {name!r} has no upstream client") from None

    async def attempt(
        self,
        selection: Selection,
        call: Callable[[Candidate], Awaitable[T]],
        *,
        deadline: float,
        op: str,
        hold: bool = False,
    ) -> tuple[T, Candidate, list[Attempt]] | tuple[T, Candidate, list[Attempt], Callable[[], None]]:
        """failover.attempt_each over this gateway's registry, stats, breakers and gates: (result,
        candidate, attempts), plus `leave` (frees the gate slot at the stream's end) when `hold`."""
        return await attempt_each(
            selection,
            call,
            routing=self.routing,
            deadline=deadline,
            registry=self.registry,
            stats=self.stats,
            breakers=self.breakers,
            gates=self.gates,
            op=op,
            hold=hold,
        )

    async def close(self) -> None:
        """Close every upstream client (their HTTP sessions)."""
        for name, upstream in self._upstreams.items():
            closer = getattr(upstream, "close", None) or getattr(upstream, "aclose", None)
            if closer is None:
                continue
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.warning("provider %s: closing its client failed", name, exc_info=True)

"""The gateway's use cases, one module per request kind (predict, embed, generate, admin): the one
place a request is authorized, admitted, run and settled; `routing` puts a request's model on its
providers (the local mesh alone keeps those use cases, remote ones run there). Every transport
(REST routes, the gRPC servicer) calls them; they know nothing of HTTP or gRPC. `GatewayServices`
builds them together."""

from __future__ import annotations

from dataclasses import dataclass

from services.gateway.control.plane import ControlPlane
from services.gateway.pipeline.cache import ResponseCache
from services.gateway.pipeline.coalescer import RequestCoalescer
from services.gateway.pipeline.runner import Pipeline
from services.gateway.providers import Providers
from services.gateway.providers.config import ProvidersConfig
from services.gateway.service.admin import AdminService
from services.gateway.service.embed import EmbedService
from services.gateway.service.generate import GenerateService
from services.gateway.service.models import ModelDirectory
from services.gateway.service.predict import PredictService
from services.gateway.service.routing import RoutingService
from services.gateway.service.tokenize import TokenizeService
from services.gateway.settings import GatewaySettings


@dataclass(frozen=True)
class GatewayServices:
    models: ModelDirectory
    predict: PredictService
    embed: EmbedService
    generate: GenerateService
    admin: AdminService
    routing: RoutingService
    tokenize: TokenizeService

    @classmethod
    def build(
        cls,
        settings: GatewaySettings,
        pipeline: Pipeline,
        *,
        control: ControlPlane | None = None,
        coalescer: RequestCoalescer | None = None,
        providers: Providers | None = None,
    ) -> GatewayServices:
        """The use cases over one pipeline and control plane (default: the disabled one, no keys,
        limits or ledger); `coalescer`: merge concurrent row-wise text requests; `providers`: the
        remote providers beside the local mesh (default: none, the local mesh alone)."""
        control = control or ControlPlane.disabled(settings)
        metering = control.metering
        cache = ResponseCache(
            max_bytes=settings.cache_max_bytes,
            max_entry_bytes=settings.cache_max_entry_bytes,
            ttl_s=settings.cache_ttl_s,
            shared=settings.cache_shared,
        )
        embed = EmbedService(pipeline, metering, coalescer)
        predict = PredictService(pipeline, metering, cache, embed, coalescer)
        generate = GenerateService(pipeline, metering)
        if providers is None:
            providers = Providers.from_config(ProvidersConfig(), pipeline.catalog)
        routing = RoutingService(
            providers, pipeline.catalog, metering, embed, generate, predict, timeout_s=settings.request_timeout_s
        )
        return cls(
            models=ModelDirectory(pipeline),
            predict=predict,
            embed=embed,
            generate=generate,
            admin=AdminService(control),
            routing=routing,
            tokenize=TokenizeService(pipeline),
        )

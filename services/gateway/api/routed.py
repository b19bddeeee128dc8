"""The routes' side of the provider layer: a request's model (`id`, `id:provider`, `id:policy`, or
a per-provider path's provider) routed by the service layer, the op an HF task is, the headers a
routed answer carries, and a per-provider path's provider checked (404 naming the providers)."""

from __future__ import annotations

from fastapi import Request

from services.common.catalog import GENERATION_TASKS
from services.common.errors import ErrorCode, MeshError
from services.gateway.service.context import CallContext

# The op an HF task request is (design17.md's table); every other task is "task".
TASK_OPS = {"feature-extraction": "embed", **{task: "completion" for task in GENERATION_TASKS}}
PROVIDER_HEADER = "X-Meshserve-Provider"
ATTEMPTS_HEADER = "X-Meshserve-Attempts"


def route(request: Request, ctx: CallContext, model: str | None, op: str, provider: str | None = None):
    """The service layer's Route for `model` (its suffix parsed there) and the op; the request's
    model label is the id without the suffix."""
    found = request.app.state.services.routing.route(model, op, provider=provider, principal=ctx.principal)
    request.state.model = found.model_id
    return found


def op_of(task: str | None) -> str:
    return TASK_OPS.get(task, "task") if task else "task"


def routed_headers(metered) -> dict[str, str]:
    """Who answered a routed request and after how many attempts."""
    return {PROVIDER_HEADER: metered.provider, ATTEMPTS_HEADER: str(metered.attempts)}


def registry_of(services):
    """The provider registry the routing service selects with (parse, names, the listing)."""
    return services.routing.registry


def default_task(services, model: str) -> str:
    """The task a model URL without one runs: the model's default (`model` may carry a suffix)."""
    return services.routing.default_task(model)


def provider_names(request: Request) -> tuple[str, ...]:
    """Every provider's name, `local` included, in the file's order."""
    return request.app.state.services.routing.provider_names()


def check_provider(request: Request, provider: str) -> str:
    """A per-provider path's provider; an unknown one is a missing route (404) naming the known ones."""
    names = provider_names(request)
    if provider not in names:
        raise MeshError(
            ErrorCode.NOT_FOUND,
            f"no provider {provider!r} here: {request.method} {request.url.path}; providers: {', '.join(names)}",
            param="provider",
        )
    return provider


async def start_generation(request: Request, ctx: CallContext, found, gen, op: str, stream: bool):
    """The route's started generation and the headers it adds: the local mesh's (none), or a
    routed one (the attempt loop done, its first delta in hand) with the provider's."""
    services = request.app.state.services
    if found.local_only:
        service = services.generate
        return await service.start(ctx, service.entry(found.model_id), gen), None
    generation = await services.routing.start(ctx, found, gen, op, stream)
    return generation, routed_headers(generation.metered)

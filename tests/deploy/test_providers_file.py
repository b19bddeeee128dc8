"""The providers.yaml the Kubernetes base ships (the meshserve-providers ConfigMap) is one the
gateway loads: as shipped, only the local mesh serves."""

from __future__ import annotations

from services.common.catalog import Catalog
from services.common.settings import REPO_ROOT
from services.gateway.providers.config import load_providers
from services.gateway.providers.registry import ProviderRegistry

SHIPPED = REPO_ROOT / "deploy" / "k8s" / "base" / "providers.yaml"


def test_the_shipped_providers_file_loads_with_the_local_mesh_only():
    catalog = Catalog.load(REPO_ROOT / "catalog.yaml")
    config = load_providers(SHIPPED, catalog_ids={m.id for m in catalog.models})
    registry = ProviderRegistry(config, catalog)
    selection = registry.candidates("meshserve/tiny-llama-chat", "chat")
    assert [c.provider for c in selection.candidates] == ["local"]
    assert config.routing.policy == "fastest"

"""Settings of the postprocess service (env prefix MESHSERVE_POSTPROCESS_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import GrpcServiceSettings


class PostprocessSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_POSTPROCESS_", extra="ignore")

    grpc_port: int = Field(50052, description="gRPC port.")
    metrics_port: int = Field(9102, description="Prometheus /metrics port.")

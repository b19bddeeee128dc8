"""Settings of the preprocess service (env prefix MESHSERVE_PREPROCESS_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import GrpcServiceSettings


class PreprocessSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_PREPROCESS_", extra="ignore")

    grpc_port: int = Field(50051, description="gRPC port.")
    metrics_port: int = Field(9101, description="Prometheus /metrics port.")

"""Settings of the inference service (env prefix MESHSERVE_INFERENCE_)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import GrpcServiceSettings


class InferenceSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_INFERENCE_", extra="ignore")

    grpc_port: int = Field(8001, description="KServe v2 gRPC port (Triton's default).")
    metrics_port: int = Field(8002, description="Prometheus /metrics port (Triton's default).")
    models: list[str] = Field(
        default_factory=list, description="Inference names to load at start; empty loads the whole catalog."
    )
    strict_readiness: bool = Field(True, description="ServerReady only when every model is READY (Triton's default).")

"""Settings of the inference service (env prefix MESHSERVE_INFERENCE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import GrpcServiceSettings


class InferenceSettings(GrpcServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESHSERVE_INFERENCE_", extra="ignore")

    grpc_port: int = Field(8001, description="KServe v2 gRPC port (Triton's default).")
    metrics_port: int = Field(8002, description="Prometheus /metrics port (Triton's default).")
    http_port: int = Field(
        8000,
        description="KServe v2 HTTP/REST port with Triton's extensions (Triton's default; 0 picks a free port on the "
        "embedded backend, -1 off). The service token applies as on gRPC, health excepted.",
    )
    models: list[str] = Field(
        default_factory=list, description="Inference names to load at start; empty loads the whole catalog."
    )
    strict_readiness: bool = Field(True, description="ServerReady only when every model is READY (Triton's default).")
    backend: Literal["embedded", "triton"] = Field(
        "embedded",
        description="embedded: our torch runtime; triton: a real tritonserver on the same ports (what "
        "`meshserve up --backend` sets).",
    )
    triton_binary: Path | None = Field(
        None, description="tritonserver to run; default: the one in the nvidia-pytriton wheel."
    )
    triton_exit_timeout_s: int = Field(20, description="Triton's --exit-timeout-secs (drain time on SIGTERM).")
    triton_ready_timeout_s: float = Field(180.0, description="How long Triton may take to become ready.")
    triton_log_verbose: int = Field(0, description="Triton's --log-verbose level.")
    triton_trace_url: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint for Triton's OpenTelemetry trace mode (e.g. http://host:4318/v1/traces).",
    )
    lean_decode: bool = Field(
        True,
        description="Decode steps of Llama, Mistral and Qwen2 causal LMs run a lean forward built from the model's own "
        "weights (fused projections, no per-layer module dispatch; same tokens as the HF forward); false: the HF "
        "forward (A/B). Other architectures always use the HF forward.",
    )

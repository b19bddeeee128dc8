"""Fixtures of the end-to-end tests that talk to the gateway's typed gRPC API."""

from __future__ import annotations

import grpc
import pytest
from meshserve.gateway.v1 import gateway_pb2_grpc


@pytest.fixture
def stub(mesh):
    """A GatewayService stub on the mesh's gRPC port."""
    channel = grpc.insecure_channel(mesh.grpc_target)
    yield gateway_pb2_grpc.GatewayServiceStub(channel)
    channel.close()

"""The gateway's generation stream reports a downstream refusal with the refusing stage's own status,
through a real postprocess server (its catalog and detokenizers, port 0)."""

from __future__ import annotations

import pytest
from meshserve.postprocess.v1 import postprocess_pb2

from services.common.clients import PostprocessClient
from services.common.errors import ErrorCode, MeshError
from services.common.settings import REPO_ROOT, UpstreamSettings
from services.gateway.pipeline.generation import Generator
from services.postprocess.main import create
from services.postprocess.settings import PostprocessSettings

LM = "meshserve/tiny-llama-chat"


@pytest.fixture
async def postprocess(models_dir):
    settings = PostprocessSettings(
        host="127.0.0.1", grpc_port=0, metrics_port=-1, catalog=REPO_ROOT / "catalog.yaml", home=models_dir.parent
    )
    running = await create(settings)
    client = PostprocessClient(UpstreamSettings(address=f"127.0.0.1:{running.port}", timeout_s=30))
    yield client
    await client.close()
    await running.stop(0)


async def test_a_refused_detokenize_start_reports_postprocess_s_status_not_a_dead_stream(postprocess):
    """Postprocess refuses a start it cannot serve and ends the call; the gateway's next write on that
    call used to raise asyncio.InvalidStateError, a 500 with no word of the cause."""
    generator = Generator(None, None, postprocess)
    detok = postprocess.detokenize()
    try:
        start = postprocess_pb2.DetokenizeStart(model_id=LM, stop=[f"stop {i}" for i in range(17)])
        await generator._send(detok, postprocess_pb2.DetokenizeRequest(start=start))
        assert await detok.code() is not None  # postprocess has ended the call (its refusal)
        with pytest.raises(MeshError) as refused:
            await generator._detokenize(detok, [1], last=False)
    finally:
        detok.cancel()
    assert refused.value.code is ErrorCode.INVALID_INPUT
    assert "stop" in refused.value.message

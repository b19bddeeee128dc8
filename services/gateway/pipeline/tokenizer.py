"""Calls to preprocess's Tokenize and Detokenize (vLLM's /tokenize and /detokenize): the
tokenizers live in preprocess, the gateway has none. The calls go over the PreprocessClient's
channel and call helper (its deadline, retries and error mapping)."""

from __future__ import annotations

from meshserve.preprocess.v1 import preprocess_pb2, preprocess_pb2_grpc

from services.common.clients import PreprocessClient


class TokenizerCalls:
    """Tokenize and Detokenize on one preprocess upstream."""

    def __init__(self, client: PreprocessClient) -> None:
        self.client = client
        self._stub = preprocess_pb2_grpc.PreprocessServiceStub(client.channel)

    async def tokenize(self, request: preprocess_pb2.TokenizeRequest) -> preprocess_pb2.TokenizeResponse:
        return await self.client._call(self._stub.Tokenize, request)

    async def detokenize(self, request: preprocess_pb2.DetokenizeRequest) -> preprocess_pb2.DetokenizeResponse:
        return await self.client._call(self._stub.Detokenize, request)

"""The Python backend answers a request's outputs in the model config's order: Triton hands it the
requested names as a set, whose order differs between the processes of a model's instances, so two
identical requests answered by two instances would otherwise list their outputs differently."""

from __future__ import annotations

import pytest

from services.inference.triton_backend import TritonPythonModel


class Request:
    """The one method of Triton's request object that `_wanted` reads, with the names in a given order."""

    def __init__(self, names: list[str]):
        self.names = names

    def requested_output_names(self) -> list[str]:
        return self.names


@pytest.mark.parametrize(
    ("asked", "answered"),
    [
        (["token_embeddings", "embedding"], ["embedding", "token_embeddings"]),
        (["embedding", "token_embeddings"], ["embedding", "token_embeddings"]),
        (["token_embeddings"], ["token_embeddings"]),
        (["token_embeddings", "not-an-output"], ["token_embeddings"]),
        ([], ["embedding", "token_embeddings"]),
    ],
)
def test_outputs_follow_the_config_order_not_the_request_set(asked, answered):
    model = TritonPythonModel()
    model.outputs = ["embedding", "token_embeddings"]
    assert model._wanted(Request(asked)) == answered

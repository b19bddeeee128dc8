"""Tensor codecs and the gateway's zero-copy row chunking."""

from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import MeshError
from services.common.tensors import from_bytes, from_pb, to_pb
from services.gateway.pipeline.runner import split_rows


def test_tensor_round_trip_is_little_endian_and_exact():
    array = np.arange(12, dtype=">i8").reshape(3, 4)  # big-endian in, little-endian on the wire
    tensor = to_pb("x", array)
    assert tensor.datatype == "INT64" and list(tensor.shape) == [3, 4]
    assert tensor.raw[:8] == (0).to_bytes(8, "little") and tensor.raw[8:16] == (1).to_bytes(8, "little")
    np.testing.assert_array_equal(from_pb(tensor), array)


def test_byte_count_must_match_the_shape():
    with pytest.raises(MeshError) as err:
        from_bytes(b"\x00" * 7, "INT64", [1, 1], name="ids")
    assert "ids" in err.value.message


@pytest.mark.parametrize(("rows", "chunk"), [(1, 32), (32, 32), (33, 32), (75, 32), (5, 2)])
def test_split_rows_covers_every_row_in_order(rows, chunk):
    array = np.arange(rows * 3, dtype=np.int64).reshape(rows, 3)
    pieces = split_rows(to_pb("x", array), chunk)
    assert [shape[0] for shape, _ in pieces] == [min(chunk, rows - s) for s in range(0, rows, chunk)]
    joined = np.concatenate([np.frombuffer(bytes(raw), dtype=np.int64).reshape(shape) for shape, raw in pieces])
    np.testing.assert_array_equal(joined, array)

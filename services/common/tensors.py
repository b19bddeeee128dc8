"""Tensor codecs: numpy arrays <-> KServe v2 raw tensors and our `tasks.v1.Tensor`.

Tensors travel between services as raw little-endian bytes. Decoding uses `np.frombuffer`, so no
copy is made until a consumer needs a writable array.
"""

from __future__ import annotations

import numpy as np
from meshserve.tasks.v1 import tasks_pb2

from services.common.errors import invalid

# KServe v2 datatype -> little-endian numpy dtype (BYTES is handled separately: length-prefixed).
NP_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_OF = {dtype: name for name, dtype in NP_DTYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    try:
        return DATATYPE_OF[array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype]
    except KeyError:
        raise ValueError(f"no KServe datatype for numpy dtype {array.dtype}") from None


def to_bytes(array: np.ndarray) -> bytes:
    """Row-major little-endian bytes of an array."""
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def from_bytes(raw: bytes, datatype: str, shape: list[int] | tuple[int, ...], *, name: str = "") -> np.ndarray:
    """Decode raw contents; INVALID_INPUT when the byte count does not match the shape."""
    dtype = NP_DTYPES.get(datatype)
    if dtype is None:
        raise invalid(f"unsupported datatype {datatype!r} for tensor {name!r}")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if len(raw) != expected:
        raise invalid(
            f"tensor {name!r}: {len(raw)} bytes do not match shape {list(shape)} of {datatype} "
            f"({expected} bytes expected)"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def to_pb(name: str, array: np.ndarray) -> tasks_pb2.Tensor:
    return tasks_pb2.Tensor(name=name, datatype=datatype_of(array), shape=array.shape, raw=to_bytes(array))


def from_pb(tensor: tasks_pb2.Tensor) -> np.ndarray:
    return from_bytes(tensor.raw, tensor.datatype, list(tensor.shape), name=tensor.name)

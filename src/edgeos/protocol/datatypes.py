"""Tensor datatypes of the Open Inference Protocol (KServe V2) and their equivalents.

One table maps each V2 datatype to its numpy dtype, its ONNX element type and the type
string ONNX Runtime reports, so every layer converts through the same facts.

The table names numpy dtypes rather than holding them: manifests import this module, and
a node that serves no tensors must not pay for numpy (about 12 MB resident). The dtype is
made on first use, when whoever asks for it is handling arrays and has numpy loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np

Datatype = Literal[
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]


@dataclass(frozen=True)
class DatatypeInfo:
    """How one V2 datatype is held in numpy, ONNX and ONNX Runtime."""

    name: Datatype
    numpy_name: str
    onnx_elem_type: int
    ort_type: str
    #: Bytes per element in the binary tensor extension (0: variable, for BYTES).
    itemsize: int

    @cached_property
    def numpy(self) -> np.dtype[np.generic]:
        """The numpy dtype (made once; after that a plain attribute read on the hot path)."""
        import numpy as np

        return np.dtype(self.numpy_name)


def _info(name: Datatype, dtype: str, onnx_elem: int, ort: str, itemsize: int) -> DatatypeInfo:
    return DatatypeInfo(name, dtype, onnx_elem, f"tensor({ort})", itemsize)


# ONNX element type numbers are from onnx.TensorProto.DataType (stable by the ONNX spec).
DATATYPES: dict[str, DatatypeInfo] = {
    info.name: info
    for info in (
        _info("BOOL", "bool", 9, "bool", 1),
        _info("UINT8", "uint8", 2, "uint8", 1),
        _info("UINT16", "uint16", 4, "uint16", 2),
        _info("UINT32", "uint32", 12, "uint32", 4),
        _info("UINT64", "uint64", 13, "uint64", 8),
        _info("INT8", "int8", 3, "int8", 1),
        _info("INT16", "int16", 5, "int16", 2),
        _info("INT32", "int32", 6, "int32", 4),
        _info("INT64", "int64", 7, "int64", 8),
        _info("FP16", "float16", 10, "float16", 2),
        _info("FP32", "float32", 1, "float", 4),
        _info("FP64", "float64", 11, "double", 8),
        _info("BYTES", "object", 8, "string", 0),
    )
}

_BY_ONNX = {info.onnx_elem_type: info for info in DATATYPES.values()}
_BY_ORT = {info.ort_type: info for info in DATATYPES.values()}


def from_onnx_elem_type(elem_type: int) -> DatatypeInfo | None:
    """The V2 datatype for an ONNX element type, or None if V2 cannot carry it."""
    return _BY_ONNX.get(elem_type)


def from_ort_type(ort_type: str) -> DatatypeInfo | None:
    """The V2 datatype for an ONNX Runtime type string such as ``tensor(float)``."""
    return _BY_ORT.get(ort_type)


def from_numpy(dtype: np.dtype[np.generic]) -> DatatypeInfo | None:
    """The V2 datatype of a numpy array's dtype (strings and bytes map to BYTES)."""
    if dtype.kind in "OSU":
        return DATATYPES["BYTES"]
    for info in DATATYPES.values():
        if info.numpy == dtype:
            return info
    return None

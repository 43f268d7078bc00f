"""Tensor datatypes of the Open Inference Protocol (KServe V2) and their equivalents.

One table maps each V2 datatype to its numpy dtype, its ONNX element type and the type
string ONNX Runtime reports, so every layer converts through the same facts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    numpy: np.dtype[np.generic]
    onnx_elem_type: int
    ort_type: str

    @property
    def itemsize(self) -> int:
        """Bytes per element in the binary tensor extension (0: variable, for BYTES)."""
        return 0 if self.name == "BYTES" else self.numpy.itemsize


def _info(name: Datatype, dtype: type[np.generic], onnx_elem: int, ort: str) -> DatatypeInfo:
    return DatatypeInfo(name, np.dtype(dtype), onnx_elem, f"tensor({ort})")


# ONNX element type numbers are from onnx.TensorProto.DataType (stable by the ONNX spec).
DATATYPES: dict[str, DatatypeInfo] = {
    info.name: info
    for info in (
        _info("BOOL", np.bool_, 9, "bool"),
        _info("UINT8", np.uint8, 2, "uint8"),
        _info("UINT16", np.uint16, 4, "uint16"),
        _info("UINT32", np.uint32, 12, "uint32"),
        _info("UINT64", np.uint64, 13, "uint64"),
        _info("INT8", np.int8, 3, "int8"),
        _info("INT16", np.int16, 5, "int16"),
        _info("INT32", np.int32, 6, "int32"),
        _info("INT64", np.int64, 7, "int64"),
        _info("FP16", np.float16, 10, "float16"),
        _info("FP32", np.float32, 1, "float"),
        _info("FP64", np.float64, 11, "double"),
        _info("BYTES", np.object_, 8, "string"),
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

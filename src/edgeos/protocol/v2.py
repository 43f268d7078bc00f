"""The Open Inference Protocol (KServe V2) inference request and response, on the wire.

Both JSON tensors and the binary tensor data extension are supported: with an
``Inference-Header-Content-Length`` header, the body is a JSON header followed by the raw
bytes of each tensor whose ``parameters`` carry ``binary_data_size``. This is what
``tritonclient`` sends by default, so Triton, KServe and MLServer clients all work.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import InvalidRequestError
from edgeos.protocol.datatypes import DATATYPES, DatatypeInfo, from_numpy

if TYPE_CHECKING:
    import numpy as np

# numpy is imported inside the functions that make or read arrays, not here: the node
# imports this module at start-up, and a node that serves no tensors must not load numpy.
# Once loaded, each such import is a dictionary lookup (well under a microsecond a call).

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class InputTensor:
    """One decoded input tensor."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    """An output the client asked for, and whether it wants it as binary data."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded inference request."""

    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output_default(self) -> bool:
        """True when outputs not listed explicitly should be returned as binary data."""
        return bool(self.parameters.get("binary_data_output", False))


def decode_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an inference request body; raise InvalidRequestError naming what is wrong."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise InvalidRequestError(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes"
            )
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidRequestError("request body must be a JSON object")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidRequestError("request field 'inputs' must be a non-empty list")
    offset = 0
    inputs: list[InputTensor] = []
    for index, raw in enumerate(raw_inputs):
        tensor, used = _decode_input(raw, index, binary[offset:])
        offset += used
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidRequestError(
            f"binary section has {len(binary)} bytes but inputs declare {offset}"
        )
    outputs = _decode_outputs(doc.get("outputs"))
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError("request field 'id' must be a string")
    parameters = doc.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError("request field 'parameters' must be an object")
    return InferRequest(inputs, outputs, request_id, parameters)


def _decode_input(raw: Any, index: int, binary: memoryview) -> tuple[InputTensor, int]:
    where = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise InvalidRequestError(f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{where}.name must be a non-empty string")
    where = f"input '{name}'"
    info = _datatype(raw.get("datatype"), where)
    shape = _shape(raw.get("shape"), where)
    parameters = raw.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise InvalidRequestError(f"{where}: 'parameters' must be an object")
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
            raise InvalidRequestError(
                f"{where}: binary_data_size {size!r} does not fit the {len(binary)} binary "
                "bytes left in the body"
            )
        array = _from_binary(binary[:size], info, count, where)
        used = size
    else:
        if "data" not in raw:
            raise InvalidRequestError(f"{where} has neither 'data' nor binary_data_size")
        array = _from_json(raw["data"], info, count, where)
        used = 0
    return InputTensor(name, info.name, shape, array.reshape(shape), parameters), used


def _datatype(value: Any, where: str) -> DatatypeInfo:
    info = DATATYPES.get(value) if isinstance(value, str) else None
    if info is None:
        raise InvalidRequestError(
            f"{where}: datatype {value!r} is not one of {', '.join(DATATYPES)}"
        )
    return info


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value
    ):
        raise InvalidRequestError(f"{where}: shape must be a list of non-negative integers")
    return tuple(value)


def _from_json(data: Any, info: DatatypeInfo, count: int, where: str) -> np.ndarray[Any, Any]:
    import numpy as np

    if info.name == "BYTES":
        flat = np.asarray(data, dtype=np.object_).ravel()
        if not all(isinstance(x, str) for x in flat):
            raise InvalidRequestError(f"{where}: BYTES data must be strings")
        array = np.array([x.encode() for x in flat], dtype=np.object_)
    else:
        array = _numbers(data, info, where)
    if array.size != count:
        raise InvalidRequestError(
            f"{where}: data has {array.size} elements but the shape needs {count}"
        )
    return array


# What JSON values each kind of datatype takes, as numpy reads them: b bool, i/u int, f float.
_ACCEPTS = {"b": "b", "i": "iuf", "u": "iuf", "f": "iuf"}


def _numbers(data: Any, info: DatatypeInfo, where: str) -> np.ndarray[Any, Any]:
    """JSON numbers (or booleans, for BOOL) as an array of the datatype, checked on the way.

    numpy alone would read "1.5" as a float, "false" as True and 1e300 as an FP32 inf.
    """
    import numpy as np

    try:
        probe = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidRequestError(f"{where}: data is not a valid {info.name} tensor") from exc
    kind = info.numpy.kind
    if probe.size and probe.dtype.kind not in _ACCEPTS[kind]:
        wanted = "true or false" if kind == "b" else "numbers"
        raise InvalidRequestError(f"{where}: {info.name} data must be {wanted}")
    if kind in "iu":
        if probe.dtype.kind == "f" and not bool(np.all(np.floor(probe) == probe)):
            raise InvalidRequestError(f"{where}: {info.name} data must be integers")
        try:
            # From the JSON values, not the probe: numpy reads integers past int64 as floats.
            return np.asarray(data, dtype=info.numpy)
        except (ValueError, TypeError, OverflowError) as exc:
            raise InvalidRequestError(f"{where}: {exc} for {info.name}") from exc
    try:
        with np.errstate(over="raise", invalid="raise"):
            return probe.astype(info.numpy)
    except FloatingPointError as exc:
        raise InvalidRequestError(f"{where}: a value is out of range for {info.name}") from exc


def _from_binary(
    raw: memoryview, info: DatatypeInfo, count: int, where: str
) -> np.ndarray[Any, Any]:
    import numpy as np

    if info.name == "BYTES":
        items = _split_bytes(raw, where)
        if len(items) != count:
            raise InvalidRequestError(
                f"{where}: binary data has {len(items)} elements but the shape needs {count}"
            )
        return np.array(items, dtype=np.object_)
    if len(raw) != count * info.itemsize:
        raise InvalidRequestError(
            f"{where}: binary data has {len(raw)} bytes but the shape needs "
            f"{count * info.itemsize} ({count} x {info.name})"
        )
    return np.frombuffer(raw, dtype=info.numpy).copy()


def _split_bytes(raw: memoryview, where: str) -> list[bytes]:
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidRequestError(f"{where}: truncated BYTES element length")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + length > len(raw):
            raise InvalidRequestError(f"{where}: BYTES element runs past the binary data")
        items.append(bytes(raw[pos : pos + length]))
        pos += length
    return items


def _decode_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise InvalidRequestError("request field 'outputs' must be a list")
    outputs = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequestError(f"outputs[{index}] must be an object with a 'name'")
        params = item.get("parameters", {})
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"outputs[{index}].parameters must be an object")
        outputs.append(RequestedOutput(item["name"], bool(params.get("binary_data", False))))
    return outputs


def encode_infer_response(
    *,
    model_name: str,
    model_version: str,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any]]],
    binary: frozenset[str] | set[str] = frozenset(),
    request_id: str | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, int | None]:
    """Serialise a response; returns the body and the JSON header length (None: all JSON).

    Outputs named in ``binary`` travel in the binary section after the JSON header.
    """
    chunks: list[bytes] = []
    encoded = []
    for name, array in outputs:
        info = from_numpy(array.dtype)
        if info is None:
            raise InvalidRequestError(f"output '{name}' has a datatype V2 cannot carry")
        entry: dict[str, Any] = {"name": name, "datatype": info.name, "shape": list(array.shape)}
        if name in binary:
            blob = _to_binary(array, info)
            entry["parameters"] = {"binary_data_size": len(blob)}
            chunks.append(blob)
        else:
            entry["data"] = _to_json(array, info, name)
        encoded.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    doc["outputs"] = encoded
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def _to_json(array: np.ndarray[Any, Any], info: DatatypeInfo, name: str) -> Any:
    import numpy as np

    flat = np.ascontiguousarray(array).reshape(-1)
    if info.name != "BYTES":
        return flat
    try:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in flat]
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"output '{name}' holds bytes that are not UTF-8; ask for it with binary_data"
        ) from exc


def _to_binary(array: np.ndarray[Any, Any], info: DatatypeInfo) -> bytes:
    import numpy as np

    if info.name != "BYTES":
        return np.ascontiguousarray(array, dtype=info.numpy).tobytes()
    parts = []
    for item in np.asarray(array).reshape(-1):
        blob = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(blob)) + blob)
    return b"".join(parts)


def error_body(message: str) -> bytes:
    """The protocol's error shape: ``{"error": "<message>"}``."""
    return orjson.dumps({"error": message})

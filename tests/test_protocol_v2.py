"""The V2 (Open Inference Protocol) wire format and the datatype table behind it.

Binary request bodies are built with ``tritonclient`` and responses are read back with
``tritonclient.http.InferResult``, so the wire format is checked against an independent
implementation rather than against our own encoder.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import orjson
import pytest
from onnx import TensorProto, helper

from edgeos.errors import InvalidRequestError
from edgeos.protocol.datatypes import (
    DATATYPES,
    DatatypeInfo,
    from_numpy,
    from_onnx_elem_type,
    from_ort_type,
)
from edgeos.protocol.v2 import decode_infer_request, encode_infer_response

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_utils = pytest.importorskip("tritonclient.utils")

# Six values per datatype (a 2x3 tensor), reaching each type's extremes.
SAMPLES: dict[str, list[Any]] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 127, 128, 254, 255],
    "UINT16": [0, 1, 255, 256, 65534, 65535],
    "UINT32": [0, 1, 65536, 2**31, 2**32 - 2, 2**32 - 1],
    "UINT64": [0, 1, 2**32, 2**63, 2**64 - 2, 2**64 - 1],
    "INT8": [-128, -1, 0, 1, 100, 127],
    "INT16": [-32768, -1, 0, 1, 1000, 32767],
    "INT32": [-(2**31), -1, 0, 1, 123456, 2**31 - 1],
    "INT64": [-(2**63), -1, 0, 1, 2**40, 2**63 - 1],
    "FP16": [0.5, -1.25, 0.0, 1024.0, 65504.0, -0.099975586],
    "FP32": [1.5, -2.25, 0.1, 3.4e38, 1e-30, -7.0],
    "FP64": [0.1, -1e300, 2.5e-310, 1.0, 3.141592653589793, -0.0],
    "BYTES": ["a", "", "héllo wörld", "with space", "ünï", "\u2603"],
}
NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
ALL = list(SAMPLES)


def expected_array(datatype: str) -> np.ndarray[Any, Any]:
    """The 2x3 tensor SAMPLES[datatype] stands for (BYTES as UTF-8 bytes objects)."""
    values = SAMPLES[datatype]
    if datatype == "BYTES":
        return np.array([v.encode() for v in values], dtype=np.object_).reshape(2, 3)
    return np.array(values, dtype=NUMPY[datatype]).reshape(2, 3)


def json_body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def triton_body(*inputs: Any, outputs: Any = None, **kwargs: Any) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient sends it."""
    body, header_length = tritonclient_http.InferenceServerClient.generate_request_body(
        list(inputs), outputs=outputs, **kwargs
    )
    return body, header_length


def triton_input(name: str, array: np.ndarray[Any, Any], datatype: str, binary: bool) -> Any:
    tensor = tritonclient_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tolist() == want.tolist()


# -- decoding JSON tensors -------------------------------------------------------------
@pytest.mark.parametrize("datatype", ALL)
@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_input_decodes_to_numpy(datatype: str, nested: bool) -> None:
    data: list[Any] = SAMPLES[datatype]
    if nested:
        data = [data[:3], data[3:]]
    body = json_body({"name": "x", "datatype": datatype, "shape": [2, 3], "data": data})
    request = decode_infer_request(body)
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (2, 3))
    assert_same(tensor.data, expected_array(datatype))


def test_json_input_shape_decides_layout_not_nesting() -> None:
    """Nested data is read row-major; the declared shape is what the tensor gets."""
    body = json_body(
        {"name": "x", "datatype": "INT32", "shape": [3, 2], "data": [[1, 2, 3], [4, 5, 6]]}
    )
    (tensor,) = decode_infer_request(body).inputs
    assert tensor.data.tolist() == [[1, 2], [3, 4], [5, 6]]


def test_scalar_and_empty_shapes() -> None:
    body = json_body(
        {"name": "scalar", "datatype": "FP32", "shape": [], "data": [2.5]},
        {"name": "empty", "datatype": "INT64", "shape": [0, 4], "data": []},
    )
    scalar, empty = decode_infer_request(body).inputs
    assert scalar.data.shape == () and scalar.data.item() == 2.5
    assert empty.data.shape == (0, 4) and empty.data.dtype == np.int64


def test_request_id_parameters_and_requested_outputs() -> None:
    body = json_body(
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]},
        id="req-7",
        parameters={"binary_data_output": True},
        outputs=[{"name": "a"}, {"name": "b", "parameters": {"binary_data": True}}],
    )
    request = decode_infer_request(body)
    assert request.id == "req-7"
    assert request.binary_output_default is True
    assert [(o.name, o.binary) for o in request.outputs or []] == [("a", False), ("b", True)]


def test_outputs_absent_means_all_outputs() -> None:
    body = json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]})
    request = decode_infer_request(body)
    assert request.outputs is None
    assert request.id is None
    assert request.binary_output_default is False


# -- decoding the binary tensor extension ----------------------------------------------
@pytest.mark.parametrize("datatype", ALL)
def test_binary_input_from_tritonclient_decodes(datatype: str) -> None:
    want = expected_array(datatype)
    body, header_length = triton_body(triton_input("x", want, datatype, binary=True))
    assert header_length is not None
    (tensor,) = decode_infer_request(body, header_length).inputs
    assert (tensor.datatype, tensor.shape) == (datatype, (2, 3))
    assert_same(tensor.data, want)


def test_mixed_json_and_binary_inputs_keep_their_order() -> None:
    """Binary sections follow the order of the inputs that claim them; JSON ones take none."""
    floats = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    words = np.array([b"alpha", b"", b"\xff\xfe not utf-8", b"\x00\x01"], dtype=np.object_)
    small = np.array([[1, -2], [3, -4]], dtype=np.int8)
    ints = np.array([2**40, -5], dtype=np.int64)
    body, header_length = triton_body(
        triton_input("floats", floats, "FP32", binary=True),
        triton_input("small", small, "INT8", binary=False),
        triton_input("words", words, "BYTES", binary=True),
        triton_input("ints", ints, "INT64", binary=True),
        outputs=[tritonclient_http.InferRequestedOutput("y", binary_data=True)],
        request_id="mixed",
    )
    assert header_length is not None and header_length < len(body)
    request = decode_infer_request(body, header_length)
    got = {t.name: t.data for t in request.inputs}
    assert [t.name for t in request.inputs] == ["floats", "small", "words", "ints"]
    assert_same(got["floats"], floats)
    assert_same(got["small"], small)
    assert_same(got["words"], words)
    assert_same(got["ints"], ints)
    assert request.id == "mixed"
    assert [(o.name, o.binary) for o in request.outputs or []] == [("y", True)]


def test_bytes_binary_uses_little_endian_length_prefixes() -> None:
    """The BYTES layout as tritonclient.utils.serialize_byte_tensor writes it."""
    items = np.array([b"x" * 300, b"", b"\x80"], dtype=np.object_)
    blob = tritonclient_utils.serialize_byte_tensor(items).tobytes()
    assert blob[:4] == struct.pack("<I", 300)  # the format, independent of edgeos
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "s",
                    "datatype": "BYTES",
                    "shape": [3],
                    "parameters": {"binary_data_size": len(blob)},
                }
            ]
        }
    ).encode()
    (tensor,) = decode_infer_request(head + blob, len(head)).inputs
    assert_same(tensor.data, items)


def test_header_length_covering_the_whole_body_is_plain_json() -> None:
    body = json_body({"name": "x", "datatype": "UINT8", "shape": [2], "data": [1, 2]})
    (tensor,) = decode_infer_request(body, len(body)).inputs
    assert tensor.data.tolist() == [1, 2]


# -- refusing bad requests -------------------------------------------------------------
def one_input(**fields: Any) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    tensor.update(fields)
    return json_body(tensor)


def binary_request(datatype: str, shape: list[int], size: int, blob: bytes) -> tuple[bytes, int]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": datatype,
                    "shape": shape,
                    "parameters": {"binary_data_size": size},
                }
            ]
        }
    ).encode()
    return head + blob, len(head)


FLOATS8 = np.array([1.0, 2.0], dtype=np.float32).tobytes()
BAD_REQUESTS = [
    pytest.param(b"{not json", None, ["not valid JSON"], id="not-json"),
    pytest.param(b"\xff\xfe", None, ["not valid JSON"], id="not-utf8"),
    pytest.param(b"[1, 2]", None, ["JSON object"], id="not-object"),
    pytest.param(b"{}", None, ["inputs", "non-empty"], id="no-inputs"),
    pytest.param(b'{"inputs": []}', None, ["inputs", "non-empty"], id="empty-inputs"),
    pytest.param(b'{"inputs": {"x": 1}}', None, ["inputs", "list"], id="inputs-not-list"),
    pytest.param(b'{"inputs": [7]}', None, ["inputs[0]", "object"], id="input-not-object"),
    pytest.param(json_body({"datatype": "FP32"}), None, ["inputs[0].name"], id="no-name"),
    pytest.param(one_input(datatype="FP8"), None, ["'x'", "'FP8'"], id="unknown-datatype"),
    pytest.param(one_input(datatype="fp32"), None, ["'x'", "'fp32'"], id="lowercase-datatype"),
    pytest.param(one_input(shape=[-2]), None, ["'x'", "shape"], id="negative-shape"),
    pytest.param(one_input(shape=[2.0]), None, ["'x'", "shape"], id="float-shape"),
    pytest.param(one_input(shape=["2"]), None, ["'x'", "shape"], id="string-shape"),
    pytest.param(one_input(shape=[True, 2]), None, ["'x'", "shape"], id="bool-shape"),
    pytest.param(one_input(shape=2), None, ["'x'", "shape"], id="shape-not-list"),
    pytest.param(one_input(shape=[2, 2]), None, ["'x'", "2 elements", "4"], id="too-few"),
    pytest.param(one_input(shape=[1]), None, ["'x'", "2 elements", "needs 1"], id="too-many"),
    pytest.param(
        one_input(data=[[1.0, 2.0], [3.0]]), None, ["'x'", "FP32"], id="ragged-nesting"
    ),
    pytest.param(
        one_input(datatype="INT32", data=[1, 2.5]), None, ["'x'", "INT32", "integers"],
        id="float-for-int32",
    ),
    pytest.param(
        one_input(datatype="INT64", data=[1.0, 2.0]), None, ["'x'", "INT64", "integers"],
        id="integral-float-for-int64",
    ),
    pytest.param(one_input(datatype="UINT8", data=[1, 300]), None, ["'x'", "UINT8", "300"],
                 id="300-for-uint8"),
    pytest.param(one_input(datatype="UINT16", data=[1, -1]), None, ["'x'", "UINT16", "-1"],
                 id="negative-for-uint16"),
    pytest.param(one_input(datatype="INT64", data=[0, 2**63]), None, ["'x'", "INT64"],
                 id="too-large-for-int64"),
    pytest.param(one_input(data=["abc", "def"]), None, ["'x'", "FP32"], id="strings-for-fp32"),
    pytest.param(one_input(datatype="BYTES", data=["a", 1]), None, ["'x'", "BYTES", "strings"],
                 id="number-in-bytes"),
    pytest.param(one_input(datatype="BYTES", data=[None, "b"]), None, ["'x'", "BYTES"],
                 id="null-in-bytes"),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [2]}), None, ["'x'", "data"],
        id="no-data",
    ),
    pytest.param(one_input(parameters=[1]), None, ["'x'", "parameters"], id="bad-parameters"),
    pytest.param(*binary_request("FP32", [2], 100, FLOATS8), ["'x'", "100", "8"],
                 id="binary-size-past-body"),
    pytest.param(*binary_request("FP32", [2], -1, FLOATS8), ["'x'", "-1"],
                 id="binary-size-negative"),
    pytest.param(*binary_request("FP32", [2], 4, FLOATS8[:4]), ["'x'", "4 bytes", "8"],
                 id="binary-size-wrong-for-shape"),
    pytest.param(*binary_request("FP32", [2], 8, FLOATS8 + b"\x00\x00"), ["10", "8"],
                 id="trailing-binary-bytes"),
    pytest.param(
        *binary_request("BYTES", [3], 9, struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)),
        ["'x'", "2 elements", "needs 3"], id="bytes-count-wrong",
    ),
    pytest.param(*binary_request("BYTES", [1], 3, b"\x01\x00\x00"), ["'x'", "truncated"],
                 id="bytes-truncated-length"),
    pytest.param(*binary_request("BYTES", [1], 6, struct.pack("<I", 5) + b"ab"),
                 ["'x'", "past"], id="bytes-element-past-end"),
    pytest.param(b'{"inputs": []}', 999, ["Inference-Header-Content-Length", "999"],
                 id="header-length-past-body"),
    pytest.param(b'{"inputs": []}', -1, ["Inference-Header-Content-Length"],
                 id="header-length-negative"),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, outputs={}),
        None, ["outputs", "list"], id="outputs-not-list",
    ),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                  outputs=[{"name": "y"}, {"nam": "z"}]),
        None, ["outputs[1]", "name"], id="output-without-name",
    ),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]},
                  outputs=[{"name": "y", "parameters": [True]}]),
        None, ["outputs[0].parameters"], id="output-bad-parameters",
    ),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, id=5),
        None, ["id", "string"], id="id-not-string",
    ),
    pytest.param(
        json_body({"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}, parameters=[]),
        None, ["parameters", "object"], id="request-parameters-not-object",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("body", "header_length", "fragments"), BAD_REQUESTS)
def test_bad_request_is_refused_with_a_precise_message(
    body: bytes, header_length: int | None, fragments: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_infer_request(body, header_length)
    for fragment in fragments:
        assert fragment in str(info.value)
    assert info.value.http_status == 400

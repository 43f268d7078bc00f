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
import onnxruntime as ort
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
    assert scalar.data.shape == ()
    assert scalar.data.item() == 2.5
    assert empty.data.shape == (0, 4)
    assert empty.data.dtype == np.int64


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
    assert header_length is not None
    assert header_length < len(body)
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
    blob = tritonclient_utils.serialize_byte_tensor(items).item()
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


GOOD = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}
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
    pytest.param(*binary_request("FP32", [2], 8, FLOATS8 + b"\x00\x00"), ["10 bytes", "declare 8"],
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
        json_body(GOOD, outputs={}),
        None, ["outputs", "list"], id="outputs-not-list",
    ),
    pytest.param(
        json_body(GOOD, outputs=[{"name": "y"}, {"nam": "z"}]),
        None, ["outputs[1]", "name"], id="output-without-name",
    ),
    pytest.param(
        json_body(GOOD, outputs=[{"name": "y", "parameters": [True]}]),
        None, ["outputs[0].parameters"], id="output-bad-parameters",
    ),
    pytest.param(
        json_body(GOOD, id=5),
        None, ["id", "string"], id="id-not-string",
    ),
    pytest.param(
        json_body(GOOD, parameters="x"),
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


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        pytest.param("FP32", ["1.5", "2"], id="numeric-strings-for-fp32"),
        pytest.param("FP64", ["nan", "inf"], id="nan-strings-for-fp64"),
        pytest.param("BOOL", ["false", "false"], id="string-false-for-bool"),
        pytest.param("BOOL", [2, 0.5], id="numbers-for-bool"),
    ],
)
def test_json_values_of_the_wrong_type_are_refused(datatype: str, data: list[Any]) -> None:
    """V2 JSON carries numbers for FP and true/false for BOOL; ``"false"`` must not be True."""
    with pytest.raises(InvalidRequestError, match=f"'x'.*{datatype}"):
        decode_infer_request(one_input(datatype=datatype, data=data))


@pytest.mark.parametrize("datatype", ["INT8", "UINT32", "INT64"])
def test_integral_floats_are_accepted_for_integer_types(datatype: str) -> None:
    """Some JSON writers send 3.0 for 3; a whole-valued float is still an integer."""
    (tensor,) = decode_infer_request(one_input(datatype=datatype, data=[3.0, 0.0])).inputs
    assert tensor.data.dtype == NUMPY[datatype]
    assert tensor.data.tolist() == [3, 0]


# -- encoding responses ----------------------------------------------------------------
@pytest.mark.parametrize("datatype", ALL)
def test_json_response_round_trips_through_tritonclient(datatype: str) -> None:
    array = expected_array(datatype)
    body, header_length = encode_infer_response(
        model_name="m", model_version="3", outputs=[("y", array)], request_id="abc"
    )
    assert header_length is None
    doc = json.loads(body)
    assert (doc["model_name"], doc["model_version"], doc["id"]) == ("m", "3", "abc")
    (out,) = doc["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", datatype, [2, 3])
    assert "parameters" not in out
    result = tritonclient_http.InferResult.from_response_body(body)
    got = result.as_numpy("y")
    if datatype == "BYTES":
        assert got.tolist() == [[v.decode() for v in row] for row in array.tolist()]
    else:
        assert_same(got, array)


@pytest.mark.parametrize("datatype", ALL)
def test_binary_response_round_trips_through_tritonclient(datatype: str) -> None:
    array = expected_array(datatype)
    body, header_length = encode_infer_response(
        model_name="m", model_version="1", outputs=[("y", array)], binary={"y"}
    )
    assert header_length is not None
    out = json.loads(body[:header_length])["outputs"][0]
    assert "data" not in out
    assert out["parameters"]["binary_data_size"] == len(body) - header_length
    got = tritonclient_http.InferResult.from_response_body(
        body, header_length=header_length
    ).as_numpy("y")
    assert_same(got, array)
    if datatype != "BYTES":
        raw: np.ndarray[Any, Any] = np.frombuffer(
            body[header_length:], dtype=NUMPY[datatype]
        ).reshape(2, 3)
        assert_same(raw, array)


def test_response_mixing_json_and_binary_outputs() -> None:
    scores = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    labels = np.array([3, 1, 2], dtype=np.int64)
    names = np.array(["cat", "dog", "\u732b"], dtype=np.str_)
    raw = np.array([b"\x00\xff", b""], dtype=np.object_)
    body, header_length = encode_infer_response(
        model_name="m",
        model_version="1",
        outputs=[("scores", scores), ("labels", labels), ("names", names), ("raw", raw)],
        binary={"scores", "raw"},
    )
    assert header_length is not None
    result = tritonclient_http.InferResult.from_response_body(body, header_length=header_length)
    assert_same(result.as_numpy("scores"), scores)
    assert_same(result.as_numpy("labels"), labels)
    assert result.as_numpy("names").tolist() == ["cat", "dog", "\u732b"]
    assert_same(result.as_numpy("raw"), raw)
    head = json.loads(body[:header_length])
    assert [o["name"] for o in head["outputs"]] == ["scores", "labels", "names", "raw"]
    assert [o["datatype"] for o in head["outputs"]] == ["FP32", "INT64", "BYTES", "BYTES"]


def test_response_without_id_or_parameters_still_names_the_model() -> None:
    body, _ = encode_infer_response(
        model_name="risk", model_version="2", outputs=[("y", np.zeros(1, np.float32))]
    )
    doc = json.loads(body)
    assert (doc["model_name"], doc["model_version"]) == ("risk", "2")
    assert "id" not in doc


def test_response_parameters_are_passed_through() -> None:
    body, _ = encode_infer_response(
        model_name="m",
        model_version="1",
        outputs=[],
        parameters={"sequence_id": 4},
        request_id="",
    )
    doc = json.loads(body)
    assert doc["parameters"] == {"sequence_id": 4}
    assert doc["id"] == ""
    assert doc["outputs"] == []


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_non_contiguous_output_is_sent_in_logical_order(binary: bool) -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3).T  # a transposed view
    body, header_length = encode_infer_response(
        model_name="m", model_version="1", outputs=[("y", array)], binary={"y"} if binary else set()
    )
    got = tritonclient_http.InferResult.from_response_body(
        body, header_length=header_length
    ).as_numpy("y")
    assert got.tolist() == [[0, 3], [1, 4], [2, 5]]


def test_decoded_request_tensors_encode_back_to_the_same_values() -> None:
    """What the node decodes from tritonclient it can send back unchanged."""
    inputs = [
        triton_input(dt.lower(), expected_array(dt), dt, binary=i % 2 == 0)
        for i, dt in enumerate(ALL)
    ]
    body, header_length = triton_body(*inputs)
    request = decode_infer_request(body, header_length)
    names = {t.name for t in request.inputs}
    response, response_length = encode_infer_response(
        model_name="echo",
        model_version="1",
        outputs=[(t.name, t.data) for t in request.inputs],
        binary=names,
    )
    result = tritonclient_http.InferResult.from_response_body(
        response, header_length=response_length
    )
    for datatype in ALL:
        assert_same(result.as_numpy(datatype.lower()), expected_array(datatype))


def test_non_utf8_bytes_output_as_json_points_to_binary() -> None:
    array = np.array([b"ok", b"\xff\xfe"], dtype=np.object_)
    with pytest.raises(InvalidRequestError, match=r"output 'blob'.*binary") as info:
        encode_infer_response(model_name="m", model_version="1", outputs=[("blob", array)])
    assert "UTF-8" in str(info.value)
    body, header_length = encode_infer_response(
        model_name="m", model_version="1", outputs=[("blob", array)], binary={"blob"}
    )
    got = tritonclient_http.InferResult.from_response_body(body, header_length=header_length)
    assert_same(got.as_numpy("blob"), array)


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype("datetime64[s]")])
def test_output_of_a_type_v2_cannot_carry_is_refused(dtype: Any) -> None:
    with pytest.raises(InvalidRequestError, match="output 'weird'"):
        encode_infer_response(
            model_name="m", model_version="1", outputs=[("weird", np.zeros(2, dtype=dtype))]
        )


# -- the datatype table ----------------------------------------------------------------
ONNX_NAMES = {
    "BOOL": "BOOL",
    "UINT8": "UINT8",
    "UINT16": "UINT16",
    "UINT32": "UINT32",
    "UINT64": "UINT64",
    "INT8": "INT8",
    "INT16": "INT16",
    "INT32": "INT32",
    "INT64": "INT64",
    "FP16": "FLOAT16",
    "FP32": "FLOAT",
    "FP64": "DOUBLE",
    "BYTES": "STRING",
}


def ort_type_of(elem_type: int) -> str:
    """The type string ONNX Runtime itself reports for an input of this element type."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", elem_type, [1])],
        [helper.make_tensor_value_info("y", elem_type, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return str(session.get_inputs()[0].type)


def test_the_table_has_exactly_the_v2_datatypes() -> None:
    assert sorted(DATATYPES) == sorted(ONNX_NAMES)


@pytest.mark.parametrize("datatype", ALL)
def test_datatype_agrees_with_onnx_onnxruntime_numpy_and_tritonclient(datatype: str) -> None:
    elem_type = int(getattr(TensorProto, ONNX_NAMES[datatype]))
    info = DATATYPES[datatype]
    assert info.name == datatype
    assert info.onnx_elem_type == elem_type
    assert info.numpy == helper.tensor_dtype_to_np_dtype(elem_type)
    assert info.numpy == np.dtype(tritonclient_utils.triton_to_np_dtype(datatype))
    assert tritonclient_utils.np_to_triton_dtype(info.numpy) == datatype
    assert from_onnx_elem_type(elem_type) is info
    assert from_ort_type(ort_type_of(elem_type)) is info
    assert from_numpy(info.numpy) is info


@pytest.mark.parametrize(
    "elem_type",
    sorted(
        set(TensorProto.DataType.values()) - {info.onnx_elem_type for info in DATATYPES.values()}
    ),
    ids=TensorProto.DataType.Name,
)
def test_onnx_types_v2_cannot_carry_map_to_none(elem_type: int) -> None:
    assert from_onnx_elem_type(elem_type) is None


@pytest.mark.parametrize("ort_type", ["tensor(bfloat16)", "tensor(complex64)", "float", "seq"])
def test_ort_types_v2_cannot_carry_map_to_none(ort_type: str) -> None:
    assert from_ort_type(ort_type) is None


@pytest.mark.parametrize("dtype", ["U5", "S3", "O"])
def test_text_and_object_numpy_dtypes_are_bytes(dtype: str) -> None:
    info = from_numpy(np.dtype(dtype))
    assert isinstance(info, DatatypeInfo)
    assert info.name == "BYTES"
    assert info.itemsize == 0


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "datetime64[ns]", "V4"])
def test_numpy_dtypes_v2_cannot_carry_map_to_none(dtype: str) -> None:
    assert from_numpy(np.dtype(dtype)) is None


@pytest.mark.parametrize("params", [[], 0, "", [1]])
def test_parameters_that_are_not_objects_are_refused(params: Any) -> None:
    body = json.dumps(
        {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]}],
            "parameters": params,
        }
    ).encode()
    with pytest.raises(InvalidRequestError, match="'parameters' must be an object"):
        decode_infer_request(body)
    with pytest.raises(InvalidRequestError, match="'parameters' must be an object"):
        decode_infer_request(one_input(parameters=params))


def test_boolean_binary_data_size_is_refused() -> None:
    body = one_input(parameters={"binary_data_size": True})
    with pytest.raises(InvalidRequestError, match="binary_data_size True"):
        decode_infer_request(body + b"\x00\x00\x80\x3f", len(body))

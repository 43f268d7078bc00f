"""The Open Inference Protocol API of a real node process, driven by tritonclient."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from edgeos.node.process import ServerProcess, node_process
from edgeos.runtime import ModelRegistry
from edgeos.state import Database
from tests import onnx_models

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

# Every V2 datatype: (name, ONNX element type, numpy dtype, sample values).
DATATYPES = [
    ("BOOL", TensorProto.BOOL, np.bool_, [[True, False, True]]),
    ("UINT8", TensorProto.UINT8, np.uint8, [[0, 7, 255]]),
    ("UINT16", TensorProto.UINT16, np.uint16, [[0, 7, 65535]]),
    ("UINT32", TensorProto.UINT32, np.uint32, [[0, 7, 4294967295]]),
    ("UINT64", TensorProto.UINT64, np.uint64, [[0, 7, 2**64 - 1]]),
    ("INT8", TensorProto.INT8, np.int8, [[-128, 0, 127]]),
    ("INT16", TensorProto.INT16, np.int16, [[-32768, 0, 32767]]),
    ("INT32", TensorProto.INT32, np.int32, [[-(2**31), 0, 2**31 - 1]]),
    ("INT64", TensorProto.INT64, np.int64, [[-(2**63), 0, 2**63 - 1]]),
    ("FP16", TensorProto.FLOAT16, np.float16, [[-1.5, 0.0, 65504.0]]),
    ("FP32", TensorProto.FLOAT, np.float32, [[-1.25, 0.0, 3.4e38]]),
    ("FP64", TensorProto.DOUBLE, np.float64, [[-1.25, 1e-300, 1.7e308]]),
    ("BYTES", TensorProto.STRING, np.object_, [[b"edge", b"", "caf\u00e9".encode()]]),
]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("v2")
    data_dir = root / "node"
    with Database(data_dir / "node.db") as db:
        registry = ModelRegistry(db, data_dir / "models")
        registry.add(onnx_models.mlp(root / "risk1.onnx", seed=1), name="risk")
        registry.add(onnx_models.mlp(root / "risk2.onnx", seed=2), name="risk")
        for name, elem, _, _ in DATATYPES:
            registry.add(
                onnx_models.identity(root / f"{name}.onnx", elem), name=f"id-{name.lower()}"
            )
    with node_process(data_dir) as process:
        process.root = root  # type: ignore[attr-defined]
        yield process


class Headers:
    """A tritonclient plugin that sends ``headers`` with every request."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.headers = headers

    def __call__(self, request: Any) -> None:
        request.headers.update(self.headers)


@pytest.fixture
def client(node: ServerProcess) -> Iterator[object]:
    c = tritonclient_http.InferenceServerClient(node.url.removeprefix("http://"))
    c.register_plugin(Headers(node.headers))
    yield c
    c.close()


def reference(root: Path, file: str, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(root / file), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"features": x}))


def test_server_health_and_metadata(client: object) -> None:
    assert client.is_server_live()  # type: ignore[attr-defined]
    assert client.is_server_ready()  # type: ignore[attr-defined]
    meta = client.get_server_metadata()  # type: ignore[attr-defined]
    assert meta["name"] == "edgeos"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: object) -> None:
    meta = client.get_model_metadata("risk")  # type: ignore[attr-defined]
    assert meta["name"] == "risk"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert client.get_model_metadata("risk", "2")["versions"] == ["2"]  # type: ignore[attr-defined]
    assert client.is_model_ready("risk")  # type: ignore[attr-defined]
    assert client.is_model_ready("risk", "2")  # type: ignore[attr-defined]
    assert not client.is_model_ready("ghost")  # type: ignore[attr-defined]
    assert not client.is_model_ready("risk", "9")  # type: ignore[attr-defined]


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("version", ["", "1", "2"])
def test_infer_equals_direct_onnxruntime(
    node: ServerProcess, client: object, binary: bool, version: str
) -> None:
    x = np.random.default_rng(7).standard_normal((6, 4)).astype(np.float32)
    inp = tritonclient_http.InferInput("features", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        tritonclient_http.InferRequestedOutput("probabilities", binary_data=binary),
        tritonclient_http.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("risk", [inp], model_version=version, outputs=outputs, request_id="r-1")  # type: ignore[attr-defined]
    probs, label = reference(node.root, f"risk{version or '1'}.onnx", x)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    response = result.get_response()
    assert response["model_name"] == "risk"
    assert response["model_version"] == (version or "1")
    assert response["id"] == "r-1"


def test_infer_without_outputs_returns_all_as_binary(node: ServerProcess, client: object) -> None:
    x = np.ones((2, 4), np.float32)
    inp = tritonclient_http.InferInput("features", [2, 4], "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer("risk", [inp])  # type: ignore[attr-defined]
    probs, label = reference(node.root, "risk1.onnx", x)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])


def test_output_selection(client: object) -> None:
    inp = tritonclient_http.InferInput("features", [1, 4], "FP32")
    inp.set_data_from_numpy(np.ones((1, 4), np.float32))
    result = client.infer("risk", [inp], outputs=[tritonclient_http.InferRequestedOutput("label")])  # type: ignore[attr-defined]
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]


@pytest.mark.parametrize(
    ("datatype", "elem", "dtype", "values"), DATATYPES, ids=[d[0] for d in DATATYPES]
)
def test_every_datatype_round_trips_binary(
    client: object, datatype: str, elem: int, dtype: type, values: list[list[object]]
) -> None:
    x: np.ndarray = np.array(values, dtype=dtype)
    inp = tritonclient_http.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=True)
    out = tritonclient_http.InferRequestedOutput("output", binary_data=True)
    result = client.infer(f"id-{datatype.lower()}", [inp], outputs=[out])  # type: ignore[attr-defined]
    got = result.as_numpy("output")
    assert got.shape == x.shape
    assert got.tolist() == x.tolist()


@pytest.mark.parametrize(
    ("datatype", "elem", "dtype", "values"), DATATYPES, ids=[d[0] for d in DATATYPES]
)
def test_every_datatype_round_trips_json(
    node: ServerProcess, datatype: str, elem: int, dtype: type, values: list[list[object]]
) -> None:
    data = [v.decode() if isinstance(v, bytes) else v for v in values[0]]
    body = {"inputs": [{"name": "input", "datatype": datatype, "shape": [1, 3], "data": data}]}
    response = httpx.post(
        f"{node.url}/v2/models/id-{datatype.lower()}/infer", json=body, headers=node.headers
    )
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("output", datatype, [1, 3])
    expected: np.ndarray = np.array(values, dtype=dtype).reshape(-1)
    if datatype == "BYTES":
        assert out["data"] == [v.decode() for v in expected]
    else:
        np.testing.assert_array_equal(np.array(out["data"], dtype=dtype), expected)


def test_request_without_content_type_is_accepted(node: ServerProcess) -> None:
    body = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    response = httpx.post(f"{node.url}/v2/models/risk/infer", content=body, headers=node.headers)
    assert response.status_code == 200
    assert "content-type" not in response.request.headers


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/models/ghost/infer", b'{"inputs":[]}', 404, "no model named 'ghost'"),
        ("/v2/models/risk/versions/9/infer", None, 404, "model 'risk' has no version '9'"),
        ("/v2/models/risk/infer", b"{not json", 400, "not valid JSON"),
        ("/v2/models/risk/infer", b"[1,2]", 400, "must be a JSON object"),
        (
            "/v2/models/risk/infer",
            b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}',
            400,
            r"input 'features' has shape [1, 3] but the model takes [-1, 4]",
        ),
        (
            "/v2/models/risk/infer",
            b'{"inputs":[{"name":"features","datatype":"INT32","shape":[1,4],"data":[1,2,3,4]}]}',
            400,
            "input 'features' has datatype INT32 but the model takes FP32",
        ),
        (
            "/v2/models/risk/infer",
            b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,2,3]}]}',
            400,
            "data has 3 elements but the shape needs 4",
        ),
        (
            "/v2/models/risk/infer",
            b'{"inputs":[{"name":"pixels","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}',
            400,
            "no input named 'pixels'",
        ),
        (
            "/v2/models/risk/infer",
            b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}],'
            b'"outputs":[{"name":"logits"}]}',
            400,
            "no output named 'logits'",
        ),
        ("/v2/models/ghost", None, 404, "no model named 'ghost'"),
    ],
)
def test_errors_use_the_protocol_shape(
    node: ServerProcess, path: str, body: bytes | None, status: int, message: str
) -> None:
    if body is None and path.endswith("/infer"):
        body = b'{"inputs":[{"name":"features","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'
    response = (
        httpx.post(node.url + path, content=body, headers=node.headers)
        if body is not None
        else httpx.get(node.url + path, headers=node.headers)
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_tritonclient_sees_errors_as_exceptions(client: object) -> None:
    inp = tritonclient_http.InferInput("features", [1, 3], "FP32")
    inp.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException, match="shape"):
        client.infer("risk", [inp])  # type: ignore[attr-defined]


def test_metrics_count_per_model(node: ServerProcess) -> None:
    body = {
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]
    }
    with node.client() as http:
        before = http.get("/metrics").text
        for _ in range(3):
            http.post("/v2/models/risk/versions/2/infer", json=body).raise_for_status()
        bad = {"inputs": [{**body["inputs"][0], "shape": [2, 4]}]}  # 4 values for 8 elements
        http.post("/v2/models/risk/versions/2/infer", json=bad)
        http.post("/v2/models/risk/versions/2/infer", content=b"{")
        text = http.get("/metrics").text
    assert text.startswith("# HELP")

    def value(page: str, series: str) -> float:
        for line in page.splitlines():
            if line.startswith(series + " "):
                return float(line.split()[-1])
        return 0.0

    requests = 'edgeos_inference_requests_total{model="risk",version="2"}'
    errors = 'edgeos_inference_errors_total{model="risk",version="2"}'
    assert value(text, requests) - value(before, requests) == 3
    assert value(text, errors) - value(before, errors) == 2
    assert 'edgeos_inference_latency_seconds_bucket{model="risk",version="2",le="+Inf"}' in text


def test_sigterm_shuts_down_gracefully(tmp_path: Path) -> None:
    with node_process(tmp_path / "node") as process:
        assert process.process is not None
        process.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM after its graceful shutdown, as a service manager expects.
        assert process.process.wait(15) in (0, -signal.SIGTERM)
        log = process.log()
        assert "Waiting for application shutdown" in log
        assert "node stopped" in log

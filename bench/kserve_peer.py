"""KServe side of the serving benchmark: one ONNX model behind the KServe Python model server.

Run it with the interpreter of the KServe virtualenv (KServe's dependency pins conflict with
edgeos', so it never shares a venv with edgeos)::

    python bench/kserve_peer.py --model model.onnx --name tiny --port 8081

It serves the Open Inference Protocol (KServe V2) over HTTP with one uvicorn worker:
``POST /v2/models/NAME/infer``, ``GET /v2/health/ready``, ``GET /v2/models/NAME/ready`` and
``GET /v2/models/NAME`` (metadata). gRPC is disabled.

The onnxruntime session is configured like edgeos' own: CPU provider, one intra-op and one
inter-op thread, spinning disabled, so the comparison measures the serving stacks and not the
thread pools.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

# onnxruntime element types -> Open Inference Protocol datatypes, for model metadata.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the peer's own command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="ONNX model file")
    parser.add_argument("--name", required=True, help="model name in the V2 URLs")
    parser.add_argument("--port", type=int, required=True, help="HTTP port")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument(
        "--request-logs",
        action="store_true",
        help="keep KServe's per-request log lines (access log, latency and timing traces); "
        "off by default because edgeos does not log per request either",
    )
    return parser.parse_args(argv)


def make_session(model: Path) -> ort.InferenceSession:
    """Open ``model`` single-threaded on CPU, without spin-waiting."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning burns a core between requests; on a 2-core box it would steal CPU from the
    # HTTP stack and the load generator, and edgeos disables it too.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def _metadata(args: list[Any]) -> list[dict[str, Any]]:
    # Symbolic or unknown dimensions are -1 in V2 metadata.
    return [
        {
            "name": a.name,
            "datatype": _ORT_TO_V2.get(a.type, a.type),
            "shape": [d if isinstance(d, int) else -1 for d in a.shape],
        }
        for a in args
    ]


def main(argv: list[str]) -> None:
    """Load the model and serve it until SIGTERM/SIGINT."""
    args = parse_args(argv)
    # kserve.model_server parses sys.argv at import time (with prefix matching, so our --model
    # would be read as its --model_name); hide our flags and pass every setting explicitly.
    sys.argv = sys.argv[:1]
    import kserve
    from kserve import model_server
    from kserve.errors import InvalidInput
    from kserve.utils.numpy_codec import from_np_dtype
    from kserve.utils.utils import generate_uuid

    class OnnxModel(kserve.Model):  # type: ignore[misc]  # kserve is untyped
        """A KServe model backed by one onnxruntime session, run once per V2 request."""

        def __init__(self, name: str, path: Path) -> None:
            super().__init__(name)
            self.path = path
            self.session: ort.InferenceSession | None = None

        def load(self) -> bool:
            self.session = make_session(self.path)
            self.input_names = {i.name for i in self.session.get_inputs()}
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.ready = True
            return self.ready

        def get_input_types(self) -> list[dict[str, Any]]:
            assert self.session is not None
            return _metadata(self.session.get_inputs())

        def get_output_types(self) -> list[dict[str, Any]]:
            assert self.session is not None
            return _metadata(self.session.get_outputs())

        # A plain (not async) predict: KServe calls it inline on the event loop, which is how
        # its own sklearn/xgboost servers work; a tiny model is cheaper to run than to hand
        # off to a thread.
        def predict(
            self,
            payload: kserve.InferRequest,
            headers: dict[str, str] | None = None,
        ) -> kserve.InferResponse:
            assert self.session is not None
            if not isinstance(payload, kserve.InferRequest):
                raise InvalidInput("only Open Inference Protocol (V2) requests are served")
            feeds: dict[str, np.ndarray] = {}
            for tensor in payload.inputs:
                if tensor.name not in self.input_names:
                    raise InvalidInput(f"unknown input {tensor.name!r}")
                # as_numpy() honours the declared datatype and shape for JSON and binary data.
                feeds[tensor.name] = tensor.as_numpy()
            missing = self.input_names - feeds.keys()
            if missing:
                raise InvalidInput(f"missing inputs {sorted(missing)}")
            wanted = (
                [o.name for o in payload.request_outputs]
                if payload.request_outputs
                else self.output_names
            )
            unknown = set(wanted) - set(self.output_names)
            if unknown:
                raise InvalidInput(f"unknown outputs {sorted(unknown)}")
            results = self.session.run(wanted, feeds)
            # Hand the arrays over as they are: InferResponse.to_rest() encodes each one exactly
            # once, as JSON or binary per the request's binary_data parameters. Calling
            # set_data_from_numpy() here as well would encode twice.
            outputs = [
                kserve.InferOutput(
                    name=name,
                    shape=list(array.shape),
                    datatype=from_np_dtype(array.dtype),
                    data=array,
                )
                for name, array in zip(wanted, results, strict=True)
            ]
            return kserve.InferResponse(
                response_id=payload.id or generate_uuid(),
                model_name=self.name,
                infer_outputs=outputs,
                use_binary_outputs=payload.use_binary_outputs,
                requested_outputs=payload.request_outputs,
            )

    class LoopbackRESTServer(model_server.RESTServer):  # type: ignore[misc]
        """KServe's REST server, listening on --host instead of its hard-wired 0.0.0.0."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            # The uvicorn server keeps this Config object and binds when it starts serving.
            self.config.host = args.host

    # ModelServer.start() looks RESTServer up in its module at call time.
    model_server.RESTServer = LoopbackRESTServer

    model = OnnxModel(args.name, args.model)
    model.load()
    server = kserve.ModelServer(
        http_port=args.port,
        workers=1,
        enable_grpc=False,
        enable_docs_url=False,
        enable_latency_logging=args.request_logs,
    )
    if not args.request_logs:
        # ModelServer() has configured logging by now; silence only the per-request lines.
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
        logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    server.start([model])


if __name__ == "__main__":
    main(sys.argv[1:])

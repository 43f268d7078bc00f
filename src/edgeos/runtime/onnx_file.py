"""Reading an ONNX file: validation with the ONNX checker and its input/output signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeos.errors import InvalidModelError
from edgeos.protocol.datatypes import from_onnx_elem_type

if TYPE_CHECKING:
    from edgeos.manifests import TensorSpec


@dataclass(frozen=True)
class OnnxSignature:
    """What an ONNX file declares about itself."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    opset: int


def inspect_onnx(data: bytes, source: str) -> OnnxSignature:
    """Parse and check an ONNX model held in memory; raise InvalidModelError if unusable."""
    import onnx  # heavy: imported only when a model file is actually read

    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InvalidModelError(f"{source} is not an ONNX model ({exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise InvalidModelError(f"{source} is not an ONNX model (no graph in the file)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InvalidModelError(f"{source} fails the ONNX checker: {first}") from exc
    initializers = {init.name for init in model.graph.initializer}
    inputs = [_spec(value, source) for value in model.graph.input if value.name not in initializers]
    outputs = [_spec(value, source) for value in model.graph.output]
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxSignature(inputs, outputs, opset)


def _spec(value: object, source: str) -> TensorSpec:
    from edgeos.manifests.model import TensorSpec  # pydantic: only when a file is read

    name: str = value.name  # type: ignore[attr-defined]
    tensor_type = value.type.tensor_type  # type: ignore[attr-defined]
    info = from_onnx_elem_type(tensor_type.elem_type)
    if info is None:
        raise InvalidModelError(
            f"{source}: tensor '{name}' has ONNX element type {tensor_type.elem_type}, which "
            "the inference protocol cannot carry"
        )
    shape = [dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim]
    return TensorSpec(name=name, datatype=info.name, shape=shape)

"""Local model runtime: the registry, the ONNX Runtime host, quantization, profiling and
the Open Inference Protocol (V2) API."""

from edgeos.runtime.host import InferenceResult, LoadedModel, ModelHost
from edgeos.runtime.registry import ModelRegistry
from edgeos.runtime.sessions import HostConfig

__all__ = ["HostConfig", "InferenceResult", "LoadedModel", "ModelHost", "ModelRegistry"]

"""YAML manifests as pydantic models, with errors that name the file and the field."""

from edgeos.manifests.loader import load_manifest, parse_manifest
from edgeos.manifests.model import (
    BatchingSpec,
    ModelManifest,
    ModelSpec,
    PrivacyClass,
    TensorSpec,
    validate_model_name,
    validate_version,
)

__all__ = [
    "BatchingSpec",
    "ModelManifest",
    "ModelSpec",
    "PrivacyClass",
    "TensorSpec",
    "load_manifest",
    "parse_manifest",
    "validate_model_name",
    "validate_version",
]

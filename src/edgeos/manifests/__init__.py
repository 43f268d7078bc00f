"""YAML manifests as pydantic models, with errors that name the file and the field.

The names below are imported on first use (PEP 562): pydantic and the schemas it builds
cost about 12 MB resident, and a node with no model and no agent never reads a manifest.
Importing a submodule that needs no pydantic (``edgeos.manifests.cron``) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeos.lazy import lazy_exports

if TYPE_CHECKING:
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

_HOME = {
    "load_manifest": "loader",
    "parse_manifest": "loader",
    "BatchingSpec": "model",
    "ModelManifest": "model",
    "ModelSpec": "model",
    "PrivacyClass": "model",
    "TensorSpec": "model",
    "validate_model_name": "model",
    "validate_version": "model",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())

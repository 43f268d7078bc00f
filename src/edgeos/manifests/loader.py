"""Loading a manifest file into a pydantic model, with precise, user-readable errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgeos.errors import ManifestError

M = TypeVar("M", bound=BaseModel)


def load_manifest(path: Path, model: type[M]) -> M:
    """Read a YAML manifest file; raise ManifestError naming the file and each bad field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), [f"cannot read file: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(str(path), [f"{where}not valid YAML ({problem})"]) from exc
    return parse_manifest({} if data is None else data, model, str(path))


def parse_manifest(data: Any, model: type[M], source: str) -> M:
    """Validate already-parsed manifest data; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise ManifestError(source, ["the manifest must be a mapping of field: value"])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(source, [_describe(err) for err in exc.errors()]) from exc


def _describe(err: Any) -> str:
    field = ".".join(str(part) for part in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"field '{field}': unknown field"
    if err["type"] == "missing":
        return f"field '{field}': required"
    return f"field '{field}': {err['msg']}"

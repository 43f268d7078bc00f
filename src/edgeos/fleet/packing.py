"""Artifact archives: a directory packed as tar.gz, the same bytes every time, and read back
with every entry checked.

Packing is deterministic (entries sorted, times, owners and modes normalized, no gzip
timestamp), so publishing the same directory twice uploads the same bytes and the fleet
sees the same version, not a conflict.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path, PurePosixPath

from edgeos.errors import ConfigError, VerificationError

# Never packed: interpreter caches and editor or VCS litter differ between machines.
_SKIP_DIRS = {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")


def pack_directory(directory: Path) -> bytes:
    """``directory``'s files as tar.gz bytes, paths relative to it; ConfigError if unusable."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    files: list[tuple[str, Path]] = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory)
        if any(part in _SKIP_DIRS for part in relative.parts) or path.name.endswith(_SKIP_SUFFIXES):
            continue
        if path.is_symlink():
            raise ConfigError(f"{path} is a symbolic link: an artifact holds regular files only")
        if path.is_file():
            files.append((relative.as_posix(), path))
    if not files:
        raise ConfigError(f"{directory} holds no files")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(files):
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), compresslevel=9, mtime=0)


def read_archive(data: bytes, source: str, *, max_bytes: int) -> dict[str, bytes]:
    """The regular files of a tar.gz, by relative path.

    VerificationError naming ``source`` and the entry for anything but plain files and
    directories, a path that leaves the archive, or more than ``max_bytes`` unpacked.
    """
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                name = _member_name(member.name, source)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise VerificationError(
                        f"{source}: entry {member.name!r} is not a regular file or directory"
                    )
                total += member.size
                if total > max_bytes:
                    raise VerificationError(f"{source}: unpacks to more than {max_bytes} bytes")
                if name in files:
                    raise VerificationError(f"{source}: entry {name!r} appears twice")
                handle = tar.extractfile(member)
                files[name] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as exc:
        raise VerificationError(f"{source}: not a readable tar.gz archive ({exc})") from exc
    return files


def _member_name(name: str, source: str) -> str:
    path = PurePosixPath(name)
    parts = [p for p in path.parts if p != "."]
    if path.is_absolute() or ".." in parts or not parts or "\\" in name:
        raise VerificationError(f"{source}: entry {name!r} leaves the archive")
    return "/".join(parts)


def pack_artifact(
    kind: str, path: Path, *, name: str | None = None, version: str | None = None
) -> tuple[bytes, str, str]:
    """``(bytes, name, version)`` of an artifact to publish from ``path``.

    Agents and models are directories (packed with :func:`pack_directory`), policies YAML
    files. Name and version come from the manifest (``agent.yaml``, ``model.yaml``, the
    policy) unless given; ConfigError when neither says.
    """
    import yaml

    path = Path(path)
    manifest_name = {"agent": "agent.yaml", "model": "model.yaml"}.get(kind)
    if manifest_name is None and kind != "policy":
        raise ConfigError(f"artifact kind {kind!r}: use agent, model or policy")
    if manifest_name is not None:
        data = pack_directory(path)
        manifest_path = path / manifest_name
        if not manifest_path.is_file():
            raise ConfigError(f"{path}: no {manifest_name}: is it a {kind} directory?")
    else:
        if not path.is_file():
            raise ConfigError(f"{path}: a policy is a YAML file")
        data = path.read_bytes()
        manifest_path = path
    try:
        manifest = yaml.safe_load(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{manifest_path}: not readable YAML ({exc})") from exc
    manifest = manifest if isinstance(manifest, dict) else {}
    name = name or (str(manifest["name"]) if manifest.get("name") is not None else None)
    version = version or (str(manifest["version"]) if manifest.get("version") is not None else None)
    if not name or not version:
        missing = "name" if not name else "version"
        raise ConfigError(f"{manifest_path} gives no {missing}: pass --{missing}")
    return data, name, version

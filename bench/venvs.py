"""Virtualenvs for the peers of the benchmarks, each from its own pinned requirements.

Peers (KServe, LangGraph) pin versions that conflict with edgeos', so each runs in its own
virtualenv beside the project. Standard library only at module level, so scripts that must
also run under a peer's interpreter can import this.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

_STAMP = ".edgeos-requirements.sha256"


def _venv_python(path: Path) -> Path:
    return path / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(path: Path, requirements: Path, *, label: str = "venv") -> Path:
    """Create or refresh a virtualenv at ``path`` from ``requirements``; return its interpreter.

    ``python -m venv`` and ``pip install -r`` run only when the venv is missing or the
    requirements changed since the last successful install, tracked by a stamp file holding
    their SHA-256. Progress is shown as a rich status line on stderr.
    """
    from rich.console import Console

    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    python = _venv_python(path)
    stamp = path / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    console = Console(stderr=True)
    with console.status(f"{label}: creating {path}") as status:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        stamp.unlink(missing_ok=True)  # a half-done install must not look current
        status.update(f"{label}: installing requirements")
        cmd = [
            str(python),
            *("-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"),
            *("-r", str(requirements)),
        ]
        lines: list[str] = []
        with subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as pip:
            assert pip.stdout is not None
            for line in pip.stdout:
                lines.append(line)
                if line.strip():
                    status.update(f"{label}: {line.strip()[:100]}")
        if pip.returncode != 0:
            console.print("".join(lines[-40:]), markup=False, highlight=False)
            raise RuntimeError(f"pip install -r {requirements.name} failed")
    stamp.write_text(digest + "\n")
    console.print(f"{label} ready: {path}")
    return python

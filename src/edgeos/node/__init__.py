"""The node daemon: wires the layers together and serves the local HTTP API.

The names below are imported on first use (PEP 562), so a submodule that needs none of
the daemon's web stack (``edgeos.node.heap``, ``edgeos.node.tokens``) stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeos.lazy import lazy_exports

if TYPE_CHECKING:
    from edgeos.node.daemon import Node, host_config, run_node

_HOME = {"Node": "daemon", "host_config": "daemon", "run_node": "daemon"}

__all__ = ["Node", "host_config", "run_node"]

__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())

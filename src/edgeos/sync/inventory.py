"""What the node tells the fleet about itself: software, hardware, execution providers."""

from __future__ import annotations

import os
import platform
import socket
import sys
from collections.abc import Sequence

from edgeos import __version__
from edgeos.protocol.fleet import Inventory


def collect_inventory(configured_providers: Sequence[str] = ("CPUExecutionProvider",)) -> Inventory:
    """This node's inventory.

    The execution providers are ONNX Runtime's available ones when it is loaded already
    (a model is); otherwise the node's configured ones, so that reporting to the fleet
    does not load ONNX Runtime (tens of MB) into a node that runs no model.
    """
    ort = sys.modules.get("onnxruntime")
    providers = list(configured_providers)
    if ort is not None:
        available = set(ort.get_available_providers())
        providers = [p for p in providers if p in available] or sorted(available)
    return Inventory(
        edgeos_version=__version__,
        hostname=socket.gethostname(),
        machine=platform.machine() or "unknown",
        cpu_count=os.cpu_count() or 1,
        memory_mb=_memory_mb(),
        execution_providers=providers,
    )


def _memory_mb() -> int:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on every platform
        return 0
    return int(pages * size // (1024 * 1024))

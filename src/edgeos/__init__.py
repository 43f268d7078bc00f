"""edgeos: an AI edge computing OS.

The public Python surface is deliberately small; most users drive edgeos through the
``edgeos`` command and the node's HTTP API.
"""

from edgeos.errors import EdgeOSError

__version__ = "0.1.0"

__all__ = ["EdgeOSError", "__version__"]

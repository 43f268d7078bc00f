"""The node daemon: wires the layers together and serves the local HTTP API."""

from edgeos.node.daemon import Node, host_config, run_node

__all__ = ["Node", "host_config", "run_node"]

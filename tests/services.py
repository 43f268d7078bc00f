"""Run a command with the test services that answer on this machine.

``python -m tests.services pytest ...`` sets ``EDGEOS_TEST_POSTGRES_URL``,
``EDGEOS_TEST_MQTT_URL`` and ``EDGEOS_TEST_NATS_URL`` for each service that answers on
loopback (unless already set), then runs the command. Tests that need a service skip
with a reason when its variable is unset, so a machine without them still passes.
"""

from __future__ import annotations

import os
import socket
import sys

SERVICES = {
    "EDGEOS_TEST_POSTGRES_URL": ("127.0.0.1", 5432, "postgresql://postgres@127.0.0.1:5432/test"),
    "EDGEOS_TEST_MQTT_URL": ("127.0.0.1", 1883, "mqtt://127.0.0.1:1883"),
    "EDGEOS_TEST_NATS_URL": ("127.0.0.1", 4222, "nats://127.0.0.1:4222"),
}


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def main() -> None:
    """Set the variables of the services that answer, then exec the command."""
    if len(sys.argv) < 2:
        sys.exit("usage: python -m tests.services COMMAND [ARGS...]")
    for var, (host, port, url) in SERVICES.items():
        if var not in os.environ and answers(host, port):
            os.environ[var] = url
        print(f"{var}={os.environ.get(var, '(not set: tests that need it skip)')}")
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()

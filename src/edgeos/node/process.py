"""Running a node as a child process: for the demo, the tests and the benchmarks.

The child is a real ``edgeos node run``; ``stop`` sends SIGTERM and waits for the graceful
shutdown, ``kill`` sends SIGKILL, as a power cut would.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx

from edgeos.errors import UnavailableError
from edgeos.node.tokens import bearer, local_token_path, read_local_token


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """A child process serving HTTP, started and awaited until ``ready_path`` answers 200.

    For an HTTPS server, ``verify`` is what httpx checks its certificate with (an
    SSLContext that trusts the server's CA). For a node, ``token_file`` is its local API
    token's file, read once the node is ready: :attr:`headers` and :meth:`client` present it.
    """

    def __init__(
        self,
        command: list[str],
        base_url: str,
        *,
        ready_path: str = "/v2/health/ready",
        env: dict[str, str] | None = None,
        startup_timeout: float = 60.0,
        verify: ssl.SSLContext | bool = True,
        token_file: Path | None = None,
    ) -> None:
        self.command = command
        self.verify = verify
        self.url = base_url
        self.ready_path = ready_path
        self.env = env
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.token_file = token_file
        #: The node's local API token, once started (None for other servers).
        self.token: str | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="edgeos-server-", suffix=".log")  # noqa: SIM115

    def start(self) -> ServerProcess:
        """Start the process and wait until it is ready; raise with its log if it dies."""
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(self.env or {})},
        )
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(base_url=self.url, timeout=2.0, verify=self.verify) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise UnavailableError(
                        f"{self.command[0]} exited with {self.process.returncode} at start-up:\n"
                        f"{self.log()}"
                    )
                try:
                    if client.get(self.ready_path).status_code == 200:
                        if self.token_file is not None:
                            self.token = read_local_token(self.token_file.parent)
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.kill()
        raise UnavailableError(
            f"server not ready at {self.url} after {self.startup_timeout:.0f} s:\n{self.log()}"
        )

    @property
    def headers(self) -> dict[str, str]:
        """The headers that present the server's token (none without one)."""
        return bearer(self.token)

    def client(self, timeout: float = 30.0) -> httpx.Client:
        """An HTTP client for the server, its token presented."""
        return httpx.Client(
            base_url=self.url, headers=self.headers, timeout=timeout, verify=self.verify
        )

    def log(self) -> str:
        """Everything the process printed so far."""
        return Path(self._log.name).read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait for the graceful exit (SIGKILL after ``timeout``)."""
        if self.process is None or self.process.poll() is not None:
            return self.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL: no shutdown code runs, as after a power cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return self.returncode

    @property
    def returncode(self) -> int:
        """The exit status (negative: killed by that signal); -1 while running."""
        code = None if self.process is None else self.process.poll()
        return -1 if code is None else code

    def __enter__(self) -> ServerProcess:
        try:
            return self.start()
        except BaseException:
            self._log.close()  # no __exit__ follows a failed __enter__
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._log.close()


def node_process(
    data_dir: Path,
    *,
    port: int | None = None,
    host: str = "127.0.0.1",
    https: ssl.SSLContext | None = None,
    **env: str,
) -> ServerProcess:
    """A real ``edgeos node run`` on loopback over ``data_dir`` (not started yet); for a
    node that serves HTTPS (``tls_cert_file`` in its ``node.yaml``), ``https`` is what
    its certificate is checked with."""
    port = port or free_port(host)
    command = [
        sys.executable, "-m", "edgeos", "node", "run",
        "--data-dir", str(data_dir), "--host", host, "--port", str(port),
    ]  # fmt: skip
    scheme = "http" if https is None else "https"
    return ServerProcess(
        command, f"{scheme}://{host}:{port}", env=env, token_file=local_token_path(data_dir),
        verify=True if https is None else https,
    )  # fmt: skip

"""Load generation and server-process helpers for the serving benchmarks.

Everything here talks to servers on the loopback interface through the Open Inference Protocol
(KServe V2) REST API, using the stock ``tritonclient[http]`` client so that every server under
test receives byte-for-byte the same requests (but for the ``headers`` a server asks for, such
as an edgeos node's ``Authorization: Bearer`` token):

* :func:`run_load` drives a model at a fixed concurrency and returns a :class:`LoadResult`.
* :func:`infer_once` fetches one response, for checking outputs against onnxruntime.
* :func:`wait_ready` and :func:`serve_process` start, probe and stop server processes.
* :func:`ensure_kserve_venv` maintains the separate virtualenv the KServe peer runs in.

Requests are JSON only (``binary_data=False`` for inputs and outputs) and always carry
``Content-Type: application/json``: tritonclient omits the header, and KServe then treats the
body as binary-extension bytes and rejects it for lacking ``Inference-Header-Content-Length``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import numpy as np
import tritonclient.http as httpclient

# Scripts here import their neighbours; -I (isolated mode) leaves the script's folder off sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from venvs import ensure_venv

JSON_HEADERS = {"Content-Type": "application/json"}
"""Headers sent with every inference request (see the module docstring)."""

REQUIREMENTS_KSERVE = Path(__file__).with_name("requirements-kserve.txt")
"""Pinned requirements of the KServe peer's virtualenv."""

_LOG_TAIL = 4000  # characters of a server's log shown when it fails


@dataclass(frozen=True)
class LoadResult:
    """Outcome of one :func:`run_load` run (warm-up excluded).

    ``throughput`` counts successful requests per second of wall time; the latency percentiles
    are over successful requests only. ``first_error`` is the text of the first failure, if any.
    """

    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p99_ms: float
    first_error: str | None = None


def _check_loopback(url: str) -> None:
    """Refuse anything but ``host:port`` on the loopback interface."""
    if "://" in url:
        raise ValueError(f"url must be host:port without a scheme, got {url!r}")
    host = url.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"benchmarks only talk to loopback servers, got {url!r}")


def _infer_inputs(inputs: Mapping[str, np.ndarray]) -> list[httpclient.InferInput]:
    tensors = []
    for name, array in inputs.items():
        tensor = httpclient.InferInput(name, list(array.shape), _v2_datatype(array))
        tensor.set_data_from_numpy(array, binary_data=False)
        tensors.append(tensor)
    return tensors


def _v2_datatype(array: np.ndarray) -> str:
    datatype: str = httpclient.np_to_triton_dtype(array.dtype)
    if datatype is None:
        raise ValueError(f"no V2 datatype for numpy dtype {array.dtype}")
    return datatype


def _output_names(
    client: httpclient.InferenceServerClient, model: str, headers: Mapping[str, str]
) -> list[str]:
    metadata: dict[str, Any] = client.get_model_metadata(model, headers=dict(headers))
    return [output["name"] for output in metadata["outputs"]]


def _infer_call(
    client: httpclient.InferenceServerClient,
    model: str,
    inputs: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None,
    headers: Mapping[str, str],
) -> Callable[[], Any]:
    """Build a zero-argument callable issuing one JSON inference request."""
    tensors = _infer_inputs(inputs)
    names = list(outputs) if outputs is not None else _output_names(client, model, headers)
    # Naming the outputs is what makes the server answer in JSON: with no outputs listed,
    # tritonclient asks for binary_data_output instead.
    requested = [httpclient.InferRequestedOutput(n, binary_data=False) for n in names]
    sent = {**JSON_HEADERS, **headers}

    def call() -> Any:
        # A fresh dict per request: tritonclient adds headers to the dict it is given.
        return client.infer(model, tensors, outputs=requested, headers=dict(sent))

    return call


def infer_once(
    url: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    timeout: float = 30.0,
    headers: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Send one request exactly as :func:`run_load` does and return the decoded outputs.

    Output names come from ``outputs`` or, if omitted, from the model's V2 metadata.
    ``headers`` go with every request (an edgeos node's token, say).
    """
    _check_loopback(url)
    extra = headers or {}
    client = httpclient.InferenceServerClient(
        url, connection_timeout=timeout, network_timeout=timeout
    )
    try:
        names = list(outputs) if outputs is not None else _output_names(client, model, extra)
        result = _infer_call(client, model, inputs, names, extra)()
        return {name: result.as_numpy(name) for name in names}
    finally:
        client.close()


@dataclass
class _Drive:
    """Counters shared by the request loops of one phase (greenlets never race)."""

    budget: float
    deadline: float
    max_errors: int
    issued: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies: list[float] = field(default_factory=list)

    def more(self) -> bool:
        return (
            self.issued < self.budget
            and self.errors < self.max_errors
            and time.perf_counter() < self.deadline
        )


def _drive(call: Callable[[], Any], concurrency: int, state: _Drive, timeout: float) -> float:
    """Run ``concurrency`` request loops until ``state`` says stop; return the wall time."""

    def loop() -> None:
        while state.more():
            state.issued += 1
            start = time.perf_counter()
            try:
                call()
            except Exception as exc:  # the run reports failures rather than dying on them
                state.errors += 1
                if state.first_error is None:
                    state.first_error = f"{type(exc).__name__}: {exc}"
                continue
            state.latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    loops = [gevent.spawn(loop) for _ in range(concurrency)]
    # No new request starts after the deadline and each one is bounded by the network
    # timeout, so this only expires if the client itself wedges.
    gevent.joinall(loops, timeout=max(0.0, state.deadline - start) + timeout + 5.0)
    gevent.killall(loops, block=True, timeout=5.0)
    return time.perf_counter() - start


def run_load(
    url: str,
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    warmup: int = 50,
    outputs: Sequence[str] | None = None,
    timeout: float = 30.0,
    max_seconds: float = 600.0,
    max_errors: int = 100,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """Drive ``model`` at ``url`` with exactly ``concurrency`` requests in flight.

    The run stops after ``requests`` requests or ``duration`` seconds, whichever comes first
    (at least one must be given; ``max_seconds`` caps runs given only a count), or once
    ``max_errors`` requests have failed. ``warmup`` requests are sent first at the same
    concurrency (which also opens every keep-alive connection) and are not counted.

    How the load is generated, and why: one ``InferenceServerClient`` with a pool of
    ``concurrency`` keep-alive connections is shared by ``concurrency`` gevent greenlets, each
    looping over the blocking ``client.infer()``. A greenlet yields while its request is on the
    wire, so every connection always carries one request: a closed loop at exactly
    ``concurrency``, with each latency timed around its own call. ``async_infer()`` is not used
    because it sleeps 10 ms after every submission (``gevent.sleep(0.01)`` to let the greenlet
    start), which would cap a refilled window at about 100 requests/s and measure the client.
    OS threads are not used either: the client is documented as not thread-safe, and threads
    would add GIL contention on a 2-core machine where the server needs the other core.
    A latency is what a client observes for one ``infer()`` call: request encoding, the round
    trip and response decoding. The request JSON is rebuilt for every call, as a real client's
    would be.

    Output names come from ``outputs`` or, if omitted, from the model's V2 metadata.
    ``headers`` go with every request (an edgeos node's token, say).
    """
    _check_loopback(url)
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if requests is None and duration is None:
        raise ValueError("give requests, duration or both: a load run must be bounded")
    client = httpclient.InferenceServerClient(
        url, concurrency=concurrency, connection_timeout=timeout, network_timeout=timeout
    )
    try:
        call = _infer_call(client, model, inputs, outputs, headers or {})
        if warmup > 0:
            warm = _Drive(warmup, time.perf_counter() + max_seconds, max_errors)
            _drive(call, concurrency, warm, timeout)
            if not warm.latencies:
                raise RuntimeError(f"every warm-up request failed: {warm.first_error}")
        limit = max_seconds if duration is None else min(duration, max_seconds)
        state = _Drive(
            math.inf if requests is None else requests,
            time.perf_counter() + limit,
            max_errors,
        )
        seconds = _drive(call, concurrency, state, timeout)
    finally:
        client.close()
    ok = len(state.latencies)
    if ok:
        p50, p99 = np.percentile(np.asarray(state.latencies) * 1000.0, [50, 99])
    else:
        p50 = p99 = math.nan
    return LoadResult(
        concurrency=concurrency,
        requests=ok + state.errors,
        errors=state.errors,
        seconds=seconds,
        throughput=ok / seconds if seconds > 0 else 0.0,
        p50_ms=float(p50),
        p99_ms=float(p99),
        first_error=state.first_error,
    )


# No proxy handler: an http_proxy setting must not send loopback probes elsewhere.
_PROBE = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _is_ready(url: str, model: str, headers: Mapping[str, str]) -> bool:
    for path in ("/v2/health/ready", f"/v2/models/{model}/ready"):
        request = urllib.request.Request(f"http://{url}{path}", headers=dict(headers))
        try:
            with _PROBE.open(request, timeout=2.0) as response:
                if response.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            # Connection refused/reset while the server starts, or a 4xx/5xx (HTTPError).
            return False
    return True


def wait_ready(
    url: str, model: str, timeout: float, headers: Mapping[str, str] | None = None
) -> None:
    """Poll until the server and ``model`` report ready; raise TimeoutError after ``timeout``."""
    _check_loopback(url)
    deadline = time.monotonic() + timeout
    while not _is_ready(url, model, headers or {}):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{model} at {url} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text if len(text) <= _LOG_TAIL else "...\n" + text[-_LOG_TAIL:]


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, SIGKILL it if still alive after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            # The server runs in its own session (start_new_session), so its process group is
            # exactly it and any workers it forked.
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def serve_process(
    cmd: list[str],
    url: str,
    model: str,
    timeout: float = 60,
    grace: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server with ``cmd``, wait until ``model`` is ready at ``url`` (asked with
    ``headers``), stop it on exit.

    The server's stdout and stderr go to a temporary log file, so per-request logging cannot
    flood the terminal. If the server exits early, never becomes ready, or the ``with`` body
    fails, the tail of that log is shown (and the file kept); otherwise it is deleted.
    Shutdown is SIGTERM, then SIGKILL after ``grace`` seconds.
    """
    _check_loopback(url)
    fd, name = tempfile.mkstemp(prefix="edgeos-bench-", suffix=".log")
    os.close(fd)
    log = Path(name)
    try:
        # O_APPEND: the child must not share a file offset with our later reads.
        with log.open("ab") as sink:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
    except OSError:
        log.unlink(missing_ok=True)
        raise
    failed = True
    try:
        deadline = time.monotonic() + timeout
        while not _is_ready(url, model, headers or {}):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {proc.returncode} before becoming ready "
                    "(its log is on stderr)"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{model} at {url} not ready after {timeout:.0f}s (its log is on stderr)"
                )
            time.sleep(0.1)
        yield proc
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run (code {proc.returncode})")
        failed = False
    finally:
        _stop(proc, grace)
        if failed:
            print(f"--- server log ({log}) ---\n{_tail(log)}", file=sys.stderr)
        else:
            log.unlink(missing_ok=True)


def ensure_kserve_venv(path: Path) -> Path:
    """Create or refresh the KServe peer's virtualenv at ``path``; return its interpreter."""
    return ensure_venv(path, REQUIREMENTS_KSERVE, label="KServe venv")

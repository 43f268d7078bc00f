"""Virtual nodes that speak the real fleet protocol, many to a process.

Each virtual device makes its own key, enrolls with a join token (a CSR for its own id),
and then syncs over mTLS with its own certificate: the fleet cannot tell it from a real
node. Devices "apply" what the fleet assigns at once and report it active, except the
versions named in ``fail``, which they report failed, as a node whose health check
refused a bad version would. Used by ``edgeos fleet simulate`` for load tests and rollout
rehearsals, and by ``bench/fleet_scale.py``.

The HTTP/1.1 client is a few lines over asyncio streams on purpose: an httpx client per
device would cost the simulator more CPU and memory than the fleet it is measuring.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import random
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import orjson

from edgeos.errors import EdgeOSError, UnavailableError
from edgeos.protocol.fleet import (
    API,
    ActualArtifact,
    EnrollRequest,
    EnrollResponse,
    Health,
    Inventory,
    SyncRequest,
    SyncResponse,
)
from edgeos.protocol.telemetry import CONTENT_TYPE as TELEMETRY_CONTENT_TYPE
from edgeos.protocol.telemetry import MINUTE_S, compressor
from edgeos.security.certs import make_csr
from edgeos.security.keys import generate_key, write_private_key
from edgeos.security.tls import fetch_ca
from edgeos.security.tokens import parse_token
from edgeos.state.ids import new_id

#: What a request of a device may fail with, counted by its type's name.
_FAILURES = (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, EdgeOSError)


@dataclass
class SimulationConfig:
    """What to simulate: how many devices, against which fleet, how often they sync."""

    fleet_url: str
    join_token: str
    devices: int
    sync_interval: float = 60.0
    fail: frozenset[str] = frozenset()
    """Artifact refs (``model/name@version``) every device refuses, as a failed health check."""
    keep_alive: bool = True
    """Keep each device's TLS connection open between syncs, as a node does; False opens
    a new connection (a full TLS handshake) for every sync, the worst case."""
    telemetry: bool = False
    """Each device also sends a telemetry batch after each sync, as a node's uplink does:
    a minute of its agent's and its model's KPIs with latency sketches (the same agent and
    model on every device, so every batch lands on the same fleet-wide sketches)."""
    enroll_concurrency: int = 32
    timeout: float = 30.0
    seed: int = 0


@dataclass
class SyncStats:
    """Request latencies (milliseconds) and errors seen since the last :meth:`reset`."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def reset(self) -> None:
        """Start a new measuring window."""
        self.latencies_ms.clear()
        self.errors.clear()
        self.started = time.monotonic()

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) of the window's latencies, or None when there are none."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    @property
    def error_count(self) -> int:
        """Failed requests in the window."""
        return sum(self.errors.values())

    def rate(self) -> float:
        """Requests per second over the window."""
        return len(self.latencies_ms) / max(1e-9, time.monotonic() - self.started)


class _Endpoint:
    """Where the fleet listens, and how long a request may take."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise EdgeOSError(f"fleet URL {url!r}: expected https://HOST[:PORT]")
        self.host = parts.hostname
        self.port = parts.port or 443
        self.timeout = timeout


class _Connection:
    """One HTTP/1.1 connection to the fleet, kept open between requests as a node's is.

    A connection the fleet closed while idle (its keep-alive ran out) is opened again
    once, transparently; a failure on a fresh connection is the caller's to count.
    """

    def __init__(self, endpoint: _Endpoint, context: ssl.SSLContext) -> None:
        self.endpoint = endpoint
        self.context = context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(
        self, path: str, body: bytes, *, keep_alive: bool, content_type: str = "application/json"
    ) -> tuple[int, bytes]:
        """POST ``body``; returns (status, response body)."""
        return await asyncio.wait_for(
            self._post(path, body, keep_alive, content_type), self.endpoint.timeout
        )

    async def _post(
        self, path: str, body: bytes, keep_alive: bool, content_type: str
    ) -> tuple[int, bytes]:
        while True:
            fresh = self._writer is None
            if self._reader is None or self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.endpoint.host, self.endpoint.port, ssl=self.context,
                    server_hostname=self.endpoint.host,
                )  # fmt: skip
            try:
                self._writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {self.endpoint.host}\r\n"
                    f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                    f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n".encode()
                    + body
                )
                await self._writer.drain()
                status, payload, closing = await _read_response(self._reader, path)
            except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
                await self.close()
                if fresh:
                    raise
                continue  # the fleet dropped the idle connection: open a new one
            if closing or not keep_alive:
                await self.close()
            return status, payload

    async def close(self) -> None:
        """Close the connection (if open)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()


async def _read_response(reader: asyncio.StreamReader, path: str) -> tuple[int, bytes, bool]:
    """(status, body, whether the server closes the connection) of one response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise UnavailableError(f"the fleet sent no HTTP response to {path}") from exc
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    payload = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, payload, headers.get("connection", "").lower() == "close"


@dataclass
class VirtualDevice:
    """One simulated node: its identity, what it runs, and its connection to the fleet."""

    device_id: str
    connection: _Connection
    revision: int = 0
    actual: dict[tuple[str, str], ActualArtifact] = field(default_factory=dict)
    health: Health = field(default_factory=lambda: Health(since=time.time()))
    reported_inventory: bool = False
    telemetry_seq: int = 0

    def request(self, inventory: Inventory) -> bytes:
        """The next sync request's body."""
        body = SyncRequest(
            device_id=self.device_id,
            revision=self.revision,
            actual=list(self.actual.values()),
            health=self.health,
            inventory=None if self.reported_inventory else inventory,
        )
        return orjson.dumps(body.model_dump(mode="json"))

    def apply(self, response: SyncResponse, fail: frozenset[str], rng: random.Random) -> None:
        """Take the desired state at once; refuse the versions named in ``fail``."""
        self.reported_inventory = True
        changed = False
        for item in response.desired:
            key = (item.kind, item.name)
            current = self.actual.get(key)
            if current is not None and current.version == item.version:
                continue
            changed = True
            ref = f"{item.kind}/{item.name}@{item.version}"
            if ref in fail:
                self.actual[key] = ActualArtifact(
                    kind=item.kind,
                    name=item.name,
                    version=item.version,
                    state="failed",
                    reason="health check failed (simulated)",
                )
            else:
                self.actual[key] = ActualArtifact(
                    kind=item.kind, name=item.name, version=item.version, state="active"
                )
        if changed:
            self.health = Health(since=time.time())
        runs = self.health.runs + rng.randint(0, 3)
        self.health = self.health.model_copy(
            update={"runs": runs, "decisions": runs, "inference_p99_ms": rng.uniform(1.0, 3.0)}
        )
        self.revision = response.revision


class Simulation:
    """N virtual devices against one fleet: :meth:`enroll`, then :meth:`run`."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.devices: list[VirtualDevice] = []
        self.stats = SyncStats()
        #: The telemetry batches' latencies and errors (with ``config.telemetry``).
        self.telemetry_stats = SyncStats()
        self._kpis: _KpiBatches | None = None  # made at the first batch
        self._endpoint = _Endpoint(config.fleet_url, config.timeout)
        self._rng = random.Random(config.seed)
        self._files = tempfile.TemporaryDirectory(prefix="edgeos-sim-")
        self._ca_pem = ""
        self._inventory = Inventory(
            edgeos_version="simulated",
            hostname=socket.gethostname(),
            machine="sim",
            cpu_count=2,
            memory_mb=1024,
            execution_providers=["CPUExecutionProvider"],
        )

    async def disconnect(self) -> None:
        """Close every device's connection to the fleet."""
        await asyncio.gather(*(device.connection.close() for device in self.devices))

    def close(self) -> None:
        """Remove the devices' key files."""
        self._files.cleanup()

    async def enroll(self, progress: Callable[[int], None] | None = None) -> None:
        """Enroll every device (bounded concurrency); ``progress`` gets each count done."""
        _, pin = parse_token(self.config.join_token)
        self._ca_pem = await asyncio.to_thread(fetch_ca, self.config.fleet_url, pin)
        anonymous = ssl.create_default_context(cadata=self._ca_pem)
        gate = asyncio.Semaphore(self.config.enroll_concurrency)

        async def one() -> None:
            async with gate:
                self.devices.append(await self._enroll_one(anonymous))
                if progress is not None:
                    progress(len(self.devices))

        await asyncio.gather(*(one() for _ in range(self.config.devices - len(self.devices))))
        # The devices live as long as the simulation: out of the collector's way, so that
        # full collections over thousands of them do not pause every device at once and
        # show up as sync latency the fleet did not cause.
        gc.collect()
        gc.freeze()

    async def _enroll_one(self, anonymous: ssl.SSLContext) -> VirtualDevice:
        device_id = new_id()
        key = generate_key()
        request = EnrollRequest(
            join_token=self.config.join_token,
            device_id=device_id,
            csr_pem=make_csr(key, device_id),
            inventory=self._inventory,
        )
        status, body = await _Connection(self._endpoint, anonymous).post(
            f"{API}/enroll", orjson.dumps(request.model_dump(mode="json")), keep_alive=False
        )
        if status not in (200, 201):
            raise EdgeOSError(f"enrollment refused ({status}): {body.decode(errors='replace')}")
        enrolled = EnrollResponse.model_validate_json(body)
        folder = Path(self._files.name)
        key_path, cert_path = folder / f"{device_id}.key", folder / f"{device_id}.crt"
        write_private_key(key_path, key)
        cert_path.write_text(enrolled.certificate_pem)
        context = ssl.create_default_context(cadata=self._ca_pem)
        context.load_cert_chain(cert_path, key_path)
        return VirtualDevice(device_id, _Connection(self._endpoint, context))

    async def sync(self, device: VirtualDevice) -> None:
        """One sync of one device; its latency or its error goes into :attr:`stats`."""
        started = time.perf_counter()
        try:
            status, body = await device.connection.post(
                f"{API}/sync", device.request(self._inventory), keep_alive=self.config.keep_alive
            )
            if status != 200:
                self._count(f"HTTP {status}")
                return
            device.apply(SyncResponse.model_validate_json(body), self.config.fail, self._rng)
        except _FAILURES as exc:
            await device.connection.close()
            self._count(type(exc).__name__)
            return
        self.stats.latencies_ms.append((time.perf_counter() - started) * 1000)

    async def send_telemetry(self, device: VirtualDevice) -> None:
        """One telemetry batch of one device; its latency or its error goes into
        :attr:`telemetry_stats`."""
        if self._kpis is None:
            self._kpis = _KpiBatches(random.Random(self.config.seed + 1))
        device.telemetry_seq += 1
        body = self._kpis.batch(device.device_id, device.telemetry_seq, time.time())
        started = time.perf_counter()
        try:
            status, _ = await device.connection.post(
                f"{API}/telemetry", body, keep_alive=self.config.keep_alive,
                content_type=TELEMETRY_CONTENT_TYPE,
            )  # fmt: skip
        except _FAILURES as exc:
            await device.connection.close()
            self._count(type(exc).__name__, self.telemetry_stats)
            return
        if status != 200:
            self._count(f"HTTP {status}", self.telemetry_stats)
            return
        self.telemetry_stats.latencies_ms.append((time.perf_counter() - started) * 1000)

    def _count(self, kind: str, stats: SyncStats | None = None) -> None:
        stats = self.stats if stats is None else stats
        stats.errors[kind] = stats.errors.get(kind, 0) + 1

    async def run(self, duration: float) -> SyncStats:
        """The first ``config.devices`` devices sync every ``sync_interval`` seconds (phases
        spread evenly) for ``duration`` seconds; returns the window's stats."""
        self.stats.reset()
        self.telemetry_stats.reset()
        deadline = time.monotonic() + duration
        interval = self.config.sync_interval

        async def loop(device: VirtualDevice, phase: float) -> None:
            await asyncio.sleep(phase)
            while time.monotonic() < deadline:
                next_at = time.monotonic() + interval
                await self.sync(device)
                if self.config.telemetry:
                    await self.send_telemetry(device)
                await asyncio.sleep(max(0.0, min(next_at, deadline) - time.monotonic()))

        active = self.devices[: self.config.devices]
        count = max(1, len(active))
        await asyncio.gather(*(loop(d, interval * i / count) for i, d in enumerate(active)))
        return self.stats


class _KpiBatches:
    """Telemetry batches as a node running one agent and one model sends them: a minute of
    KPIs with latency sketches (drawn once; each batch compressed as a node's is)."""

    AGENT, MODEL = "inventory", "stockout-risk"

    def __init__(self, rng: random.Random) -> None:
        from edgeos.telemetry.sketch import DDSketch

        decision, inference = DDSketch(), DDSketch()
        decision.extend(rng.lognormvariate(-3.0, 0.6) for _ in range(60))
        inference.extend(rng.lognormvariate(-9.0, 0.4) for _ in range(600))
        self._decision = base64.b64encode(decision.to_bytes()).decode()
        self._inference = base64.b64encode(inference.to_bytes()).decode()
        self._compressor = compressor()

    def batch(self, device_id: str, seq: int, now: float) -> bytes:
        """Batch ``seq`` of ``device_id``: the minute before ``now``."""
        minute = int(now // MINUTE_S * MINUTE_S) - MINUTE_S
        records = [
            {"kind": "kpi", "at": minute,
             "data": {"minute": minute, "agent": self.AGENT, "runs": 60, "succeeded": 60,
                      "decision": self._decision}},
            {"kind": "kpi", "at": minute,
             "data": {"minute": minute, "model": self.MODEL, "version": "1",
                      "inference": self._inference}},
        ]  # fmt: skip
        doc = {"device_id": device_id, "seq": seq, "sent_at": now, "records": records,
               "dropped": {}}  # fmt: skip
        return bytes(self._compressor.compress(orjson.dumps(doc)))

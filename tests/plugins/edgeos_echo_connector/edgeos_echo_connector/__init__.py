"""An example edgeos connector plugin: effects and events through an echo service.

Effects: each is one JSON line ``{"key", "operation", "payload"}``, which the service
answers with ``{"applied": bool, "echo": payload}`` (``applied`` is false for a key it has
seen), or ``{"error": reason}`` for a request it refuses.

Events: the service keeps a feed of notes, each ``{"seq", "channel", "data"}``; the
source asks for the notes from a position on (``{"poll": seq}``) every ``poll_s``, emits
each under the events subscribed to its channel, and records the position after the
emit returned (in its state directory), so a note is emitted at least once. A binding::

    relay:
      type: echo
      host: 127.0.0.1
      port: 7007
      operations:
        say: {}
      subscribe:
        echo.heard: {channel: notes}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeos.connectors import DeliveryError, PluginBinding, UnknownOperation
from edgeos.connectors.events import EventSink
from edgeos.connectors.plugins import SourceSetup

log = logging.getLogger("edgeos_echo_connector")


class EchoOperation(BaseModel):
    """An echo operation takes no settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EchoSubscription(BaseModel):
    """The notes of one channel of the service's feed become one event."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    channel: str = Field(min_length=1)


class EchoConfig(PluginBinding):
    """A binding to an echo service."""

    type: Literal["echo"]
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    poll_s: float = Field(default=1.0, gt=0, le=3600)
    operations: dict[str, EchoOperation] = Field(default_factory=dict)
    subscribe: dict[str, EchoSubscription] = Field(default_factory=dict)


class EchoConnector:
    """Sends each effect as a JSON line and reads the service's answer."""

    config_model = EchoConfig
    #: The service remembers keys and applies each once.
    idempotency_keys = True

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        operations: Mapping[str, EchoOperation],
        timeout_s: float = 5.0,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.operations = dict(operations)
        self.timeout_s = timeout_s

    @classmethod
    def from_config(
        cls, config: EchoConfig, secrets: Callable[[str], str] | None = None
    ) -> EchoConnector:
        return cls(
            config.name, host=config.host, port=config.port,
            operations=config.operations, timeout_s=config.timeout_s,
        )  # fmt: skip

    @staticmethod
    def source_from_config(setup: SourceSetup) -> EchoSource:
        return EchoSource(setup.config, setup.state_dir / "position")

    async def deliver(
        self, operation: str, payload: dict[str, Any], key: str
    ) -> dict[str, Any] | None:
        if operation not in self.operations:
            raise UnknownOperation(self.name, operation, list(self.operations))
        where = f"echo://{self.host}:{self.port}"
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), self.timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise DeliveryError(
                self.name, operation, f"cannot connect to {where}: {exc!r}", retryable=True
            ) from exc
        try:
            line = json.dumps({"key": key, "operation": operation, "payload": payload})
            writer.write(line.encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), self.timeout_s)
        except (OSError, TimeoutError) as exc:
            raise DeliveryError(
                self.name, operation, f"{where} did not answer: {exc!r}",
                retryable=True, maybe_applied=True,
            ) from exc  # fmt: skip
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if not answer:
            raise DeliveryError(
                self.name, operation, f"{where} closed without an answer",
                retryable=True, maybe_applied=True,
            )  # fmt: skip
        reply = json.loads(answer)
        if "error" in reply:
            raise DeliveryError(self.name, operation, f"{where}: {reply['error']}", retryable=False)
        return {"echo": reply["echo"], "duplicate": not reply["applied"]}

    async def close(self) -> None:
        """Nothing to release: each delivery has its own connection."""


class EchoSource:
    """Emits the notes of the service's feed, at least once, in order."""

    def __init__(self, config: EchoConfig, position_path: Path) -> None:
        self.name = config.name
        self.config = config
        self.position_path = position_path
        self._task: asyncio.Task[None] | None = None

    async def start(self, emit: EventSink) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(emit))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, emit: EventSink) -> None:
        failing = False
        while True:
            try:
                notes = await self._poll(self._position())
            except (OSError, TimeoutError, ValueError) as exc:
                if not failing:
                    log.warning("echo source '%s': %r; retrying", self.name, exc)
                failing = True
            else:
                failing = False
                for note in notes:
                    if not await self._emit(emit, note):
                        break  # asked again from the same position at the next poll
            await asyncio.sleep(self.config.poll_s)

    async def _emit(self, emit: EventSink, note: dict[str, Any]) -> bool:
        events = [e for e, s in self.config.subscribe.items() if s.channel == note["channel"]]
        try:
            for event in events:
                await emit(event, note["data"])
        except Exception:
            log.exception("echo source '%s': emitting note %s failed", self.name, note["seq"])
            return False
        self._record(int(note["seq"]) + 1)
        return True

    async def _poll(self, position: int) -> list[dict[str, Any]]:
        host, port, timeout = self.config.host, self.config.port, self.config.timeout_s
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        try:
            writer.write(json.dumps({"poll": position}).encode() + b"\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.readline(), timeout)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        notes: list[dict[str, Any]] = json.loads(answer)["notes"]
        return notes

    def _position(self) -> int:
        try:
            return int(self.position_path.read_text())
        except FileNotFoundError:
            return 0

    def _record(self, position: int) -> None:
        scratch = self.position_path.with_suffix(".new")
        scratch.write_text(str(position))
        os.replace(scratch, self.position_path)

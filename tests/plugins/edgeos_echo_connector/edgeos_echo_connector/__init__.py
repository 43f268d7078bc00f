"""An example edgeos connector plugin: each effect is one JSON line to an echo service.

The service answers each line ``{"key", "operation", "payload"}`` with
``{"applied": bool, "echo": payload}`` (``applied`` is false for a key it has seen), or
``{"error": reason}`` for a request it refuses. A binding::

    relay:
      type: echo
      host: 127.0.0.1
      port: 7007
      operations:
        say: {}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeos.connectors import DeliveryError, PluginBinding, UnknownOperation


class EchoOperation(BaseModel):
    """An echo operation takes no settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EchoConfig(PluginBinding):
    """A binding to an echo service."""

    type: Literal["echo"]
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    operations: dict[str, EchoOperation] = Field(min_length=1)


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

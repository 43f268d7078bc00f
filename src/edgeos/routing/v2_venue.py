"""A venue reached over the Open Inference Protocol (KServe V2 REST): Triton, KServe,
MLServer, another edgeos node, or the fleet's cloud venue (with the device certificate).

Inputs are sent as JSON tensors in the datatype the endpoint's model metadata declares
(read once per model), so a list of Python floats reaches an FP32 model as FP32. An
endpoint that does not answer is :class:`UnavailableError` (the link is down); one that
answers with something that is not the protocol says so, naming the URL.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    InvalidRequestError,
    ModelNotFoundError,
    UnavailableError,
)
from edgeos.protocol.datatypes import DATATYPES
from edgeos.routing.venues import Offer, VenueAnswer, VenueInfo, key_headers, masked

if TYPE_CHECKING:
    import httpx

#: Calls in flight to one venue at most (more wait for a connection).
MAX_CONNECTIONS = 64


@dataclass(frozen=True)
class ClientCertificate:
    """The device certificate a venue is reached with, and the CA that vouches for it."""

    ca: Path
    cert: Path
    key: Path

    def stamp(self) -> int:
        """Changes when the certificate is renewed (its file is replaced)."""
        try:
            return os.stat(self.cert).st_mtime_ns
        except OSError:
            return 0


class V2Venue:
    """A remote V2 endpoint at ``url`` (``/v2/...`` is appended), reached with the device
    certificate (the fleet's venue) or an API key read for each request (another edgeos
    node's API token, say)."""

    def __init__(
        self,
        info: VenueInfo,
        url: str,
        *,
        certificate: ClientCertificate | None = None,
        api_key: Callable[[], str] | None = None,
    ) -> None:
        # Calls go out in parallel over a pool of connections, not one after the other.
        self.info = replace(info, concurrency=MAX_CONNECTIONS)
        self.url = url.rstrip("/")
        self.certificate = certificate
        self._api_key = api_key
        self._client: httpx.Client | None = None
        self._stamp = 0
        self._datatypes: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()

    def offer(self, model: str) -> Offer | None:
        """The declared model, if this venue serves it."""
        return self.info.models.get(model)

    def infer(self, model: str, inputs: Mapping[str, Any]) -> VenueAnswer:
        """POST ``/v2/models/{model}/infer`` with JSON tensors; decode the outputs."""
        import numpy as np
        import orjson

        datatypes = self.input_datatypes(model)
        tensors = []
        for name, value in inputs.items():
            datatype = datatypes.get(name)
            if datatype is None:
                raise InvalidRequestError(
                    f"venue {self.info.name}: model {model!r} has no input {name!r} "
                    f"(it takes {', '.join(sorted(datatypes)) or 'none'})"
                )
            array = np.asarray(value, dtype=DATATYPES[datatype].numpy)
            tensors.append({"name": name, "shape": list(array.shape), "datatype": datatype,
                            "data": array.reshape(-1).tolist()})  # fmt: skip
        body = orjson.dumps({"inputs": tensors})
        response = self._request("POST", f"/v2/models/{model}/infer", body)
        doc = self._json(response, f"/v2/models/{model}/infer")
        outputs: dict[str, Any] = {}
        try:
            for out in doc["outputs"]:
                info = DATATYPES[out["datatype"]]
                outputs[str(out["name"])] = np.asarray(out["data"], dtype=info.numpy).reshape(
                    out["shape"]
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise UnavailableError(
                f"venue {self.info.name} at {self.url} answered with the wrong protocol: "
                f"no V2 outputs ({type(exc).__name__}: {exc})"
            ) from exc
        version = str(doc.get("model_version") or "")
        return VenueAnswer(outputs, version, len(body) + len(response.content))

    def probe(self) -> None:
        """``GET /v2/health/ready``: any 200 answer."""
        self._request("GET", "/v2/health/ready")

    def close(self) -> None:
        """Close the connections. Safe to call twice."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def input_datatypes(self, model: str) -> dict[str, str]:
        """The V2 datatype of each input of ``model`` (read once from its metadata).

        ModelNotFoundError when the venue does not serve it; UnavailableError when the
        venue does not answer, or answers with something other than the protocol.
        """
        known = self._datatypes.get(model)
        if known is None:
            doc = self._json(self._request("GET", f"/v2/models/{model}"), f"/v2/models/{model}")
            try:
                known = {str(t["name"]): str(t["datatype"]) for t in doc["inputs"]}
            except (KeyError, TypeError) as exc:
                raise UnavailableError(
                    f"venue {self.info.name} at {self.url} answered with the wrong protocol: "
                    f"model metadata without inputs"
                ) from exc
            if any(d not in DATATYPES for d in known.values()):
                raise UnavailableError(
                    f"venue {self.info.name}: model {model!r} declares a datatype V2 does not have"
                )
            self._datatypes[model] = known
        return known

    # -- internals ----------------------------------------------------------------------
    def _http(self) -> httpx.Client:
        with self._lock:
            stamp = self.certificate.stamp() if self.certificate else 0
            if self._client is None or stamp != self._stamp:
                import httpx

                verify: Any = True
                if self.certificate is not None:
                    from edgeos.security.tls import client_ssl_context

                    c = self.certificate
                    verify = client_ssl_context(c.ca.read_text(), c.cert, c.key)
                if self._client is not None:
                    self._client.close()
                # Every connection the pool may open is kept alive: with more calls in
                # flight than kept connections, each call past them paid a new TLS
                # handshake, and the venue's throughput collapsed under load.
                self._client = httpx.Client(
                    base_url=self.url, verify=verify, timeout=self.info.timeout_s,
                    limits=httpx.Limits(max_connections=MAX_CONNECTIONS,
                                        max_keepalive_connections=MAX_CONNECTIONS),
                )  # fmt: skip
                self._stamp = stamp
            return self._client

    def _request(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        import httpx

        headers, key = key_headers(self.info.name, self._api_key)
        if body is not None:
            headers["content-type"] = "application/json"
        try:
            response = self._http().request(method, path, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"venue {self.info.name} at {self.url} does not answer: {type(exc).__name__}: "
                f"{masked(str(exc), key)}"
            ) from exc
        except (OSError, ConfigError) as exc:  # no certificate yet (not enrolled), or unusable
            raise UnavailableError(f"venue {self.info.name}: {exc}") from exc
        if response.status_code == 200:
            return response
        message = masked(_error_text(response), key)
        where = f"venue {self.info.name} ({method} {path})"
        if response.status_code in (401, 403):
            raise AuthenticationError(f"{where} refused this device: {message}")
        if response.status_code == 404:
            raise ModelNotFoundError(f"{where}: {message}")
        if response.status_code in (400, 422):
            raise InvalidRequestError(f"{where}: {message}")
        raise UnavailableError(f"{where} answered {response.status_code}: {message}")

    def _json(self, response: httpx.Response, path: str) -> dict[str, Any]:
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise UnavailableError(
                f"venue {self.info.name} at {self.url} answered {path} with the wrong protocol "
                "(not a JSON object)"
            )
        return doc


def _error_text(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(doc, dict):
        return str(doc.get("message") or doc.get("error") or doc)[:200]
    return str(doc)[:200]

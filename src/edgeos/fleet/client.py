"""A small client of the fleet's operator API, for the CLI, scripts and tests.

It trusts the fleet CA alone (pinned by the token at login) and turns every refusal
back into the EdgeOSError the server raised, with the server's message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from edgeos.errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    EdgeOSError,
    InvalidModelError,
    InvalidRequestError,
    ManifestError,
    NotFoundError,
    PermissionDeniedError,
    UnavailableError,
    VerificationError,
)
from edgeos.security.tls import client_ssl_context, fetch_ca
from edgeos.security.tokens import parse_token, pin_of, same

API = "/api/v1"

_BY_CODE: dict[str, type[EdgeOSError]] = {
    "authentication": AuthenticationError,
    "permission_denied": PermissionDeniedError,
    "verification": VerificationError,
    "config": ConfigError,
    "not_found": NotFoundError,
    "conflict": ConflictError,
    "unavailable": UnavailableError,
    "invalid_model": InvalidModelError,
    "invalid_request": InvalidRequestError,
}
_BY_STATUS: dict[int, type[EdgeOSError]] = {
    400: ConfigError, 401: AuthenticationError, 403: PermissionDeniedError,
    404: NotFoundError, 409: ConflictError,
}  # fmt: skip


def error_from(response: httpx.Response) -> EdgeOSError:
    """The EdgeOSError a refused response stands for, with the server's message."""
    try:
        body = response.json()
        code, message = str(body["error"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "", f"the fleet answered {response.status_code}: {response.text[:200]}"
    if code == "manifest":
        # The server's message already names the file and the field.
        error: EdgeOSError = ManifestError.__new__(ManifestError)
        EdgeOSError.__init__(error, message)
        return error
    kind = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code)
    if kind is None:
        kind = UnavailableError if response.status_code >= 500 else EdgeOSError
    return kind(message)


class FleetClient:
    """The operator API at ``url``, as the holder of ``token``, trusting ``ca_pem`` only."""

    def __init__(self, url: str, token: str | None, ca_pem: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.ca_pem = ca_pem
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, verify=client_ssl_context(ca_pem), headers=headers, timeout=timeout
        )

    @classmethod
    def login(cls, url: str, token: str) -> FleetClient:
        """A client for ``url``, its CA fetched and checked against the token's pin."""
        _, pin = parse_token(token)
        return cls(url, token, fetch_ca(url, pin))

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer, or the matching EdgeOSError."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise UnavailableError(f"the fleet at {self.url} does not answer: {exc}") from exc
        if response.status_code >= 400:
            raise error_from(response)
        return response.json() if response.content else None

    # -- operators and join tokens

    def whoami(self) -> dict[str, Any]:
        """The calling token: id, name, scopes."""
        result: dict[str, Any] = self.request("GET", f"{API}/whoami")
        return result

    def create_token(self, name: str, scopes: list[str]) -> dict[str, Any]:
        """A new operator token (the ``token`` field is shown once)."""
        result: dict[str, Any] = self.request(
            "POST", f"{API}/tokens", json={"name": name, "scopes": scopes}
        )
        return result

    def tokens(self) -> list[dict[str, Any]]:
        """Every operator token, without secrets."""
        result: list[dict[str, Any]] = self.request("GET", f"{API}/tokens")
        return result

    def revoke_token(self, token_id: str) -> None:
        """Revoke an operator token."""
        self.request("DELETE", f"{API}/tokens/{token_id}")

    def create_join_token(
        self,
        group: str | None = None,
        *,
        ttl_s: float = 3600.0,
        uses: int = 1,
        replaces: str | None = None,
    ) -> dict[str, Any]:
        """A join token for ``group``, or for the replacement of device ``replaces`` (the
        ``token`` field is shown once)."""
        body = {"group": group, "ttl_s": ttl_s, "uses": uses, "replaces": replaces}
        result: dict[str, Any] = self.request("POST", f"{API}/join-tokens", json=body)
        return result

    # -- devices

    def devices(
        self, *, group: str | None = None, labels: list[str] | None = None,
        status: str | None = None, limit: int = 1000,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Devices, filtered by group, ``k=v`` labels and status."""
        params: list[tuple[str, str | int]] = [("limit", limit)]
        params += [("label", term) for term in labels or []]
        if group:
            params.append(("group", group))
        if status:
            params.append(("status", status))
        result: list[dict[str, Any]] = self.request("GET", f"{API}/devices", params=params)
        return result

    def device(self, device_id: str) -> dict[str, Any]:
        """One device with its assignments and certificates."""
        result: dict[str, Any] = self.request("GET", f"{API}/devices/{device_id}")
        return result

    def set_labels(self, device_id: str, labels: dict[str, str]) -> dict[str, str]:
        """Replace a device's labels; returns them."""
        result = self.request("PUT", f"{API}/devices/{device_id}/labels", json={"labels": labels})
        return dict(result["labels"])

    def revoke_device(self, device_id: str) -> dict[str, Any]:
        """Revoke a device: it is refused from its next request on."""
        result: dict[str, Any] = self.request("POST", f"{API}/devices/{device_id}/revoke")
        return result

    # -- artifacts and audit

    def publish(self, kind: str, name: str, version: str, data: bytes) -> dict[str, Any]:
        """Publish an artifact version's bytes; returns its row (target, sha256, length)."""
        result: dict[str, Any] = self.request(
            "POST", f"{API}/artifacts/{kind}/{name}/{version}", content=data,
            headers={"Content-Type": "application/octet-stream"},
        )  # fmt: skip
        return result

    def artifacts(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Published artifacts."""
        params = {"kind": kind} if kind else {}
        result: list[dict[str, Any]] = self.request("GET", f"{API}/artifacts", params=params)
        return result

    # -- secret grants

    def grant_secret(
        self, name: str, value: str, *, scopes: list[str], expires_s: float,
        device: str | None = None, group: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Grant a secret to one device or a group; returns the grant (never the value)."""
        body = {"name": name, "value": value, "scopes": scopes, "expires_s": expires_s,
                "device": device, "group": group}  # fmt: skip
        result: dict[str, Any] = self.request("POST", f"{API}/secret-grants", json=body)
        return result

    def secret_grants(self, **filters: str) -> list[dict[str, Any]]:
        """Grants, newest first; filters: name, device, group, active=true."""
        result: list[dict[str, Any]] = self.request("GET", f"{API}/secret-grants", params=filters)
        return result

    def revoke_secret_grant(self, grant_id: str) -> dict[str, Any]:
        """Revoke a grant: devices delete the secret at their next sync."""
        result: dict[str, Any] = self.request("DELETE", f"{API}/secret-grants/{grant_id}")
        return result

    def audit(self, limit: int = 100, **filters: str) -> list[dict[str, Any]]:
        """The audit log, newest first; filters: actor, action, outcome."""
        params = {"limit": limit, **filters}
        result: list[dict[str, Any]] = self.request("GET", f"{API}/audit", params=params)
        return result

    # -- telemetry

    def telemetry_kpis(self, by: str | None = None, **query: Any) -> Any:
        """KPI points over time (``{"points": [...]}``), or one point per ``by`` (device,
        agent or model); query: start, end, bucket, device, group, agent, model."""
        path = f"{API}/telemetry/kpis" + (f"/{by}" if by else "")
        return self.request("GET", path, params=query)

    def telemetry_devices(self, group: str | None = None) -> list[dict[str, Any]]:
        """Each device's telemetry link and latest KPIs."""
        params = {"group": group} if group else {}
        result: list[dict[str, Any]] = self.request(
            "GET", f"{API}/telemetry/devices", params=params
        )
        return result

    def telemetry_events(self, **query: Any) -> list[dict[str, Any]]:
        """Alerts, traces and logs devices sent, newest first; query: kind, device, start,
        end, limit."""
        result: list[dict[str, Any]] = self.request("GET", f"{API}/telemetry/events", params=query)
        return result

    # -- approvals

    def approvals(
        self, *, state: str | None = None, device: str | None = None
    ) -> list[dict[str, Any]]:
        """Escalations devices reported, newest first, filtered by state and device."""
        params = {k: v for k, v in (("state", state), ("device", device)) if v}
        result: list[dict[str, Any]] = self.request("GET", f"{API}/approvals", params=params)
        return result

    def answer_approval(
        self, device_id: str, escalation_id: str, choice: Any, note: str | None = None
    ) -> dict[str, Any]:
        """Answer a device's open escalation; the device applies it on its next sync."""
        result: dict[str, Any] = self.request(
            "POST", f"{API}/approvals/{device_id}/{escalation_id}",
            json={"choice": choice, "note": note},
        )  # fmt: skip
        return result

    # -- alerts

    def create_alert_rule(self, **rule: Any) -> dict[str, Any]:
        """Add an alert rule: name, condition, webhook, and optionally target, window_s, secret."""
        result: dict[str, Any] = self.request("POST", f"{API}/alerts/rules", json=rule)
        return result

    def alert_rules(self) -> list[dict[str, Any]]:
        """Every alert rule, by name."""
        result: list[dict[str, Any]] = self.request("GET", f"{API}/alerts/rules")
        return result

    def delete_alert_rule(self, rule_id: str) -> dict[str, Any]:
        """Remove an alert rule (what fires under it stops, without a resolve)."""
        result: dict[str, Any] = self.request("DELETE", f"{API}/alerts/rules/{rule_id}")
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """What fires now."""
        result: list[dict[str, Any]] = self.request("GET", f"{API}/alerts")
        return result

    def alert_notifications(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest alert notifications and how their delivery went."""
        result: list[dict[str, Any]] = self.request(
            "GET", f"{API}/alerts/notifications", params={"limit": limit}
        )
        return result


# -- the operator's stored login -------------------------------------------------------


def config_path() -> Path:
    """Where ``edgeos fleet login`` keeps the URL, token and CA (env EDGEOS_FLEET_CONFIG)."""
    override = os.environ.get("EDGEOS_FLEET_CONFIG")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edgeos" / "fleet.json"


def save_login(url: str, token: str, ca_pem: str) -> Path:
    """Store a login, readable by the user only; returns the file."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    data = json.dumps({"url": url.rstrip("/"), "token": token, "ca_pem": ca_pem}, indent=2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(data + "\n")
    os.chmod(path, 0o600)
    return path


def load_login() -> dict[str, str]:
    """The stored login, with EDGEOS_FLEET_URL and EDGEOS_FLEET_TOKEN taking precedence."""
    path = config_path()
    stored: dict[str, str] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not a fleet login file ({exc}); log in again") from exc
        if isinstance(loaded, dict):
            stored = {k: str(v) for k, v in loaded.items() if v is not None}
    for key, var in (("url", "EDGEOS_FLEET_URL"), ("token", "EDGEOS_FLEET_TOKEN")):
        if os.environ.get(var):
            stored[key] = os.environ[var]
    return stored


def client_from_login() -> FleetClient:
    """A client from the stored login (or the environment); ConfigError when there is none.

    The stored CA is used only while the token's pin names it; otherwise the CA is fetched
    again and checked against the pin.
    """
    login = load_login()
    if not login.get("url") or not login.get("token"):
        raise ConfigError(
            "not logged in to a fleet: run `edgeos fleet login URL --token TOKEN` "
            "(or set EDGEOS_FLEET_URL and EDGEOS_FLEET_TOKEN)"
        )
    _, pin = parse_token(login["token"])
    ca_pem = login.get("ca_pem")
    if not ca_pem or not same(pin_of(ca_pem), pin):
        ca_pem = fetch_ca(login["url"], pin)
    return FleetClient(login["url"], login["token"], ca_pem)

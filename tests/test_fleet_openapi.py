"""The fleet's OpenAPI document describes every route, and says truly who may call it.

The document is fetched from a real fleet over TLS; each operation's declared credential
is then tried on the route itself: a device route refuses an operator, an operator route
refuses a token without its scope and serves one with it.
"""

from __future__ import annotations

import re
from typing import Any

from edgeos.fleet.openapi import UNDESCRIBED, described
from tests.fleet_support import FleetServer, fleet_db_url, running_fleet

__all__ = ["fleet_db_url", "running_fleet"]

_PARAM = re.compile(r"\{[^}]+\}")


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, methods in doc["paths"].items()
        for method, op in methods.items()
    ]


def test_every_route_is_described_and_every_description_has_a_route(
    running_fleet: FleetServer,
) -> None:
    with running_fleet.http() as http:
        doc = http.get("/api/v1/openapi.json").json()
    ops = operations(doc)
    missing = [f"{m} {p}" for m, p, op in ops if op["summary"] == UNDESCRIBED]
    assert not missing, f"routes without a description in fleet/openapi.py: {missing}"
    listed = {(m, p) for m, p, _ in ops}
    assert not described() - listed, f"described but not served: {described() - listed}"
    schemas = doc["components"]["schemas"]
    for name in ("MemoryBatch", "MemoryBackup", "SecretGrants", "GrantCreate", "TelemetryAck",
                 "EscalationReport", "AlertRuleCreate", "ApprovalAnswer"):  # fmt: skip
        assert name in schemas, name
    telemetry = doc["paths"]["/api/v1/telemetry"]["post"]
    assert list(telemetry["requestBody"]["content"]) == ["application/vnd.edgeos.telemetry+zstd"]
    assert "value" not in doc["paths"]["/api/v1/secret-grants"]["get"]["summary"].split()


def test_the_credentials_described_are_the_ones_each_route_demands(
    running_fleet: FleetServer,
) -> None:
    with running_fleet.client() as admin:
        reader = admin.create_token("reader", ["read"])["token"]
    with running_fleet.http() as http:
        doc = http.get("/api/v1/openapi.json").json()
        as_reader = {"Authorization": f"Bearer {reader}"}
        wrong = []
        for method, path, op in operations(doc):
            url = _PARAM.sub("x", path)
            if op.get("security") == [{"deviceCertificate": []}]:
                # An operator, however powerful, is not a device.
                status = http.request(method, url, headers=as_reader).status_code
                expected = status == 401
            elif "x-edgeos-scope" in op:
                status = http.request(method, url, headers=as_reader).status_code
                if op["x-edgeos-scope"] == "read":
                    expected = status not in (401, 403)
                else:
                    expected = status == 403
                    if http.request(method, url).status_code != 401:  # and nobody at all
                        wrong.append(f"{method} {path}: served without a token")
            else:
                continue
            if not expected:
                wrong.append(f"{method} {path} ({op.get('x-edgeos-scope', 'device')}): {status}")
    assert not wrong, wrong

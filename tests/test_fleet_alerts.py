"""Alerts with a real fleet (SQLite, and PostgreSQL when set) and a real loopback webhook.

Devices enroll and sync over mTLS; rules are set through the operator API and the CLI;
the alert engine judges them against the fleet's database, and the webhook receiver
checks every notification's signature. A rule fires once per subject until the subject
resolves, then sends one resolve; a failing webhook is retried with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import ConfigError, ConflictError, PermissionDeniedError
from edgeos.fleet.alerts import AlertEngine, parse_condition
from tests.fleet_support import (
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    join_token,
    table_snapshot,
)
from tests.loopback import LoopbackServer, QuietHandler
from tests.test_fleet_telemetry import CT, body, kpi, minute_ago, sketch_of

SECRET = "whsec-0123456789abcdef"
#: Many services put a credential in the webhook's path: it is stored, never shown.
HOOK_PATH = "/hooks/T0KEN-in-the-path-5f4e3d"


class Webhook(LoopbackServer):
    """A loopback webhook: keeps every notification; answers 503 to the first ``fail``."""

    def __init__(self, fail: int = 0) -> None:
        super().__init__(_Hook)
        self.fail = fail
        self.seen: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"{self.base_url}{HOOK_PATH}"

    def accepted(self) -> list[dict[str, Any]]:
        """The bodies answered 200, in order."""
        with self.lock:
            return [body for headers, body in self.seen if headers["x-answered"] == "200"]


class _Hook(QuietHandler):
    server: Webhook

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        assert self.path == HOOK_PATH
        headers = {k.lower(): v for k, v in self.headers.items()}
        # What a receiver does: check the signature over the timestamp and the exact body.
        stamp, _, mac = headers.get("x-edgeos-signature", "t=,v1=").partition(",v1=")
        expected = hmac.new(
            SECRET.encode(), stamp.removeprefix("t=").encode() + b"." + raw, hashlib.sha256
        ).hexdigest()
        assert hmac.compare_digest(mac, expected), "a notification with a bad signature"
        with self.server.lock:
            status = 503 if self.server.fail > 0 else 200
            self.server.fail -= 1
            self.server.seen.append(({**headers, "x-answered": str(status)}, json.loads(raw)))
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def webhook() -> Any:
    hook = Webhook()
    yield hook
    hook.stop()


def device_in(fleet: FleetServer, tmp_path: Path, group: str = "stores") -> Device:
    device = enroll_device(fleet, join_token(fleet, group), tmp_path / "devices")
    assert device.sync().status_code == 200
    return device


def test_an_offline_device_fires_once_and_resolves_when_it_is_back(
    running_fleet: FleetServer, webhook: Webhook, tmp_path: Path
) -> None:
    device = device_in(running_fleet, tmp_path)
    other = device_in(running_fleet, tmp_path, group="depots")  # not in the rule's target
    engine = AlertEngine(running_fleet.db)
    with running_fleet.client() as client:
        rule = client.create_alert_rule(
            name="store offline", condition="offline>1s", target="group=stores",
            webhook=webhook.url, secret=SECRET,
        )  # fmt: skip
        assert rule["condition"] == "offline>1s"
        assert rule["signed"] is True
        assert "secret" not in rule
        assert rule["webhook"] == webhook.url.removesuffix(HOOK_PATH) + "/..."
        assert engine.evaluate() == []  # just synced: online
        time.sleep(1.3)
        fired = engine.evaluate()
        assert [(c.subject, c.status) for c in fired] == [(f"device/{device.device_id}", "firing")]
        engine.deliver()
        engine.tick()  # still offline: nothing new to say
        engine.tick()
        [firing] = webhook.accepted()
        assert firing["status"] == "firing"
        assert firing["subject"] == f"device/{device.device_id}"
        assert firing["rule"] == {"id": rule["id"], "name": "store offline",
                                  "condition": "offline>1s", "target": "group=stores"}  # fmt: skip
        assert firing["value"] > 1.0
        now_firing = client.alerts()
        assert [(a["rule"], a["subject"]) for a in now_firing] == [
            ("store offline", f"device/{device.device_id}")
        ]
        # Back: the next judgement resolves it, once.
        assert device.sync().status_code == 200
        engine.tick()
        engine.tick()
        assert [b["status"] for b in webhook.accepted()] == ["firing", "resolved"]
        resolved = webhook.accepted()[1]
        assert resolved["since"] == firing["since"]
        assert client.alerts() == []
        keys = [h["idempotency-key"] for h, _ in webhook.seen]
        assert len(set(keys)) == 2
        sent = client.alert_notifications()
        assert [(n["status"], n["state"], n["attempts"]) for n in sent] == [
            ("resolved", "delivered", 1), ("firing", "delivered", 1),
        ]  # fmt: skip
    assert all(b["subject"] != f"device/{other.device_id}" for b in webhook.accepted())
    [created] = audit_rows(running_fleet, action="alert_rule.create")
    assert created["outcome"] == "ok"
    assert SECRET not in json.dumps(created)
    assert HOOK_PATH not in json.dumps(created)
    device.close()
    other.close()


def send_kpis(device: Device, seq: int, latency_s: float, *, succeeded: int = 10) -> None:
    """One minute of the ``restock`` agent's KPIs, as a node's uplink sends them."""
    record = kpi(minute_ago(1), runs=10, succeeded=succeeded, failed=10 - succeeded,
                 inference=sketch_of([latency_s] * 100))  # fmt: skip
    sent = device.http.post(
        "/api/v1/telemetry", content=body(device.device_id, seq, [record]), headers=CT
    )
    assert sent.status_code == 200, sent.text


def test_kpi_rules_fire_per_device_and_fleet_wide_and_a_failing_webhook_is_retried(
    running_fleet: FleetServer, tmp_path: Path
) -> None:
    hook = Webhook(fail=2)
    fast, slow = device_in(running_fleet, tmp_path), device_in(running_fleet, tmp_path)
    engine = AlertEngine(running_fleet.db, base_delay=0.01, max_delay=0.05)
    try:
        with running_fleet.client() as client:
            client.create_alert_rule(
                name="slow device", condition="p99_ms>250", webhook=hook.url, secret=SECRET
            )
            send_kpis(fast, 1, 0.1)
            send_kpis(slow, 1, 0.12)
            assert engine.evaluate() == []
            fleet_wide = client.create_alert_rule(
                name="slow agent", condition="p99_ms>250", per="agent", target="group=stores",
                webhook=hook.url, secret=SECRET,
            )  # fmt: skip
            send_kpis(slow, 2, 0.5)  # the same minute again: now half its calls take 0.5 s
            fired = {(c.subject, c.status) for c in engine.evaluate()}
            # The slow device alone, and the agent fleet-wide: its p99 over both devices'
            # merged sketches is the slow calls' latency, not an average of p99s.
            assert fired == {(f"device/{slow.device_id}", "firing"), ("agent/restock", "firing")}
            deadline = time.monotonic() + 10
            while len(hook.accepted()) < 2 and time.monotonic() < deadline:
                engine.deliver()
                time.sleep(0.02)
            # Two 503s (one for each notification), then both delivered on their 2nd attempt.
            assert [h["x-answered"] for h, _ in hook.seen] == ["503", "503", "200", "200"]
            firings = {b["subject"]: b for b in hook.accepted()}
            assert 495 < firings["agent/restock"]["value"] < 505
            assert firings["agent/restock"]["rule"]["id"] == fleet_wide["id"]
            sent = client.alert_notifications()
            assert [n["attempts"] for n in sent] == [2, 2]
            assert len({h["idempotency-key"] for h, _ in hook.seen}) == 2
            assert {n["state"] for n in sent} == {"delivered"}
            engine.tick()  # nothing changed: nothing sent
            assert len(hook.seen) == 4
    finally:
        hook.stop()
        fast.close()
        slow.close()


def test_replicas_judging_at_once_fire_and_resolve_once(
    running_fleet: FleetServer, webhook: Webhook, tmp_path: Path
) -> None:
    device = device_in(running_fleet, tmp_path)
    replicas = [AlertEngine(running_fleet.db) for _ in range(3)]

    def all_at_once() -> None:
        with ThreadPoolExecutor(len(replicas)) as pool:
            for _ in range(4):
                list(pool.map(lambda engine: engine.tick(), replicas))

    try:
        with running_fleet.client() as client:
            client.create_alert_rule(
                name="offline", condition="offline>1s", webhook=webhook.url, secret=SECRET
            )
            time.sleep(1.3)
            all_at_once()
            assert device.sync().status_code == 200
            all_at_once()
            assert [b["status"] for b in webhook.accepted()] == ["firing", "resolved"]
            assert len(webhook.seen) == 2
    finally:
        device.close()


def test_bad_rules_and_read_only_operators_are_refused_and_change_nothing(
    running_fleet: FleetServer, webhook: Webhook
) -> None:
    with running_fleet.client() as admin:
        admin.create_alert_rule(name="drifting", condition="drift>0.3", webhook=webhook.url)
        reader_token = admin.create_token("viewer", ["read"])["token"]
    before = table_snapshot(running_fleet.db)
    bad = [
        ({"condition": "p99_ms<250"}, "p99_ms alerts when it is over a bound"),
        ({"condition": "latency>5"}, "unknown metric 'latency'"),
        ({"condition": "offline>soon"}, "alert condition 'offline>soon'"),
        ({"webhook": "ftp://example.org/hook"}, "give an http:// or https:// URL"),
        ({"target": "groups=stores"}, "groups=stores"),
        ({"secret": "short"}, "secret"),
        ({"name": "drifting"}, "exists already"),
        ({"per": "store"}, "alert per 'store'"),
        (
            {"per": "agent", "condition": "drift>0.2", "target": "label:zone=north"},
            "target all or group=G",
        ),
        ({"per": "agent"}, "is judged per device"),
    ]
    with running_fleet.client() as admin:
        for change, message in bad:
            body = {"name": "new", "condition": "offline>10m", "webhook": webhook.url, **change}
            with pytest.raises((ConfigError, ConflictError), match=message):
                admin.create_alert_rule(**body)
    with running_fleet.client(reader_token) as reader:
        assert [r["name"] for r in reader.alert_rules()] == ["drifting"]
        with pytest.raises(PermissionDeniedError):
            reader.create_alert_rule(name="x", condition="offline>1m", webhook=webhook.url)
        with pytest.raises(PermissionDeniedError):
            reader.delete_alert_rule(reader.alert_rules()[0]["id"])
    assert table_snapshot(running_fleet.db) == before
    refusals = audit_rows(running_fleet, outcome="refused")
    assert len([r for r in refusals if r["action"] == "alert_rule.create"]) == len(bad)


def test_the_cli_creates_lists_and_deletes_rules(
    running_fleet: FleetServer, webhook: Webhook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGEOS_FLEET_CONFIG", str(tmp_path / "fleet.json"))
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()

    def fleet(*args: str) -> str:
        result = runner.invoke(app, ["fleet", *args])
        assert result.exit_code == 0, result.output
        return result.output

    fleet("login", running_fleet.url, "--token", running_fleet.admin_token)
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    out = fleet("alerts", "create", "low success", "--when", "success_rate<0.9",
                "--webhook", webhook.url, "--target", "group=stores",
                "--secret-file", str(secret), "--per", "agent")  # fmt: skip
    assert "success_rate<0.9 per agent on group=stores" in out
    rules = json.loads(fleet("alerts", "list", "--json"))
    assert [(r["name"], r["signed"]) for r in rules] == [("low success", True)]
    assert "0 firing" in fleet("alerts", "firing")
    refused = runner.invoke(app, ["fleet", "alerts", "create", "x", "--when", "p99>1",
                                  "--webhook", webhook.url])  # fmt: skip
    assert refused.exit_code != 0
    fleet("alerts", "delete", rules[0]["id"])
    assert json.loads(fleet("alerts", "list", "--json")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("p99_ms>250", ("p99_ms", ">", 250.0)),
        ("success_rate < 0.95", ("success_rate", "<", 0.95)),
        ("drift>0.3", ("drift", ">", 0.3)),
        ("offline>10m", ("offline_s", ">", 600.0)),
        ("offline>90", ("offline_s", ">", 90.0)),
    ],
)
def test_conditions_parse(text: str, expected: tuple[str, str, float]) -> None:
    parsed = parse_condition(text)
    assert (parsed.metric, parsed.op, parsed.bound) == expected
    assert parse_condition(parsed.text) == parsed

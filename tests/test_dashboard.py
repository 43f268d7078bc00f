"""The dashboard over HTTP, without a browser: sign-in, sessions, CSRF, scopes, escaping.

Against a real fleet over TLS on loopback (``running_fleet``), with real enrolled devices.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeos.fleet.dashboard.session import COOKIE, SessionSigner
from edgeos.fleet.packing import pack_artifact
from tests.fleet_support import (
    INVENTORY,
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    join_token,
    policy_file,
    table_snapshot,
)

EVIL = "<script>alert('owned')</script>"


def csrf_of(page: str) -> str:
    """The CSRF secret a page's forms carry."""
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found, page
    return found.group(1)


def sign_in(http: httpx.Client, token: str, next_path: str = "") -> httpx.Response:
    """Open the sign-in page, then post the token with its CSRF secret."""
    form = http.get("/ui/login", params={"next": next_path} if next_path else None)
    assert form.status_code == 200
    return http.post("/ui/login", data={"csrf": csrf_of(form.text), "token": token,
                                        "next": next_path})  # fmt: skip


def state(fleet: FleetServer) -> dict[str, Any]:
    """Every table but the audit log, with rollouts as their status: the rollout engine
    writes its lease on the rollout row every tick, whatever operators do."""
    snapshot = table_snapshot(fleet.db)
    del snapshot["rollouts"]
    with fleet.client() as admin:
        snapshot["rollouts"] = [
            (r["id"], r["status"]) for r in admin.request("GET", "/api/v1/rollouts")
        ]
    return snapshot


def token(fleet: FleetServer, name: str, scope: str) -> str:
    """A new operator token with ``scope``."""
    with fleet.client() as admin:
        return str(admin.create_token(name, [scope])["token"])


@pytest.fixture
def device(running_fleet: FleetServer, tmp_path: Path) -> Iterator[Device]:
    """A device whose hostname is a script, with an escalation whose question is one too."""
    dev = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "devices")
    inventory = {**INVENTORY.model_dump(), "hostname": EVIL}
    assert dev.sync(inventory=inventory).status_code == 200
    asked = {
        "id": "run-1:0:0", "agent": "restock", "run_id": "run-1", "step": "decide",
        "question": f"Reorder? {EVIL}", "options": ["yes", "no"], "proposal": "yes",
        "default": "no", "deadline": time.time() + 600,
    }  # fmt: skip
    response = dev.http.post("/api/v1/escalations", json={"device_id": dev.device_id,
                                                           "open": [asked]})  # fmt: skip
    assert response.status_code == 200, response.text
    try:
        yield dev
    finally:
        dev.close()


@pytest.fixture
def rollout_id(running_fleet: FleetServer, device: Device, tmp_path: Path) -> str:
    """A running rollout of a policy with a long soak."""
    data, _, _ = pack_artifact("policy", policy_file(tmp_path / "policies"))
    with running_fleet.client() as admin:
        admin.publish("policy", "stores", "1", data)
        made = admin.request("POST", "/api/v1/rollouts", json={
            "artifact": "policy/stores@1", "target": "all", "waves": [50, 100], "soak_s": 3600})  # fmt: skip
    return str(made["id"])


def test_sign_in_gives_a_strict_session_cookie_and_the_fleet_page(
    running_fleet: FleetServer, device: Device
) -> None:
    with running_fleet.http() as http:
        first = http.get("/ui/")
        assert (first.status_code, first.headers["location"]) == (303, "/ui/login?next=/ui/")
        signed = sign_in(http, running_fleet.admin_token, "/ui/approvals")
        assert (signed.status_code, signed.headers["location"]) == (303, "/ui/approvals")
        cookie = next(v for k, v in signed.headers.multi_items()
                      if k == "set-cookie" and v.startswith(COOKIE))  # fmt: skip
        for attribute in ("HttpOnly", "SameSite=strict", "Secure", "Max-Age=28800", "Path=/ui"):
            assert attribute.lower() in cookie.lower(), cookie
        page = http.get("/ui/")
        assert page.status_code == 200
        assert device.device_id in page.text
        assert "1 approval(s) waiting" in page.text
        assert "no KPIs received in the last hours" in page.text  # no telemetry yet
        assert "script-src" not in page.headers["content-security-policy"]  # no script at all
        for path in ("/ui/approvals", f"/ui/devices/{device.device_id}", "/ui/rollouts",
                     "/ui/artifacts", "/ui/audit"):  # fmt: skip
            assert http.get(path).status_code == 200, path
    (login,) = audit_rows(running_fleet, action="dashboard.login")
    assert (login["actor"], login["outcome"]) == ("operator:admin", "ok")


def test_everything_rendered_is_escaped(running_fleet: FleetServer, device: Device) -> None:
    with running_fleet.http() as http:
        sign_in(http, running_fleet.admin_token)
        for path in ("/ui/", f"/ui/devices/{device.device_id}", "/ui/approvals"):
            text = http.get(path).text
            assert "<script" not in text, path
            assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in text, path
        missing = http.get("/ui/devices/%3Cscript%3E")
        assert missing.status_code == 404
        assert "<script>" not in missing.text
        assert "&lt;script&gt;" in missing.text


def test_bad_tokens_and_forged_sign_ins_are_refused(running_fleet: FleetServer) -> None:
    with running_fleet.http() as http:
        wrong = sign_in(http, "not-a-token." + "0" * 64)
        assert wrong.status_code == 401
        assert COOKIE not in wrong.headers.get("set-cookie", "")
        # A sign-in posted without the form's secret (from another site, say).
        forged = http.post("/ui/login", data={"csrf": "guess", "token": running_fleet.admin_token})
        assert forged.status_code == 403
        assert http.get("/ui/").status_code == 303  # still not signed in
        # Never sent off the dashboard after signing in.
        away = sign_in(http, running_fleet.admin_token, "//evil.example/")
        assert away.headers["location"] == "/ui/"
    refused = {r["action"] for r in audit_rows(running_fleet, outcome="refused")}
    assert {"authorize", "dashboard.login"} <= refused


def test_forms_without_the_csrf_secret_or_from_elsewhere_change_nothing(
    running_fleet: FleetServer, device: Device, rollout_id: str
) -> None:
    before = state(running_fleet)
    answer = {"device_id": device.device_id, "escalation_id": "run-1:0:0", "choice": "no"}
    with running_fleet.http() as http:
        sign_in(http, running_fleet.admin_token)
        secret = csrf_of(http.get("/ui/approvals").text)
        for data, headers in (
            (answer, {}),
            ({**answer, "csrf": "wrong"}, {}),
            ({**answer, "csrf": secret}, {"origin": "https://evil.example"}),
        ):
            refused = http.post("/ui/approvals/answer", data=data, headers=headers)
            assert refused.status_code == 403, refused.text
        paused = http.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": "wrong"})
        assert paused.status_code == 403
    assert state(running_fleet) == before
    details = [r["detail"] for r in audit_rows(running_fleet, outcome="refused")]
    assert sum("CSRF" in d for d in details) == 3
    assert any("another origin" in d for d in details)


def test_a_read_only_operator_sees_but_cannot_act(
    running_fleet: FleetServer, device: Device, rollout_id: str
) -> None:
    viewer = token(running_fleet, "viewer", "read")
    before = state(running_fleet)
    with running_fleet.http() as http:
        sign_in(http, viewer)
        inbox = http.get("/ui/approvals")
        assert inbox.status_code == 200
        assert "Answering needs the deploy scope" in inbox.text
        assert "/ui/approvals/answer" not in inbox.text  # no form offered
        secret = csrf_of(inbox.text)  # the sign-out form's: a valid secret
        answered = http.post("/ui/approvals/answer", data={
            "csrf": secret, "device_id": device.device_id, "escalation_id": "run-1:0:0",
            "choice": "no"})  # fmt: skip
        assert answered.status_code == 403
        assert "lacks the &#x27;deploy&#x27; scope" in answered.text
        halted = http.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": secret})
        assert halted.status_code == 403
        assert http.get("/ui/audit").status_code == 403  # the audit log is for admins
    assert state(running_fleet) == before
    refusals = [r for r in audit_rows(running_fleet, outcome="refused")
                if r["actor"] == "operator:viewer"]  # fmt: skip
    assert {r["target"] for r in refusals} == {
        "POST /ui/approvals/answer",
        f"POST /ui/rollouts/{rollout_id}/pause",
        "GET /ui/audit",
    }


def test_a_deploy_operator_answers_and_halts_from_the_forms(
    running_fleet: FleetServer, device: Device, rollout_id: str
) -> None:
    with running_fleet.http() as http:
        sign_in(http, token(running_fleet, "ops", "deploy"))
        secret = csrf_of(http.get("/ui/approvals").text)
        done = http.post("/ui/approvals/answer", data={
            "csrf": secret, "device_id": device.device_id, "escalation_id": "run-1:0:0",
            "choice": "no", "note": "enough stock"})  # fmt: skip
        assert (done.status_code, done.headers["location"]) == (303, "/ui/approvals")
        again = http.post("/ui/approvals/answer", data={
            "csrf": secret, "device_id": device.device_id, "escalation_id": "run-1:0:0",
            "choice": "yes"})  # fmt: skip
        assert again.status_code == 409
        assert "is answered by operator:ops" in again.text
        page = http.get(f"/ui/rollouts/{rollout_id}").text
        assert "Halt (pause)" in page
        halted = http.post(f"/ui/rollouts/{rollout_id}/pause", data={"csrf": secret})
        assert halted.status_code == 303
        assert "Resume" in http.get(f"/ui/rollouts/{rollout_id}").text
    with running_fleet.client() as admin:
        assert admin.approvals(device=device.device_id)[0]["answer"] == "no"
        assert admin.request("GET", f"/api/v1/rollouts/{rollout_id}")["status"] == "paused"
    actions = {(r["actor"], r["action"]) for r in audit_rows(running_fleet, outcome="ok")}
    assert {("operator:ops", "approval.answer"), ("operator:ops", "rollout.pause")} <= actions


def test_expired_forged_and_revoked_sessions_end(running_fleet: FleetServer) -> None:
    signer = SessionSigner.from_keys(running_fleet.config.keys_dir)
    with running_fleet.client() as admin:
        me = admin.whoami()["id"]
    _, expired = signer.issue(me, now=time.time() - 9 * 3600)
    _, valid = signer.issue(me)
    other_fleet = SessionSigner(b"k" * 32).issue(me)[1]
    tampered = valid.replace(valid[2], "A" if valid[2] != "A" else "B", 1)
    with running_fleet.http() as http:
        for cookie in (expired, other_fleet, tampered, "garbage"):
            http.cookies.set(COOKIE, cookie, path="/ui")
            assert http.get("/ui/").status_code == 303, cookie
        http.cookies.set(COOKIE, valid, path="/ui")
        assert http.get("/ui/").status_code == 200
    with running_fleet.http() as http:
        sign_in(http, running_fleet.admin_token)
        secret = csrf_of(http.get("/ui/").text)
        signed_out = http.post("/ui/logout", data={"csrf": secret})
        assert signed_out.headers["location"] == "/ui/login"
        assert http.get("/ui/").status_code == 303
    # Revoking the token ends its sessions at once.
    viewer = token(running_fleet, "viewer", "read")
    with running_fleet.http() as http:
        sign_in(http, viewer)
        assert http.get("/ui/").status_code == 200
        with running_fleet.client() as admin:
            (row,) = [t for t in admin.tokens() if t["name"] == "viewer"]
            admin.revoke_token(row["id"])
        assert http.get("/ui/").status_code == 303


def send_kpis(device: Device, *, seq: int = 1) -> None:
    """Five hours of KPIs for agent ``restock`` from ``device``, as a node's uplink sends
    them: 200 runs (180 succeeded), 40 answers (20 overrides), decision latency varying."""
    import base64

    import orjson
    import zstandard

    from edgeos.telemetry.sketch import DDSketch

    def sketch(seconds: list[float]) -> str:
        s = DDSketch()
        s.extend(seconds)
        return base64.b64encode(s.to_bytes()).decode()

    now_minute = int(time.time()) // 60 * 60
    records = [
        {"kind": "kpi", "at": minute, "data": {
            "minute": minute, "agent": "restock", "runs": 10, "succeeded": 9, "failed": 1,
            "answered": 2, "overrides": 1,
            "decision": sketch([0.05 + 0.03 * (i % 5) + 0.004 * k * (1 + i % 3) for k in range(10)])}}
        for i, minute in enumerate(range(now_minute - 5 * 3600, now_minute, 900))
    ]  # fmt: skip
    batch = {"device_id": device.device_id, "seq": seq, "sent_at": time.time(),
             "records": records}  # fmt: skip
    sent = device.http.post(
        "/api/v1/telemetry", content=zstandard.ZstdCompressor().compress(orjson.dumps(batch)),
        headers={"content-type": "application/vnd.edgeos.telemetry+zstd"},
    )  # fmt: skip
    assert sent.status_code == 200, sent.text


def test_fleet_kpis_are_charted(running_fleet: FleetServer, device: Device) -> None:
    send_kpis(device)
    with running_fleet.http() as http:
        sign_in(http, running_fleet.admin_token)
        for path in ("/ui/", f"/ui/devices/{device.device_id}"):
            text = http.get(path).text
            assert "Decision latency, ms" in text, path
            assert text.count("<polyline") >= 3, path  # p50, p99, success and override
            assert "<td>restock</td><td>200</td><td>90.0%</td><td>50.0%</td>" in text, path

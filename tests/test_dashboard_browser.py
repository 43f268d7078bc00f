"""The dashboard in a real headless Chromium, driven by Playwright: a real ``edgeos fleet
serve`` process and a real ``edgeos node run`` enrolled in it.

An operator signs in, sees the fleet, opens the device, answers the node's escalation
in the browser and sees the node's run go on with that answer, and halts a rollout; a
read-only operator is refused. With ``EDGEOS_SCREENSHOTS=DIR`` the main pages are saved
there as PNG (``docs/screenshots`` holds the ones the docs show).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgeos.fleet.client import FleetClient
from edgeos.fleet.packing import pack_artifact
from edgeos.node.process import ServerProcess, free_port
from edgeos.security.tls import client_ssl_context
from tests.fleet_support import asking_node, enroll_device, policy_file, wait_for
from tests.test_dashboard import send_kpis

CHROMIUM = Path(os.environ.get("EDGEOS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set EDGEOS_CHROMIUM)",
    ),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright for Python is not installed (the dev extra)"
)
SHOTS = os.environ.get("EDGEOS_SCREENSHOTS")


@dataclass
class Stack:
    """The fleet process, its admin client, and the node enrolled in it."""

    fleet: ServerProcess
    ca_pem: str
    admin: FleetClient
    admin_token: str
    node: ServerProcess
    device_id: str

    def http(self, cert: Path | None = None, key: Path | None = None) -> httpx.Client:
        """An HTTPS client of the fleet trusting its CA (presenting a certificate if given)."""
        return httpx.Client(base_url=self.fleet.url, timeout=30,
                            verify=client_ssl_context(self.ca_pem, cert, key))  # fmt: skip


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``edgeos fleet serve`` (nodes sync every second) and one node with an asking agent."""
    root = tmp_path_factory.mktemp("browser")
    data, port = root / "fleet", free_port()
    command = [
        sys.executable, "-m", "edgeos", "fleet", "serve", "--data", str(data),
        "--db", f"sqlite:///{root / 'fleet.db'}", "--port", str(port), "--sync-interval", "1s",
    ]  # fmt: skip
    fleet = ServerProcess(command, f"https://127.0.0.1:{port}", ready_path="/api/v1/health",
                          env={"COLUMNS": "200"}, verify=False)  # fmt: skip
    with fleet:
        admin_token = (data / "admin-token").read_text().strip()
        with FleetClient.login(fleet.url, admin_token) as admin:
            join = admin.create_join_token("stores", ttl_s=600)["token"]
            with asking_node(root / "node", fleet.url, join) as node:
                status = wait_for(
                    "the node online in the fleet",
                    lambda: (s := httpx.get(f"{node.url}/api/status", timeout=10).json())[
                        "fleet_link"]["link"] == "online" and s,
                )  # fmt: skip
                ca_pem = (data / "keys" / "ca.crt").read_text()
                yield Stack(fleet, ca_pem, admin, admin_token, node,
                            status["fleet_link"]["device_id"])  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The system Chromium, headless; never a downloaded browser."""
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                                     headless=True)  # fmt: skip
        try:
            yield chromium
        finally:
            chromium.close()


def signed_in(browser: Any, stack: Stack, token: str, **options: Any) -> Any:
    """A new page signed in with ``token`` (the fleet's certificate is its own CA's)."""
    context = browser.new_context(ignore_https_errors=True, **options)
    page = context.new_page()
    page.goto(f"{stack.fleet.url}/ui/")
    assert page.url.endswith("/ui/login?next=/ui/")
    page.fill("#token", token)
    page.click("button:has-text('Sign in')")
    page.wait_for_url("**/ui/")
    return page


def shot(page: Any, name: str) -> None:
    """Save the page as ``NAME.png`` when screenshots are asked for."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))  # the viewport: small files


def shown(page: Any, locator: Any, what: str) -> None:
    """Reload ``page`` until ``locator`` finds something (pages do not refresh themselves)."""

    def look() -> int:
        if locator.count():
            return 1
        page.reload()
        return 0

    wait_for(what, look)


def run_of(stack: Stack, run_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{stack.node.url}/api/runs/{run_id}", timeout=10).json()
    return doc


def test_an_operator_answers_an_escalation_and_halts_a_rollout(
    browser: Any, stack: Stack, tmp_path: Path
) -> None:
    page = signed_in(browser, stack, stack.admin_token, viewport={"width": 1200, "height": 800})
    expect = sync_api.expect
    # The fleet at a glance, then the device.
    expect(page.locator("h1")).to_have_text("Fleet")
    expect(page.locator("td code", has_text=stack.device_id)).to_be_visible()
    expect(page.locator(".badge.b-online").first).to_be_visible()
    page.click(f"td a[href='/ui/devices/{stack.device_id}']")
    expect(page.locator("h2", has_text="Artifacts: desired and actual")).to_be_visible()
    expect(page.locator("dd code", has_text=stack.device_id)).to_be_visible()
    shot(page, "device")

    # The node's agent asks; the operator answers in the browser; the run goes on.
    started = httpx.post(f"{stack.node.url}/api/agents/restock/runs", timeout=10,
                         json={"input": {"sku": "milk", "units": 40}}).json()["run_id"]  # fmt: skip
    page.click("nav a:has-text('Approvals')")
    question = page.locator(".question", has_text="Reorder 40 units of milk?")
    shown(page, question, "the escalation in the inbox")
    shot(page, "approvals")
    row = page.locator("tr", has=question)
    row.locator("select[name=choice]").select_option("no")
    row.locator("input[name=note]").fill("milk is in stock")
    row.locator("button:has-text('Answer')").click()
    page.wait_for_url("**/ui/approvals")
    run = wait_for("the node's run to go on with the answer",
                   lambda: (r := run_of(stack, started))["state"] == "succeeded" and r)  # fmt: skip
    assert run["outcome"] == {"sku": "milk", "reorder": False}
    (answered,) = [r["payload"] for r in run["journal"] if r["kind"] == "escalation_answered"]
    assert (answered["answer"], answered["by"], answered["note"], answered["override"]) == (
        "no", "fleet:operator:admin", "milk is in stock", True)  # fmt: skip
    shown(page, page.locator(".badge.b-applied"), "the inbox to show it applied")

    # A rollout, halted from its page.
    data, _, _ = pack_artifact("policy", policy_file(tmp_path))
    stack.admin.publish("policy", "stores", "1", data)
    rollout = stack.admin.request("POST", "/api/v1/rollouts", json={
        "artifact": "policy/stores@1", "target": "all", "waves": [50, 100], "soak_s": 3600})  # fmt: skip
    page.click("nav a:has-text('Rollouts')")
    shot(page, "rollouts")
    page.click(f"a:has-text('{rollout['id']}')")
    expect(page.locator(".badge.b-running")).to_be_visible()
    shot(page, "rollout")
    page.click("button:has-text('Halt (pause)')")
    expect(page.locator("dd .badge.b-paused")).to_be_visible()
    assert stack.admin.request("GET", f"/api/v1/rollouts/{rollout['id']}")["status"] == "paused"
    page.click("nav a:has-text('Audit')")
    expect(page.locator("td", has_text="approval.answer")).to_be_visible()
    shot(page, "audit")
    page.context.close()


def test_a_read_only_operator_is_refused(browser: Any, stack: Stack) -> None:
    token = stack.admin.create_token("viewer", ["read"])["token"]
    page = signed_in(browser, stack, token)
    expect = sync_api.expect
    expect(page.locator(".who")).to_contain_text("viewer")
    page.click("nav a:has-text('Approvals')")
    expect(page.locator(".notice")).to_have_text("Answering needs the deploy scope.")
    assert page.locator("button:has-text('Answer')").count() == 0
    # Posting the answer anyway (a form crafted in the page, with the session's CSRF
    # secret) is refused and audited.
    with page.expect_response("**/ui/approvals/answer") as posted:
        page.evaluate(
            """() => {
                const form = document.createElement('form');
                form.method = 'post';
                form.action = '/ui/approvals/answer';
                const fields = {csrf: document.querySelector('input[name=csrf]').value,
                                device_id: 'x', escalation_id: 'y', choice: 'no'};
                for (const [name, value] of Object.entries(fields)) {
                    const input = document.createElement('input');
                    input.name = name;
                    input.value = value;
                    form.appendChild(input);
                }
                document.body.appendChild(form);
                form.submit();
            }"""
        )
    assert posted.value.status == 403
    expect(page.locator(".error")).to_contain_text("lacks the 'deploy' scope")
    response = page.goto(f"{stack.fleet.url}/ui/audit")
    assert response.status == 403
    expect(page.locator("h1")).to_have_text("Not allowed")
    refused = stack.admin.audit(actor="operator:viewer", outcome="refused")
    assert {r["target"] for r in refused} >= {"POST /ui/approvals/answer", "GET /ui/audit"}
    page.context.close()


def test_kpis_sent_by_devices_are_charted(browser: Any, stack: Stack, tmp_path: Path) -> None:
    # A second device, enrolled as a node does, sends an hour of KPIs.
    join = stack.admin.create_join_token("stores", ttl_s=600)["token"]
    sender = enroll_device(stack, join, tmp_path)  # type: ignore[arg-type]
    try:
        send_kpis(sender)
    finally:
        sender.close()
    page = signed_in(browser, stack, stack.admin_token, viewport={"width": 1200, "height": 800})
    expect = sync_api.expect
    expect(page.locator("figcaption", has_text="Decision latency, ms")).to_be_visible()
    expect(page.locator("svg polyline")).to_have_count(4)  # p50, p99, success, override
    expect(page.locator("td", has_text="restock")).to_be_visible()
    shot(page, "fleet")
    page.context.close()


def test_the_pages_fit_a_tablet(browser: Any, stack: Stack) -> None:
    page = signed_in(browser, stack, stack.admin_token, viewport={"width": 768, "height": 1024})
    for path in ("/ui/", "/ui/approvals", "/ui/rollouts", f"/ui/devices/{stack.device_id}"):
        page.goto(f"{stack.fleet.url}{path}")
        # Wide tables scroll inside their box; the page itself never scrolls sideways.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)
    page.goto(f"{stack.fleet.url}/ui/")
    shot(page, "fleet-tablet")
    page.context.close()

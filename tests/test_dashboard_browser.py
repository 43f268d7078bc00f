"""The dashboard in a real headless Chromium, driven by Playwright: a real ``edgeos fleet
serve`` process and a real ``edgeos node run`` enrolled in it.

An operator signs in, sees the fleet, opens the device, answers the node's escalation
in the browser and sees the node's run go on with that answer, and halts a rollout; a
read-only operator is refused; a run is followed from the device page to its timeline,
and a personal value in its input reaches neither the fleet's pages nor its database.
The demo's fleet is looked at in the browser too, with the demo's own data. With
``EDGEOS_SCREENSHOTS=DIR`` the main pages are saved there as PNG (``docs/screenshots``
holds the ones the docs show).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from edgeos.demo.fleet import DemoFleet
from edgeos.demo.inventory_demo import run_inventory_demo
from edgeos.demo.train import DemoModels
from edgeos.fleet.client import FleetClient
from edgeos.fleet.packing import pack_artifact
from edgeos.node.process import ServerProcess, free_port
from edgeos.security.tls import client_ssl_context
from tests.fleet_support import asking_node, enroll_device, policy_file, wait_for
from tests.stored import stored_bytes
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
    db_path: Path

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
            node = asking_node(root / "node", fleet.url, join)
            # Telemetry every second, every trace: the runs reach the dashboard at once.
            node.env = {**(node.env or {}), "EDGEOS_TELEMETRY_INTERVAL_S": "1",
                        "EDGEOS_TELEMETRY_TRACE_PERCENT": "100"}  # fmt: skip
            with node:
                status = wait_for(
                    "the node online in the fleet",
                    lambda: (s := httpx.get(f"{node.url}/api/status", headers=node.headers,
                                            timeout=10).json())["fleet_link"]["link"] == "online"
                    and s,
                )  # fmt: skip
                ca_pem = (data / "keys" / "ca.crt").read_text()
                yield Stack(fleet, ca_pem, admin, admin_token, node,
                            status["fleet_link"]["device_id"], root / "fleet.db")  # fmt: skip


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


def signed_in(browser: Any, fleet_url: str, token: str, **options: Any) -> Any:
    """A new page signed in with ``token`` (the fleet's certificate is its own CA's)."""
    context = browser.new_context(ignore_https_errors=True, **options)
    page = context.new_page()
    page.goto(f"{fleet_url}/ui/")
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
    doc: dict[str, Any] = httpx.get(
        f"{stack.node.url}/api/runs/{run_id}", headers=stack.node.headers, timeout=10
    ).json()
    return doc


def test_an_operator_answers_an_escalation_and_halts_a_rollout(
    browser: Any, stack: Stack, tmp_path: Path
) -> None:
    page = signed_in(
        browser, stack.fleet.url, stack.admin_token, viewport={"width": 1200, "height": 800}
    )
    expect = sync_api.expect
    # The fleet at a glance, then the device.
    expect(page.locator("h1")).to_have_text("Fleet")
    expect(page.locator("td code", has_text=stack.device_id)).to_be_visible()
    expect(page.locator(".badge.b-online").first).to_be_visible()
    page.click(f"td a[href='/ui/devices/{stack.device_id}']")
    expect(page.locator("h2", has_text="Artifacts: desired and actual")).to_be_visible()
    expect(page.locator("dd code", has_text=stack.device_id)).to_be_visible()

    # The node's agent asks; the operator answers in the browser; the run goes on.
    started = httpx.post(f"{stack.node.url}/api/agents/restock/runs", timeout=10,
                         headers=stack.node.headers,
                         json={"input": {"sku": "milk", "units": 40}}).json()["run_id"]  # fmt: skip
    page.click("nav a:has-text('Approvals')")
    question = page.locator(".question", has_text="Reorder 40 units of milk?")
    shown(page, question, "the escalation in the inbox")
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
    page = signed_in(browser, stack.fleet.url, token)
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
    page = signed_in(
        browser, stack.fleet.url, stack.admin_token, viewport={"width": 1200, "height": 800}
    )
    expect = sync_api.expect
    expect(page.locator("figcaption", has_text="Decision latency, ms")).to_be_visible()
    expect(page.locator("svg polyline")).to_have_count(4)  # p50, p99, success, override
    expect(page.locator("td", has_text="restock")).to_be_visible()
    page.context.close()


def test_the_pages_fit_a_tablet(browser: Any, stack: Stack) -> None:
    page = signed_in(
        browser, stack.fleet.url, stack.admin_token, viewport={"width": 768, "height": 1024}
    )
    for path in ("/ui/", "/ui/approvals", "/ui/rollouts", f"/ui/devices/{stack.device_id}"):
        page.goto(f"{stack.fleet.url}{path}")
        # Wide tables scroll inside their box; the page itself never scrolls sideways.
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)
    page.goto(f"{stack.fleet.url}/ui/")
    shot(page, "fleet-tablet")
    page.context.close()


def test_a_run_is_followed_from_the_device_page_to_its_timeline(browser: Any, stack: Stack) -> None:
    personal = "ada.lovelace@example.org"  # in the run's input, never at the fleet
    node = stack.node
    started = httpx.post(f"{node.url}/api/agents/restock/runs", headers=node.headers, json={
        "input": {"sku": "flour", "units": 7, "customer": personal}}, timeout=10,
    ).json()["run_id"]  # fmt: skip
    asked = wait_for("the run's escalation on the node", lambda: [
        e for e in httpx.get(f"{node.url}/api/approvals", headers=node.headers, timeout=10).json()
        if e["run_id"] == started])  # fmt: skip
    answered = httpx.post(f"{node.url}/api/approvals/{asked[0]['id']}", headers=node.headers,
                          timeout=10, json={"choice": "yes", "by": "store manager"})  # fmt: skip
    assert answered.status_code == 200, answered.text
    wait_for("the run to finish", lambda: run_of(stack, started)["state"] == "succeeded")

    page = signed_in(
        browser, stack.fleet.url, stack.admin_token, viewport={"width": 1200, "height": 800}
    )
    expect = sync_api.expect
    page.goto(f"{stack.fleet.url}/ui/devices/{stack.device_id}")
    run_link = page.locator(f"a[href='/ui/devices/{stack.device_id}/runs/{started}']")
    shown(page, run_link, "the run on the device page")
    row = page.locator("tr", has=run_link)
    expect(row.locator(".badge.b-succeeded")).to_be_visible()
    expect(row).to_contain_text("1 step, 0 effects, 1 escalation")
    run_link.click()
    expect(page.locator("h1")).to_have_text("restock run")
    # The whole trace is sent once the run is over; the page shows what has arrived.
    bars = page.locator("figure.timeline svg rect")
    shown(page, page.locator("figure.timeline text.label", has_text="run restock"), "the run span")
    assert bars.count() >= 3  # the run, the step parked for the answer, the step again
    expect(page.locator("figure.timeline text.label", has_text="step decide").first).to_be_visible()
    expect(page.locator("td", has_text="escalation_answered")).to_be_visible()
    expect(page.locator("td .detail", has_text="by=local")).to_be_visible()

    # The personal value is on the node, and nowhere at the fleet: pages or database.
    assert personal in str(run_of(stack, started)["journal"][0]["payload"]["input"])
    for path in ("/ui/", f"/ui/devices/{stack.device_id}",
                 f"/ui/devices/{stack.device_id}/runs/{started}", "/ui/approvals"):  # fmt: skip
        page.goto(f"{stack.fleet.url}{path}")
        assert personal not in page.content(), path
    for file in stack.db_path.parent.glob(f"{stack.db_path.name}*"):  # the WAL too
        assert personal.encode() not in stored_bytes([file]), file
    page.context.close()


@pytest.mark.skipif(
    not SHOTS,
    reason="runs the whole demo again to take its screenshots (EDGEOS_SCREENSHOTS=DIR); the "
    "demo's fleet is checked over HTTP by tests/test_inventory_demo.py and each page here",
)
def test_the_demo_fleet_shows_the_demo_in_a_browser(browser: Any, demo_models: DemoModels) -> None:
    out = io.StringIO()
    with DemoFleet() as fleet:
        result = run_inventory_demo(demo_models.out_dir, duration=6.0, fleet=fleet,
                                    console=Console(file=out, width=160))  # fmt: skip
        assert result.fleet is not None, out.getvalue()
        device_id = result.fleet.device_id
        page = signed_in(browser, fleet.url, fleet.admin_token,
                         viewport={"width": 1200, "height": 800})  # fmt: skip
        expect = sync_api.expect
        expect(page.locator("td code", has_text=device_id)).to_be_visible()
        expect(page.locator("figcaption", has_text="Decision latency, ms")).to_be_visible()
        expect(page.locator("td", has_text="inventory").first).to_be_visible()
        shot(page, "fleet")
        page.click(f"td a[href='/ui/devices/{device_id}']")
        runs = page.locator(f"a[href^='/ui/devices/{device_id}/runs/']")
        assert runs.count() == result.fleet.runs_listed
        page.locator("h2", has_text="Recent runs").scroll_into_view_if_needed()
        shot(page, "device")
        runs.first.click()
        expect(page.locator("h1")).to_have_text("inventory run")
        labels = page.locator("figure.timeline text.label")
        for name in ("run inventory", "step sense", "step reason", "step act", "step learn"):
            expect(labels.filter(has_text=name).first).to_be_visible()
        shot(page, "run")
        page.click("nav a:has-text('Approvals')")
        expect(page.locator(".badge.b-applied").first).to_be_visible()
        shot(page, "approvals")
        page.context.close()

"""Runs on the dashboard over HTTP: a device's recent runs, a run's trace and journal.

Against a real fleet over TLS on loopback, with a real enrolled device sending the
telemetry batches a node's uplink sends (a run's outline as a ``log`` record, its spans
as ``trace`` records).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zstandard

from tests.fleet_support import Device, FleetServer, enroll_device, join_token
from tests.test_dashboard import EVIL, sign_in, token

RUN = "01900000-0000-7000-8000-0000000000a1"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def outline(run_id: str = RUN, *, agent: str = "restock", started: float) -> dict[str, Any]:
    """A run's outline as ``edgeos.agents.outline`` makes it."""
    return {
        "type": "run", "run_id": run_id, "trace_id": TRACE, "agent": agent, "version": "1",
        "trigger": "manual", "state": "succeeded", "started_at": started,
        "finished_at": started + 1.5, "duration_ms": 1500.0, "steps": 1, "failures": 0,
        "effects": 1, "escalations": 1, "overrides": 1, "cost": 0.002,
        "journal": [
            {"kind": "escalation_raised", "at_s": 0.01, "step": "decide", "timeout": 600,
             "options": 2},
            {"kind": "escalation_answered", "at_s": 1.2, "step": "decide", "override": True,
             "timed_out": False, "by": "fleet"},
            {"kind": "step_completed", "at_s": 1.4, "step": "decide", "index": 0, "attempt": 2,
             "duration_ms": 12.5, "effects": 1, "model_calls": 1},
            {"kind": "effect_enqueued", "at_s": 1.4, "step": "decide", "connector": "supplier",
             "operation": "order"},
            {"kind": "run_finished", "at_s": 1.5, "outcome": "succeeded"},
        ],
        "journal_entries": 5,
    }  # fmt: skip


def span(span_id: str, parent: str | None, name: str, start: float, ms: float,
         status: str = "unset") -> dict[str, Any]:  # fmt: skip
    """A span as ``edgeos.telemetry.tracing`` offers it to the uplink."""
    return {"trace_id": TRACE, "span_id": span_id, "parent_id": parent, "name": name,
            "start_ns": int(start * 1e9), "end_ns": int((start + ms / 1000) * 1e9),
            "status": status, "attributes": {"edgeos.agent": "restock"}}  # fmt: skip


def send(device: Device, seq: int, records: list[dict[str, Any]]) -> None:
    """One telemetry batch, as a node's uplink sends it."""
    batch = {"device_id": device.device_id, "seq": seq, "sent_at": time.time(),
             "records": records}  # fmt: skip
    sent = device.http.post(
        "/api/v1/telemetry", content=zstandard.ZstdCompressor().compress(orjson.dumps(batch)),
        headers={"content-type": "application/vnd.edgeos.telemetry+zstd"},
    )  # fmt: skip
    assert sent.status_code == 200, sent.text


@pytest.fixture
def device(running_fleet: FleetServer, tmp_path: Path) -> Iterator[Device]:
    """An enrolled device that sent one run (with its trace), a run whose agent name is a
    script, and a record that only looks like a run."""
    dev = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "devices")
    started = time.time() - 30
    spans = [
        span("a" * 16, None, "run restock", started, 1500),
        span("b" * 16, "a" * 16, "step decide", started + 0.005, 20, "error"),
        span("c" * 16, "a" * 16, "step decide", started + 1.2, 200),
        span("d" * 16, "c" * 16, "model demand", started + 1.25, 50),
        span("e" * 16, "c" * 16, "effect supplier.order", started + 1.4, 0),
    ]
    evil = outline("01900000-0000-7000-8000-0000000000b2", agent=EVIL, started=started + 60)
    broken = {"type": "run", "run_id": "x", "state": 3}  # no agent, no times
    send(dev, 1, [{"kind": "log", "at": started + 1.5, "data": outline(started=started)},
                  *({"kind": "trace", "at": s["start_ns"] / 1e9, "data": s} for s in spans),
                  {"kind": "log", "at": started + 61, "data": evil},
                  {"kind": "log", "at": started + 62, "data": broken}])  # fmt: skip
    try:
        yield dev
    finally:
        dev.close()


def test_the_device_page_lists_runs_and_a_run_shows_its_trace_and_journal(
    running_fleet: FleetServer, device: Device
) -> None:
    with running_fleet.http() as http:
        sign_in(http, token(running_fleet, "viewer", "read"))  # reading needs no more
        page = http.get(f"/ui/devices/{device.device_id}")
        assert page.status_code == 200
        text = page.text
        assert "<h2>Recent runs</h2>" in text
        href = f"/ui/devices/{device.device_id}/runs/{RUN}"
        assert f'href="{href}"' in text
        row = re.search(rf'<tr><td><a href="{href}">.*?</tr>', text)
        assert row, text
        for cell in ("restock@1", "b-succeeded", "1500 ms",
                     "1 step, 1 effect, 1 escalation, 1 override"):  # fmt: skip
            assert cell in row.group(0), cell
        # The newest first; the one named like a script is shown as text; the malformed
        # record is left out.
        assert text.index("&lt;script&gt;alert") < text.index(href)
        assert "<script" not in text
        assert text.count(f"/ui/devices/{device.device_id}/runs/") == 2

        run = http.get(href)
        assert run.status_code == 200
        assert "<h1>restock run</h1>" in run.text
        svg = run.text[run.text.index('<figure class="chart timeline">') :]
        assert svg.count("<rect") == 5  # one bar per span
        assert svg.count('class="bar bad"') == 1  # the failed first attempt
        labels = re.findall(r'<text class="label" x="(\d+)"[^>]*>([^<]*)</text>', svg)
        assert labels == [("6", "run restock"), ("18", "step decide"), ("18", "step decide"),
                          ("30", "model demand"), ("30", "effect supplier.order")]  # fmt: skip
        for shown in ("escalation_answered", "by=fleet", "override=True", "connector=supplier",
                      "operation=order", "+1.400 s"):  # fmt: skip
            assert shown in run.text, shown


def test_runs_that_did_not_arrive_or_are_not_runs_are_not_found(
    running_fleet: FleetServer, device: Device
) -> None:
    with running_fleet.http() as http:
        assert http.get(f"/ui/devices/{device.device_id}/runs/{RUN}").status_code == 303
        sign_in(http, running_fleet.admin_token)
        for run_id in ("01900000-0000-7000-8000-00000000ffff", "x", "%25", "%22%2C%22"):
            missing = http.get(f"/ui/devices/{device.device_id}/runs/{run_id}")
            assert missing.status_code == 404, run_id
        # Another device's run is not shown under this one.
        assert http.get(f"/ui/devices/other/runs/{RUN}").status_code == 404

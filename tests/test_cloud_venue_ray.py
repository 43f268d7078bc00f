"""The fleet's cloud venue on a Ray cluster: a local Ray head, real fleets over mTLS.

The Ray tests are skipped when the ``ray`` extra is not installed (``pip install
'edgeos[ray]'``). One Ray head (``ray start --head`` in a child process) serves the module;
one fleet runs its cloud venue on it with two replicas, and a second fleet replica over
the same database and keys runs it in process, so the same device can ask both the same
questions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from edgeos.cli.main import app
from edgeos.errors import ConfigError, UnavailableError
from edgeos.fleet.cloud_ray import APP, deploy, disconnect
from edgeos.fleet.cloud_venue import CLOUD, REPLICA_HEADER
from edgeos.fleet.packing import pack_directory
from edgeos.routing.v2_venue import ClientCertificate, V2Venue
from edgeos.routing.venues import Offer, VenueInfo
from tests import onnx_models
from tests.fleet_support import (
    Device,
    FleetServer,
    audit_rows,
    enroll_device,
    fleet_config,
    free_port,
    join_token,
    model_dir,
    wait_for,
)

needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None,
    reason="the ray extra is not installed: pip install 'edgeos[ray]'",
)
V2 = f"{CLOUD}/v2/models"
# Ray's own modules use APIs their dependencies deprecate; the suite makes warnings errors.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")


def test_without_the_ray_extra_the_fleet_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"needs the ray extra: pip install 'edgeos\[ray\]'"):
        deploy(f"127.0.0.1:{free_port()}", (1, 1))


@needs_ray
def test_fleet_serve_names_a_ray_cluster_that_does_not_answer(tmp_path: Path) -> None:
    # Before the module's cluster: a process is the driver of one Ray cluster only.
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(app, [
        "fleet", "serve", "--data", str(tmp_path / "fleet"), "--port", str(free_port()),
        "--cloud-ray", address, "--cloud-replicas", "2",
    ])  # fmt: skip
    # Ray alone retries an address that refuses connections for minutes.
    assert time.monotonic() - started < 30
    assert isinstance(result.exception, UnavailableError), result.output
    assert f"the Ray cluster at {address} does not answer" in str(result.exception)
    assert "start it (`ray start --head`) or correct the cloud Ray address" in str(result.exception)
    bad = CliRunner().invoke(app, ["fleet", "serve", "--data", str(tmp_path / "fleet"),
                                   "--cloud-ray", address, "--cloud-replicas", "4-2"])  # fmt: skip
    assert isinstance(bad.exception, ConfigError)
    assert "cloud replicas 4-2: use 1 <= min <= max" in str(bad.exception)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head on loopback in a child process (two CPUs, no dashboard); its address."""
    port = free_port()
    # Ray's socket paths must stay short: a directory of its own right under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="edgeos-ray-"))
    log = (temp / "head.log").open("wb")
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
         f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=false", "--include-log-monitor=false", "--no-monitor",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        stdout=log, stderr=subprocess.STDOUT,
        # A cluster of the test's own; Ray's token authentication is for real clusters.
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        start_new_session=True,  # every process of the cluster is in the head's session
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{port}"
    finally:
        disconnect()
        _kill_session(head.pid)  # the head, the cluster's daemons, the replicas
        head.wait(10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (the Ray head and what it started)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # pid (comm) state ppid pgrp session ...: comm may hold spaces, split after it.
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == session:
                os.kill(int(stat.parent.name), signal.SIGKILL)


class Fleets:
    """A fleet whose cloud venue runs on Ray, a replica of it that runs models in process,
    and an enrolled device's certificate."""

    def __init__(self, on_ray: FleetServer, in_process: FleetServer, device: Device) -> None:
        self.on_ray = on_ray
        self.in_process = in_process
        self.device = device

    def venue(self, root: Path) -> V2Venue:
        """The Ray fleet's cloud venue as a node's router reaches it."""
        ca = root / "fleet-ca.crt"
        ca.write_text(self.on_ray.ca_pem)
        info = VenueInfo("cloud", on_device=False, models={"risk": Offer("risk", 0.9)})
        certificate = ClientCertificate(ca, self.device.cert_path, self.device.key_path)
        return V2Venue(info, f"{self.on_ray.url}{CLOUD}", certificate=certificate)

    def http(self, fleet: FleetServer) -> httpx.Client:
        """An mTLS client presenting the device's certificate."""
        return fleet.http(self.device.cert_path, self.device.key_path)

    def publish(self, root: Path, version: str, seed: int) -> None:
        """Publish model ``risk`` at ``version`` (an MLP made with ``seed``)."""
        directory = model_dir(root / f"seed{seed}", "risk", version)
        onnx_models.mlp(directory / "risk.onnx", seed=seed)
        with self.on_ray.client() as client:
            client.publish("model", "risk", version, pack_directory(directory))


@pytest.fixture(scope="module")
def fleets(ray_head: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleets]:
    root = tmp_path_factory.mktemp("ray-fleet")
    config = fleet_config(root / "fleet", f"sqlite:///{root / 'fleet.db'}",
                          cloud_ray=ray_head, cloud_replicas=(2, 2))  # fmt: skip
    on_ray = FleetServer(config).start()
    in_process = FleetServer(replace(config, port=free_port(), cloud_ray=None)).start(init=False)
    try:
        # As `edgeos fleet serve --cloud-ray` does before it serves: connect and deploy.
        wait_for("the Ray head", lambda: _deployed(ray_head), timeout=120)
        device = enroll_device(on_ray, join_token(on_ray), root / "device")
        fleets = Fleets(on_ray, in_process, device)
        fleets.publish(root, "1", seed=0)
        yield fleets
        device.close()
    finally:
        in_process.stop()
        on_ray.stop()


def _deployed(address: str) -> bool:
    try:
        deploy(address, (2, 2))
    except UnavailableError as exc:
        if "does not answer" not in str(exc):  # anything but "not up yet" is a failure
            raise
        return False
    return True


def _infer(rows: np.ndarray[Any, Any], request_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [{"name": "features", "datatype": "FP32", "shape": list(rows.shape),
                    "data": rows.ravel().tolist()}],
    }  # fmt: skip


@needs_ray
def test_the_cloud_venue_on_ray_answers_as_in_process_from_several_replicas(
    fleets: Fleets, tmp_path: Path
) -> None:
    rows = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32)
    with fleets.http(fleets.on_ray) as on_ray, fleets.http(fleets.in_process) as in_process:
        for path in (f"{V2}/risk", f"{V2}/nope"):  # metadata; an unknown model's 404
            ray_answer, local_answer = on_ray.get(path), in_process.get(path)
            assert ray_answer.status_code == local_answer.status_code
            assert ray_answer.json() == local_answer.json()
        assert ray_answer.status_code == 404
        assert ray_answer.json() == {
            "error": "model_not_found", "message": "the cloud venue serves no model 'nope'"
        }  # fmt: skip
        body = _infer(rows, "r1")
        ray_answer = on_ray.post(f"{V2}/risk/infer", json=body)
        local_answer = in_process.post(f"{V2}/risk/infer", json=body)
        assert ray_answer.status_code == 200, ray_answer.text
        assert ray_answer.content == local_answer.content  # byte for byte
        assert ray_answer.json()["model_version"] == "1"
        assert REPLICA_HEADER not in local_answer.headers
        # Inputs ONNX Runtime refuses: the replica's refusal, as the fleet's own.
        body = _infer(rows[:, :3], "r2")
        ray_answer = on_ray.post(f"{V2}/risk/infer", json=body)
        local_answer = in_process.post(f"{V2}/risk/infer", json=body)
        assert ray_answer.status_code == local_answer.status_code == 400
        assert ray_answer.json() == local_answer.json()
        assert "model risk refused the inputs" in ray_answer.json()["message"]

        def replica(i: int) -> str:
            answer = on_ray.post(f"{V2}/risk/infer", json=_infer(rows[i % 5 : i % 5 + 1], str(i)))
            assert answer.status_code == 200, answer.text
            return str(answer.headers[REPLICA_HEADER])

        with ThreadPoolExecutor(4) as pool:
            replicas = set(pool.map(replica, range(24)))
        assert len(replicas) >= 2, replicas
        # A new version: served from the next call on, by every replica that is asked.
        fleets.publish(tmp_path, "2", seed=1)
        body = _infer(rows, "r3")
        ray_answer = on_ray.post(f"{V2}/risk/infer", json=body)
        assert ray_answer.json()["model_version"] == "2"
        assert ray_answer.content == in_process.post(f"{V2}/risk/infer", json=body).content
    # As a node's router reaches it: the V2 venue client with the device's certificate.
    venue = fleets.venue(tmp_path)
    try:
        outputs = venue.infer("risk", {"features": rows}).outputs
    finally:
        venue.close()
    model = ort.InferenceSession(
        str(onnx_models.mlp(tmp_path / "v2.onnx", seed=1)), providers=["CPUExecutionProvider"]
    )
    probabilities, label = model.run(None, {"features": rows})
    np.testing.assert_array_equal(outputs["probabilities"], probabilities)
    np.testing.assert_array_equal(outputs["label"], label)


@needs_ray
def test_a_revoked_device_is_refused_before_the_cluster_is_asked(
    fleets: Fleets, tmp_path: Path
) -> None:
    # Last in the module: it takes the cloud venue's deployment off the cluster.
    from ray import serve

    revoked = enroll_device(fleets.on_ray, join_token(fleets.on_ray), tmp_path / "revoked")
    with fleets.on_ray.client() as admin:
        admin.revoke_device(revoked.device_id)
    health = f"{CLOUD}/v2/health"
    with fleets.http(fleets.on_ray) as on_ray:
        assert on_ray.get(f"{health}/ready").json() == {"ready": True}
    serve.delete(APP)
    body = _infer(np.ones((1, 4), dtype=np.float32), "after")
    # With nothing to run the model, an enrolled device hears it may try again later,
    # and the venue's probe says so first: a node's link monitor takes it as offline.
    with fleets.http(fleets.on_ray) as on_ray:
        ready = on_ray.get(f"{health}/ready")
        assert ready.status_code == 503
        assert "Ray cluster does not answer" in ready.json()["message"]
        assert on_ray.get(f"{health}/live").json() == {"live": True}
        answer = on_ray.post(f"{V2}/risk/infer", json=body)
    assert answer.status_code == 503
    assert answer.json()["error"] == "unavailable"
    assert "Ray cluster did not run model risk" in answer.json()["message"]
    # ...and a revoked one is refused as before: the certificate is checked first.
    for path in (f"{V2}/risk/infer", f"{V2}/unpublished/infer"):
        answer = revoked.http.post(path, json=body)
        assert answer.status_code == 401
        assert answer.json() == {
            "error": "authentication", "message": f"device {revoked.device_id} is revoked"
        }  # fmt: skip
    refusals = audit_rows(fleets.on_ray, outcome="refused")
    assert any(r["target"] == f"POST {V2}/risk/infer" for r in refusals)
    revoked.close()

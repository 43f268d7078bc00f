"""The fleet's cloud venue with a real fleet over mTLS: cascade, forged and revoked devices."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeos.demo.train import DemoModels
from edgeos.errors import AuthenticationError, ModelNotFoundError, UnavailableError
from edgeos.fleet.packing import pack_directory
from edgeos.routing.decide import Needs
from edgeos.routing.v2_venue import ClientCertificate, V2Venue
from edgeos.routing.venues import Offer, VenueInfo
from edgeos.runtime import ModelHost
from edgeos.security.certs import CertificateAuthority, make_csr
from edgeos.security.keys import generate_key, write_private_key, write_public_file
from edgeos.state import Database
from tests.fleet_support import FleetServer, audit_rows, enroll_device, join_token
from tests.routing_support import SMALL, XL, demo_host, router_of


@pytest.fixture
def edge(tmp_path: Path, demo_models: DemoModels) -> Iterator[ModelHost]:
    with Database(tmp_path / "edge" / "node.db") as db:
        host = demo_host(db, tmp_path / "edge", demo_models, (SMALL,))
        yield host
        host.close()


def publish_xl(fleet: FleetServer, demo: DemoModels, root: Path) -> None:
    """The operator publishes the large demo model as a signed artifact."""
    directory = root / "xl-artifact"
    directory.mkdir()
    shutil.copy(demo.models[XL], directory / "model.onnx")
    (directory / "model.yaml").write_text(
        f"name: {XL}\nversion: '1'\ntask: classification\nlabels: [in_stock, stockout]\n"
    )
    with fleet.client() as client:
        client.publish("model", XL, "1", pack_directory(directory))


def cloud(fleet: FleetServer, cert: Path, key: Path, root: Path) -> V2Venue:
    """The fleet's cloud venue as a node reaches it, presenting ``cert``."""
    ca = root / "fleet-ca.crt"
    ca.write_text(fleet.ca_pem)
    info = VenueInfo(
        "cloud", on_device=False, price_per_call=0.0004, models={SMALL: Offer(XL, 0.93)}
    )
    return V2Venue(info, f"{fleet.url}/api/v1/cloud", certificate=ClientCertificate(ca, cert, key))


def test_cascade_escalates_low_confidence_to_the_fleet_cloud_venue(
    running_fleet: FleetServer, edge: ModelHost, demo_models: DemoModels, tmp_path: Path
) -> None:
    publish_xl(running_fleet, demo_models, tmp_path)
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "device")
    venue = cloud(running_fleet, device.cert_path, device.key_path, tmp_path)
    router = router_of(edge, venue)
    with np.load(demo_models.eval_set) as data:
        rows = np.asarray(data["features"][:40], dtype=np.float32)
    xl = ort.InferenceSession(str(demo_models.models[XL]), providers=["CPUExecutionProvider"])
    threshold = 0.9
    escalated = kept = 0
    try:
        for row in rows:
            x = {"features": row.reshape(1, -1)}
            routed = router.route("shop", SMALL, x, Needs("internal", cascade=threshold))
            record = routed.record
            small = edge.infer(SMALL, x).outputs["probabilities"]
            if float(small.max()) < threshold:
                escalated += 1
                assert record["escalated_to"] == "cloud"
                assert record["venue_model"] == XL
                assert routed.cost == pytest.approx(0.0004)
                expected = xl.run(None, x)[0]
                np.testing.assert_allclose(routed.outputs["probabilities"], expected, rtol=1e-5)
                assert "escalated to cloud" in " ".join(record["reasons"])
            else:
                kept += 1
                assert "escalated_to" not in record
                assert routed.venue == "edge"
                assert routed.cost == 0.0
                np.testing.assert_allclose(routed.outputs["probabilities"], small)
        assert escalated
        assert kept
        # local-only data is never escalated, however unsure the edge is.
        unsure = next(r for r in rows if float(edge.infer(SMALL, {"features": r.reshape(1, -1)})
                                               .outputs["probabilities"].max()) < threshold)  # fmt: skip
        private = router.route("shop", SMALL, {"features": unsure.reshape(1, -1)},
                               Needs("local-only", cascade=threshold))  # fmt: skip
        assert "escalated_to" not in private.record
        assert "no venue off the device may run it" in " ".join(private.record["reasons"])
        # A model the fleet has not published: the venue says so, by name.
        with pytest.raises(ModelNotFoundError, match="serves no model 'nope'"):
            venue.infer("nope", {"features": rows[:1]})
    finally:
        router.close()
        device.close()


def test_the_cloud_venue_refuses_forged_and_revoked_device_certificates(
    running_fleet: FleetServer, demo_models: DemoModels, tmp_path: Path
) -> None:
    publish_xl(running_fleet, demo_models, tmp_path)
    device = enroll_device(running_fleet, join_token(running_fleet), tmp_path / "device")
    x = {"features": np.zeros((1, 16), dtype=np.float32)}
    good = cloud(running_fleet, device.cert_path, device.key_path, tmp_path)
    assert good.infer(XL, x).outputs["probabilities"].shape == (1, 2)
    # A forgery: a CA made up with the fleet CA's very name, certifying the enrolled device.
    key = generate_key()
    forged = CertificateAuthority.create().issue_device(
        make_csr(key, device.device_id), device_id=device.device_id, group=device.group
    )
    write_private_key(tmp_path / "forged.key", key)
    write_public_file(tmp_path / "forged.crt", forged.pem)
    forger = cloud(running_fleet, tmp_path / "forged.crt", tmp_path / "forged.key", tmp_path)
    with pytest.raises((UnavailableError, AuthenticationError)):
        forger.infer(XL, x)
    with pytest.raises((UnavailableError, AuthenticationError)):
        forger.probe()
    # Revoked: refused from the next request on, the probe too, and audited.
    with running_fleet.client() as admin:
        admin.revoke_device(device.device_id)
    with pytest.raises(AuthenticationError, match=r"refused this device.*revoked"):
        good.infer(XL, x)
    with pytest.raises(AuthenticationError):
        good.probe()
    refusals = audit_rows(running_fleet, outcome="refused")
    assert any(r["target"].startswith("POST /api/v1/cloud/v2/models") for r in refusals)
    for venue in (good, forger):
        venue.close()
    device.close()

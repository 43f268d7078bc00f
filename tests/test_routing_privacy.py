"""One set of privacy classes, honoured end to end: tasks, model manifests, fleet policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgeos.demo.train import DemoModels
from edgeos.errors import ManifestError
from edgeos.manifests.loader import load_manifest, parse_manifest
from edgeos.manifests.model import ModelSpec
from edgeos.manifests.policy import PolicyManifest
from edgeos.protocol.privacy import PRIVACY_CLASSES, stricter
from edgeos.routing.decide import Needs
from edgeos.routing.venues import Offer, RoutingError
from edgeos.runtime import ModelHost
from edgeos.state import Database
from tests.routing_support import SMALL, XL, V2Server, demo_host, remote, router_of


@pytest.fixture
def venue_host(tmp_path: Path, demo_models: DemoModels) -> Iterator[ModelHost]:
    with Database(tmp_path / "venue" / "node.db") as db:
        host = demo_host(db, tmp_path / "venue", demo_models, (SMALL, XL))
        yield host
        host.close()


def policy(rules: dict[str, str]) -> PolicyManifest:
    return parse_manifest(
        {"kind": "policy", "name": "p", "version": "1",
         "venues": [{"privacy": k, "venue": v} for k, v in rules.items()]},
        PolicyManifest, "policy p",
    )  # fmt: skip


def row(demo: DemoModels) -> dict[str, np.ndarray]:
    with np.load(demo.eval_set) as data:
        return {"features": np.asarray(data["features"][:1], dtype=np.float32)}


def test_every_class_is_one_definition_everywhere(tmp_path: Path) -> None:
    assert PRIVACY_CLASSES == ("local-only", "restricted", "internal", "public")
    assert stricter("public", "restricted") == "restricted"
    assert stricter("local-only", "internal") == "local-only"
    for klass in PRIVACY_CLASSES:
        assert Needs(klass).privacy == klass
        assert ModelSpec.model_validate({"privacy": klass}).privacy == klass
        venue = "edge" if klass == "local-only" else "cloud"
        assert policy({klass: venue}).venue_for(klass) == venue
    # The same unknown name is refused by each, naming where.
    with pytest.raises(ManifestError, match=r"venues\.0\.privacy"):
        policy({"secret": "cloud"})
    spec = tmp_path / "model.yaml"
    spec.write_text("privacy: secret\n")
    with pytest.raises(ManifestError, match=rf"{spec.name}.*privacy"):
        load_manifest(spec, ModelSpec)
    # A policy cannot send local-only data off the device.
    with pytest.raises(ManifestError, match="local-only data never leaves the device"):
        policy({"local-only": "any"})


def test_each_class_is_honoured_by_the_router_under_fleet_policy(
    tmp_path: Path, venue_host: ModelHost, demo_models: DemoModels
) -> None:
    rules = policy({"public": "cloud", "internal": "any", "restricted": "edge"})
    server = V2Server(venue_host).start()
    with Database(tmp_path / "edge" / "node.db") as db:
        edge = demo_host(db, tmp_path / "edge", demo_models, (SMALL,))
        cloud = remote("cloud", server.url, price=0.0004, models={XL: Offer(XL, 0.95)})
        router = router_of(edge, cloud, cloud_rule=rules.venue_for)
        try:
            x = row(demo_models)
            # A model only the cloud has: public and internal data may go there ...
            for klass in ("public", "internal"):
                assert router.route("a", XL, x, Needs(klass)).venue == "cloud"
            assert server.requests == 2
            # ... restricted data is kept on the edge by the policy, local-only by the rule.
            with pytest.raises(RoutingError, match="fleet policy keeps restricted data"):
                router.route("a", XL, x, Needs("restricted"))
            with pytest.raises(RoutingError, match="privacy local-only"):
                router.route("a", XL, x, Needs("local-only"))
            assert server.requests == 2
        finally:
            router.close()
            edge.close()
            server.stop()


def test_a_models_declared_class_tightens_the_task(
    tmp_path: Path, venue_host: ModelHost, demo_models: DemoModels
) -> None:
    server = V2Server(venue_host).start()
    with Database(tmp_path / "edge" / "node.db") as db:
        edge = demo_host(db, tmp_path / "edge", demo_models, ())
        declared = load_manifest(demo_models.manifests[SMALL], ModelSpec)
        edge.registry.add(demo_models.models[SMALL], name=SMALL,
                          manifest=declared.model_copy(update={"privacy": "local-only"}))  # fmt: skip
        lab = remote("lab", server.url, price=0.0, models={SMALL: Offer(SMALL, 0.9)})
        router = router_of(edge, lab)
        try:
            for _ in range(20):  # the edge has been far slower than the SLO
                router.monitor.call_succeeded("edge", 0.5)
            routed = router.route("a", SMALL, row(demo_models), Needs("public", slo_ms=10))
            assert routed.venue == "edge"
            assert routed.record["privacy"] == "local-only"
            assert f"model {SMALL} is declared local-only" in " ".join(routed.record["reasons"])
            assert server.requests == 0
        finally:
            router.close()
            edge.close()
            server.stop()

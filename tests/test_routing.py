"""The venue decision with real venues: the node's model host and real V2 servers on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeos.demo.train import DemoModels
from edgeos.errors import ConfigError, InvalidRequestError, ManifestError, UnavailableError
from edgeos.manifests.policy import SAFE_DEFAULTS, PolicyManifest
from edgeos.node.process import node_process
from edgeos.routing.build import build_router
from edgeos.routing.config import load_venues
from edgeos.routing.decide import Needs
from edgeos.routing.router import Router
from edgeos.routing.v2_venue import ClientCertificate, V2Venue
from edgeos.routing.venues import Offer, RoutingError, Venue, VenueInfo
from edgeos.runtime import ModelHost, ModelRegistry
from edgeos.state import Database
from edgeos.telemetry import MetricsRegistry
from tests.routing_support import SMALL, XL, V2Server, demo_host, remote, router_of


@pytest.fixture
def edge(tmp_path: Path, demo_models: DemoModels) -> Iterator[ModelHost]:
    """The device: a node database and host with the small demo model only."""
    with Database(tmp_path / "edge" / "node.db") as db:
        host = demo_host(db, tmp_path / "edge", demo_models, (SMALL,))
        yield host
        host.close()


@pytest.fixture
def venue_host(tmp_path: Path, demo_models: DemoModels) -> Iterator[ModelHost]:
    """Another machine's host, with both demo models, for the V2 servers."""
    with Database(tmp_path / "venue" / "node.db") as db:
        host = demo_host(db, tmp_path / "venue", demo_models, (SMALL, XL))
        yield host
        host.close()


@pytest.fixture
def make_router(edge: ModelHost) -> Iterator[Callable[..., Router]]:
    """Routers over the edge and the venues given, closed after the test, pass or fail."""
    made: list[Router] = []

    def make(*venues: Venue, **options: Any) -> Router:
        made.append(router_of(edge, *venues, **options))
        return made[-1]

    yield make
    for router in made:
        router.close()


def features(demo: DemoModels, rows: int = 1) -> np.ndarray:
    with np.load(demo.eval_set) as data:
        return np.asarray(data["features"][:rows], dtype=np.float32)


def test_local_only_never_leaves_the_device_even_when_the_edge_is_slow(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    server = V2Server(venue_host).start()
    try:
        fast = remote("lab", server.url, price=0.0, models={SMALL: Offer(SMALL, 0.9)})
        router = make_router(fast)
        # The edge has been slow: its window says 500 ms, far over the SLO.
        for _ in range(20):
            router.monitor.call_succeeded("edge", 0.5)
        x = {"features": features(demo_models)}
        private = router.route("a", SMALL, x, Needs("local-only", slo_ms=10))
        assert private.venue == "edge"
        assert server.requests == 0
        assert any("local-only" in r["why"] for r in private.record["alternatives"])
        # The same call with data that may leave goes to the fast venue: the rule decided.
        shared = router.route("a", SMALL, x, Needs("internal", slo_ms=10))
        assert shared.venue == "lab"
        assert server.requests == 1
        # The edge failing the call (here: inputs it refuses) is no reason to leave either.
        bad = {"features": np.zeros((1, 3), dtype=np.float32)}
        with pytest.raises(InvalidRequestError):
            router.route("a", SMALL, bad, Needs("local-only"))
        assert server.requests == 1
        # A model the device lacks, for local-only data: refused, nothing sent.
        with pytest.raises(RoutingError, match="lab: privacy local-only"):
            router.route("a", XL, x, Needs("local-only"))
        assert server.requests == 1
    finally:
        server.stop()


def test_a_model_only_in_the_cloud_needs_the_cloud_and_policy_can_forbid_it(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    server = V2Server(venue_host).start()
    try:
        x = {"features": features(demo_models)}
        venue = remote("cloud", server.url, price=0.0004, models={XL: Offer(XL, 0.95)})
        policy = PolicyManifest.model_validate(
            {"kind": "policy", "name": "p", "version": "1",
             "venues": [{"privacy": "public", "venue": "cloud"}]}
        )  # fmt: skip
        router = make_router(venue, cloud_rule=policy.venue_for)
        routed = router.route("a", XL, x, Needs("public"))
        assert routed.venue == "cloud"
        assert routed.cost == 0.0004
        assert any("does not serve" in r["why"] for r in routed.record["alternatives"])
        # restricted data: the policy has no rule for it, so it stays on the edge.
        with pytest.raises(RoutingError, match="fleet policy keeps restricted data on the edge"):
            router.route("a", XL, x, Needs("restricted"))
        # A node that never received a policy runs with the safe defaults: no cloud.
        router.cloud_rule = SAFE_DEFAULTS.venue_for
        with pytest.raises(RoutingError, match="fleet policy keeps public data on the edge"):
            router.route("a", XL, x, Needs("public"))
        assert server.requests == 1
    finally:
        server.stop()


def test_the_cheapest_venue_meeting_the_slo_wins_and_a_slow_one_loses(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    venue_host.load(XL)  # warm: a cold start would be measured as the venue's latency
    slow = V2Server(venue_host, delay_s=0.4).start()
    fast = V2Server(venue_host).start()
    try:
        offers = {XL: Offer(XL, 0.95)}
        router = make_router(
            remote("cheap", slow.url, price=0.0001, models=offers),
            remote("quick", fast.url, price=0.0003, models=offers),
        )
        x = {"features": features(demo_models)}
        needs = Needs("internal", slo_ms=250)
        # Not measured yet, the cheap venue gets its chance, and is measured slow.
        first = router.route("a", XL, x, needs)
        assert first.venue == "cheap"
        assert first.latency_ms >= 400
        later = [router.route("a", XL, x, needs) for _ in range(5)]
        assert {r.venue for r in later} == {"quick"}
        cheap = next(a for a in later[-1].record["alternatives"] if a["venue"] == "cheap")
        assert cheap["expected_ms"] > 250
        assert cheap["cost"] == 0.0001
        assert "within the 250 ms SLO" in later[-1].record["reasons"][0]
        assert router.monitor.state("cheap").p95_ms > 400  # type: ignore[operator]
        # Without an SLO the cheaper venue is right again, however slow.
        assert router.route("a", XL, x, Needs("internal")).venue == "cheap"
        # A quality floor neither remote venue meets on the small model: the edge does.
        assert router.route("a", SMALL, x, Needs("internal")).venue == "edge"
    finally:
        slow.stop()
        fast.stop()


def test_a_lost_link_is_seen_within_seconds_and_recovery_noticed(
    tmp_path: Path, edge: ModelHost, demo_models: DemoModels, make_router: Callable[..., Router]
) -> None:
    # The venue is another real node process on loopback, really stopped and restarted.
    data_dir = tmp_path / "other-node"
    with Database(data_dir / "node.db") as db:
        ModelRegistry(db, data_dir / "models").add(
            demo_models.models[SMALL], name=SMALL, manifest=demo_models.manifests[SMALL]
        )
    other = node_process(data_dir).start()
    port = int(other.url.rsplit(":", 1)[1])
    offers = {SMALL: Offer(SMALL, 0.9)}
    venue = remote("lab", other.url, price=0.0, models=offers, api_key=other.token, timeout_s=1.0)
    router = make_router(venue, interval=0.2)
    router.start()
    x = {"features": features(demo_models)}
    try:
        assert router.route("a", SMALL, x, Needs("internal")).venue in ("lab", "edge")
        other.stop()
        lost = time.monotonic()
        while router.monitor.state("lab").online:
            assert time.monotonic() - lost < 3, "the lost link was not noticed"
            time.sleep(0.05)
        offline = router.route("a", SMALL, x, Needs("internal"))
        assert offline.venue == "edge"
        assert "offline" in next(a["why"] for a in offline.record["alternatives"])
        other = node_process(data_dir, port=port).start()
        back = time.monotonic()
        while not router.monitor.state("lab").online:
            assert time.monotonic() - back < 3, "the recovery was not noticed"
            time.sleep(0.05)
        assert router.monitor.state("lab").rtt_ms is not None
    finally:
        router.close()
        other.stop()


def test_a_venue_that_drops_mid_call_fails_over_without_losing_the_call(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    server = V2Server(venue_host).start()
    venue = remote("lab", server.url, price=0.0, models={SMALL: Offer(SMALL, 0.9)})
    router = make_router(venue)  # not probing: only the failed call can tell
    x = {"features": features(demo_models)}
    needs = Needs("internal", min_quality=0.85)  # the edge declares no quality: lab is better
    assert router.route("a", SMALL, x, needs).venue == "lab"
    venue.close()  # its kept connection first: a server stopping under it leaks the socket
    server.stop()
    routed = router.route("a", SMALL, x, needs)
    assert routed.venue == "edge"
    assert "lab did not answer" in routed.record["reasons"][0]
    expected = edge.infer(SMALL, x).outputs
    np.testing.assert_allclose(routed.outputs["probabilities"], expected["probabilities"])


def test_cost_and_saving_reach_metrics(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    server = V2Server(venue_host).start()
    try:
        metrics = MetricsRegistry()
        venue = remote("cloud", server.url, price=0.001, models={SMALL: Offer(SMALL, 0.95)})
        router = make_router(venue, metrics=metrics)
        x = {"features": features(demo_models)}
        for _ in range(3):
            router.route("shop", SMALL, x, Needs("internal"))  # edge: free
        router.route("shop", SMALL, x, Needs("internal", min_quality=0.9))  # cloud
        page = metrics.render()
        assert 'edgeos_routing_calls_total{agent="shop",venue="edge"} 3' in page
        assert 'edgeos_routing_cost_total{agent="shop",venue="cloud"} 0.001' in page
        assert 'edgeos_routing_saving{agent="shop"} 0.003000' in page
        assert 'edgeos_venue_up{venue="cloud"} 1' in page
    finally:
        server.stop()


def test_bad_venue_configuration_is_refused_naming_file_and_field(
    tmp_path: Path, edge: ModelHost
) -> None:
    path = tmp_path / "venues.yaml"
    path.write_text(
        "probe_interval: soon\n"
        "venues:\n"
        "  lab: {type: v2, url: 'ftp://x', models: {m: {}}}\n"
        "  cloud: {type: v2, price_per_call: -1, models: {m: {quality: 2}}}\n"
        "  edge: {type: local, url: 'http://x'}\n"
        "  other: {type: nope}\n"
        "  'bad name': {type: local}\n"
    )
    with pytest.raises(ManifestError) as caught:
        load_venues(path)
    text = str(caught.value)
    assert str(path) in text
    for field in ("probe_interval", "venues.lab.url", "venues.cloud.price_per_call",
                  "venues.cloud.models.m.quality", "venues.edge", "venues.other.type"):  # fmt: skip
        assert f"field '{field}" in text, field
    path.write_text("venues:\n  lab: {type: v2, url: 'http://127.0.0.1:9', unknown: 1}\n")
    with pytest.raises(ManifestError, match=r"field 'venues.lab.unknown': unknown field"):
        load_venues(path)
    path.write_text("venues:\n  'bad name': {type: local}\n")
    with pytest.raises(ManifestError, match="venue name 'bad name'"):
        load_venues(path)
    # A fleet venue on a node that follows no fleet: refused when the router is built.
    path.write_text("venues:\n  cloud: {type: fleet, models: {m: {}}}\n")
    with pytest.raises(ConfigError, match=r"venues\.yaml: field 'venues.cloud.type'"):
        build_router(edge, load_venues(path), source=str(path))


def test_unknown_privacy_class_and_bad_needs_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown privacy class 'secret'"):
        Needs("secret")
    with pytest.raises(ConfigError, match="min_quality is between 0 and 1"):
        Needs(min_quality=3)


def test_a_fleet_venue_before_enrollment_is_offline_not_an_error(tmp_path: Path) -> None:
    missing = ClientCertificate(tmp_path / "ca.crt", tmp_path / "device.crt", tmp_path / "k")
    venue = V2Venue(
        VenueInfo("cloud", on_device=False, models={SMALL: Offer(XL)}),
        "https://127.0.0.1:9/api/v1/cloud",
        certificate=missing,
    )
    with pytest.raises(UnavailableError, match=r"venue cloud: .*ca\.crt"):
        venue.probe()
    venue.close()


#: How long the slow venue holds every inference request: far past the SLO below.
DELAY_S = 0.6
SLO_MS = 150.0
PRICE = 0.001


def unsure_row(edge: ModelHost, demo: DemoModels) -> dict[str, np.ndarray]:
    """An evaluation row the edge model is less than 90% sure of, where the xl model's
    answer differs from the edge's (so an answer used is told apart)."""
    with np.load(demo.eval_set) as data:
        rows = np.asarray(data["features"][:400], dtype=np.float32)
    for row in rows:
        x = {"features": row[None]}
        if float(edge.infer(SMALL, x).outputs["probabilities"].max()) < 0.9:
            return x
    raise AssertionError("no row the edge model is unsure of")


def test_an_escalation_gets_only_the_slo_left_and_its_late_answer_is_dropped(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    venue_host.load(XL)
    server = V2Server(venue_host, delay_s=DELAY_S).start()
    metrics = MetricsRegistry()
    cloud = remote("cloud", server.url, price=PRICE, models={SMALL: Offer(XL, 0.95)})
    router = make_router(cloud, metrics=metrics)
    try:
        x = unsure_row(edge, demo_models)
        on_edge = edge.infer(SMALL, x).outputs["probabilities"]
        on_cloud = venue_host.infer(XL, x).outputs["probabilities"]
        assert not np.allclose(on_edge, on_cloud)
        cloud.input_datatypes(XL)  # warm: the first call's metadata read is not the point

        started = time.perf_counter()
        bounded = router.route("shop", SMALL, x, Needs("internal", slo_ms=SLO_MS, cascade=0.9))
        took = time.perf_counter() - started
        # It waited for the cloud most of the SLO, and not for the cloud's answer.
        assert SLO_MS / 1000 * 0.8 < took < DELAY_S / 2, f"returned after {took:.3f} s"
        assert bounded.venue == "edge"
        np.testing.assert_array_equal(bounded.outputs["probabilities"], on_edge)
        record = bounded.record
        assert "escalated_to" not in record
        assert record["escalation_late"] == "cloud"
        assert record["cost"] == PRICE  # the request went out: it is paid
        assert record["latency_ms"] <= took * 1000
        assert "ran out" in record["reasons"][-1]
        assert "the edge answer stands" in record["reasons"][-1]
        page = metrics.render()
        assert 'edgeos_routing_escalations_late_total{agent="shop",venue="cloud"} 1' in page
        assert 'edgeos_routing_calls_total{agent="shop",venue="edge"} 1' in page

        # The late answer arrives on its own thread: it measures the venue, nothing more.
        deadline = time.monotonic() + 5
        while router.monitor.state("cloud").calls < 1:
            assert time.monotonic() < deadline, "the abandoned call never came back"
            time.sleep(0.02)
        assert server.requests == 1  # the escalation did go out
        assert router.monitor.state("cloud").p95_ms >= DELAY_S * 1000  # type: ignore[operator]
        np.testing.assert_array_equal(bounded.outputs["probabilities"], on_edge)
        # Now measured slow, the venue is not escalated to within the SLO at all.
        again = router.route("shop", SMALL, x, Needs("internal", slo_ms=SLO_MS, cascade=0.9))
        assert again.venue == "edge"
        assert "escalation_late" not in again.record
        assert "no venue off the device is expected within the 150 ms SLO" in " ".join(
            again.record["reasons"]
        )
        assert server.requests == 1

        # Without an SLO the escalation is waited for, and its answer used.
        started = time.perf_counter()
        patient = router.route("shop", SMALL, x, Needs("internal", cascade=0.9))
        assert time.perf_counter() - started >= DELAY_S
        assert patient.record["escalated_to"] == "cloud"
        assert "escalation_late" not in patient.record
        np.testing.assert_allclose(patient.outputs["probabilities"], on_cloud, rtol=1e-6)
        assert server.requests == 2
    finally:
        server.stop()


def test_no_time_left_in_the_slo_means_no_escalation_sent(
    edge: ModelHost,
    venue_host: ModelHost,
    demo_models: DemoModels,
    make_router: Callable[..., Router],
) -> None:
    server = V2Server(venue_host).start()
    router = make_router(remote("cloud", server.url, price=PRICE, models={SMALL: Offer(XL)}))
    try:
        x = unsure_row(edge, demo_models)
        # A 0 ms SLO is used up by the edge call itself: the cloud is never asked.
        routed = router.route("shop", SMALL, x, Needs("internal", slo_ms=0, cascade=0.9))
        assert routed.venue == "edge"
        assert routed.record["escalation_late"] == "cloud"
        assert routed.record["cost"] == 0.0
        assert "no time was left in the 0 ms SLO" in routed.record["reasons"][-1]
        # A call that queued before routing has less left: here, none of its 150 ms.
        queued = router.route(
            "shop", SMALL, x, Needs("internal", slo_ms=SLO_MS, cascade=0.9),
            arrived=time.perf_counter() - SLO_MS / 1000,
        )  # fmt: skip
        assert "no time was left in the 150 ms SLO" in queued.record["reasons"][-1]
        assert server.requests == 0
    finally:
        server.stop()

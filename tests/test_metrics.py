"""Metrics in the Prometheus text format (0.0.4), and latency summaries.

prometheus_client is not a dependency, so the exposition is read back with the small
parser below, written from the format's specification rather than from our renderer.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from edgeos.telemetry.metrics import Counter, Histogram, HistogramChild, MetricsRegistry
from edgeos.telemetry.stats import LatencySummary, time_calls

# -- an independent reader of the text format -----------------------------------------
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
SAMPLE = re.compile(rf"^(?P<name>{NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>\S+)$")
LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>(?:[^"\\\n]|\\.)*)"(?:,|$)')
UNESCAPE = {"\\": "\\", '"': '"', "n": "\n"}


@dataclass
class Family:
    help: str | None = None
    type: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Families by name; fails on any line the text format does not allow."""
    assert text.endswith("\n")
    families: dict[str, Family] = {}
    current = ""
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, name, rest = line.split(" ", 3)
            family = families.setdefault(name, Family())
            if keyword == "HELP":
                assert family.help is None, f"second HELP for {name}"
                family.help = re.sub(r"\\(.)", lambda m: UNESCAPE[m.group(1)], rest)
            else:
                assert family.type is None, f"second TYPE for {name}"
                assert not family.samples, f"TYPE after samples for {name}"
                family.type = rest
            current = name
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        labels: dict[str, str] = {}
        text_labels = match["labels"] or ""
        consumed = 0
        for label in LABEL.finditer(text_labels):
            assert label.start() == consumed, f"bad label syntax in {line!r}"
            value = re.sub(r"\\(.)", lambda m: UNESCAPE[m.group(1)], label["value"])
            labels[label["key"]] = value
            consumed = label.end()
        assert consumed == len(text_labels), f"bad label syntax in {line!r}"
        name = match["name"]
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
        assert base == current, f"sample {name} outside its family {current}"
        families[base].samples.append((name, labels, float(match["value"])))
    return families


def series(family: Family, name: str, **labels: str) -> float:
    found = [v for n, ls, v in family.samples if n == name and ls == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


# -- counters --------------------------------------------------------------------------
def test_counter_exposition() -> None:
    registry = MetricsRegistry()
    requests = registry.counter("edgeos_requests_total", "Inference requests.", ["model", "code"])
    requests.inc("risk", "200")
    requests.inc("risk", "200", amount=2.5)
    requests.inc("risk", "400")
    requests.inc("churn", "200", amount=7)
    family = parse(registry.render())["edgeos_requests_total"]
    assert (family.help, family.type) == ("Inference requests.", "counter")
    assert series(family, "edgeos_requests_total", model="risk", code="200") == 3.5
    assert series(family, "edgeos_requests_total", model="risk", code="400") == 1
    assert series(family, "edgeos_requests_total", model="churn", code="200") == 7
    assert len(family.samples) == 3
    assert requests.value("risk", "200") == 3.5
    assert requests.value("never", "seen") == 0


def test_counter_without_labels() -> None:
    registry = MetricsRegistry()
    registry.counter("edgeos_restarts_total", "Restarts.").inc()
    text = registry.render()
    assert "edgeos_restarts_total 1\n" in text
    assert series(parse(text)["edgeos_restarts_total"], "edgeos_restarts_total") == 1


def test_family_without_samples_has_help_and_type_only() -> None:
    registry = MetricsRegistry()
    registry.counter("edgeos_a_total", "A.", ["x"])
    registry.histogram("edgeos_b_seconds", "B.", ["x"])
    families = parse(registry.render())
    assert {n: (f.type, f.samples) for n, f in families.items()} == {
        "edgeos_a_total": ("counter", []),
        "edgeos_b_seconds": ("histogram", []),
    }


@pytest.mark.parametrize(
    "value",
    ['back\\slash', 'say "hi"', "two\nlines", '\\"\n', "", "unicode ✓", "a,b=c}"],
    ids=["backslash", "quote", "newline", "all-three", "empty", "unicode", "syntax-chars"],
)  # fmt: skip
def test_label_values_are_escaped(value: str) -> None:
    registry = MetricsRegistry()
    registry.counter("edgeos_odd_total", "Odd labels.", ["path"]).inc(value)
    text = registry.render()
    assert text.count("\n") == 3  # HELP, TYPE, one sample: no raw newline leaked
    family = parse(text)["edgeos_odd_total"]
    assert series(family, "edgeos_odd_total", path=value) == 1


def test_help_text_is_escaped() -> None:
    registry = MetricsRegistry()
    registry.counter("edgeos_x_total", "First line\nsecond, with C:\\path", ["a"]).inc("1")
    family = parse(registry.render())["edgeos_x_total"]
    assert family.help == "First line\nsecond, with C:\\path"


def test_counter_refuses_to_go_down() -> None:
    counter = Counter("edgeos_x_total", "X.")
    with pytest.raises(ValueError, match=r"negative"):
        counter.inc(amount=-1)


@pytest.mark.parametrize("labels", [(), ("a", "b", "c")], ids=["too-few", "too-many"])
def test_wrong_number_of_label_values_is_refused(labels: tuple[str, ...]) -> None:
    counter = Counter("edgeos_c_total", "C.", ["model", "code"])
    histogram = Histogram("edgeos_h_seconds", "H.", ["model", "code"])
    with pytest.raises(ValueError, match="edgeos_c_total"):
        counter.inc(*labels)
    with pytest.raises(ValueError, match="edgeos_c_total"):
        counter.value(*labels)
    with pytest.raises(ValueError, match="edgeos_h_seconds"):
        histogram.observe(0.1, *labels)
    with pytest.raises(ValueError, match="edgeos_h_seconds"):
        histogram.count(*labels)
    assert "edgeos_c_total{" not in "\n".join(counter.render())  # nothing was recorded


# -- histograms ------------------------------------------------------------------------
def check_histogram(family: Family, name: str, values: list[float], **labels: str) -> None:
    """Cumulative buckets, +Inf last and equal to _count, _sum exact; per the format."""
    buckets = [
        (ls["le"], v)
        for n, ls, v in family.samples
        if n == f"{name}_bucket" and {k: x for k, x in ls.items() if k != "le"} == labels
    ]
    assert buckets[-1][0] == "+Inf"
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds)
    assert len(set(bounds)) == len(bounds)
    for bound, count in zip(bounds, (c for _, c in buckets), strict=True):
        assert count == sum(1 for v in values if v <= bound), f"le={bound}"
    assert series(family, f"{name}_count", **labels) == len(values) == buckets[-1][1]
    assert series(family, f"{name}_sum", **labels) == pytest.approx(math.fsum(values))


def test_histogram_exposition_with_boundary_values() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram(
        "edgeos_latency_seconds", "Latency.", ["model"], buckets=[1.0, 0.1, 0.5]
    )
    values = [0.05, 0.1, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0]  # 0.1, 0.5 and 1.0 sit on bounds
    for v in values:
        latency.observe(v, "risk")
    latency.observe(0.2, "churn")
    family = parse(registry.render())["edgeos_latency_seconds"]
    assert family.type == "histogram"
    check_histogram(family, "edgeos_latency_seconds", values, model="risk")
    check_histogram(family, "edgeos_latency_seconds", [0.2], model="churn")
    assert latency.count("risk") == len(values)
    assert latency.count("unseen") == 0


def test_histogram_default_buckets_on_random_latencies() -> None:
    rng = np.random.default_rng(7)
    values = [float(v) for v in rng.lognormal(mean=-6, sigma=2.5, size=2000)]
    values += [1e-7, 0.00005, 10.0, 12.5, 300.0]  # below the first, on bounds, past the last
    registry = MetricsRegistry()
    histogram = registry.histogram("edgeos_run_seconds", "Run time.")
    for v in values:
        histogram.observe(v)
    family = parse(registry.render())["edgeos_run_seconds"]
    check_histogram(family, "edgeos_run_seconds", values)


# -- the registry ----------------------------------------------------------------------
def test_registering_the_same_family_twice_returns_it() -> None:
    registry = MetricsRegistry()
    first = registry.counter("edgeos_x_total", "X.", ["model"])
    first.inc("a")
    again = registry.counter("edgeos_x_total", "X.", ["model"])
    assert again is first
    assert again.value("a") == 1
    hist = registry.histogram("edgeos_y_seconds", "Y.")
    assert registry.histogram("edgeos_y_seconds", "Y.") is hist


@pytest.mark.parametrize(
    "register",
    [
        pytest.param(lambda r: r.histogram("edgeos_x_total", "X.", ["model"]), id="other-kind"),
        pytest.param(lambda r: r.counter("edgeos_x_total", "X.", ["code"]), id="other-labels"),
        pytest.param(lambda r: r.counter("edgeos_x_total", "X."), id="no-labels"),
    ],
)
def test_registering_a_name_differently_is_refused(register: object) -> None:
    registry = MetricsRegistry()
    original = registry.counter("edgeos_x_total", "X.", ["model"])
    original.inc("a")
    with pytest.raises(ValueError, match="edgeos_x_total"):
        register(registry)  # type: ignore[operator]
    family = parse(registry.render())["edgeos_x_total"]
    assert family.type == "counter"
    assert series(family, "edgeos_x_total", model="a") == 1


def test_registering_a_histogram_with_other_buckets_is_refused() -> None:
    registry = MetricsRegistry()
    registry.histogram("edgeos_y_seconds", "Y.", buckets=[0.1, 1.0])
    with pytest.raises(ValueError, match="edgeos_y_seconds"):
        registry.histogram("edgeos_y_seconds", "Y.", buckets=[5.0, 50.0])


def test_families_render_in_registration_order() -> None:
    registry = MetricsRegistry()
    for name in ("edgeos_b_total", "edgeos_a_total", "edgeos_c_total"):
        registry.counter(name, "N.")
    assert list(parse(registry.render())) == ["edgeos_b_total", "edgeos_a_total", "edgeos_c_total"]


def test_counter_child_is_the_same_series() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("edgeos_req_total", "Requests.", ["model"])
    child = counter.child("risk")
    family = parse(registry.render())["edgeos_req_total"]
    assert series(family, "edgeos_req_total", model="risk") == 0  # exported from the start
    child.inc()
    child.inc(2.5)
    counter.inc("risk")
    assert counter.value("risk") == 4.5
    family = parse(registry.render())["edgeos_req_total"]
    assert series(family, "edgeos_req_total", model="risk") == 4.5
    with pytest.raises(ValueError, match="edgeos_req_total"):
        counter.child("risk", "extra")


def test_histogram_child_is_counted_before_and_after_its_buffer_folds() -> None:
    registry = MetricsRegistry()
    histogram = registry.histogram("edgeos_t_seconds", "T.", ["model"], buckets=[0.01, 0.1])
    child = histogram.child("risk")
    rng = np.random.default_rng(11)
    values = [float(v) for v in rng.exponential(0.05, size=2 * HistogramChild.FOLD_AT + 7)]
    for i, value in enumerate(values[:5]):
        child.observe(value)
        assert histogram.count("risk") == i + 1  # a read sees unfolded observations
    for value in values[5:]:
        child.observe(value)
    histogram.observe(0.5, "risk")  # the family's observe joins the same series
    values.append(0.5)
    assert histogram.child("risk") is child
    family = parse(registry.render())["edgeos_t_seconds"]
    check_histogram(family, "edgeos_t_seconds", values, model="risk")
    assert histogram.counts() == {("risk",): len(values)}


def test_histogram_count_exposes_observations_as_a_counter() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("edgeos_latency_seconds", "Latency.", ["model"])
    requests = registry.histogram_count("edgeos_requests_total", "Requests.", latency)
    assert registry.histogram_count("edgeos_requests_total", "Requests.", latency) is requests
    for _ in range(3):
        latency.observe(0.01, "risk")
    latency.child("churn").observe(0.02)
    families = parse(registry.render())
    counter = families["edgeos_requests_total"]
    assert counter.type == "counter"
    assert series(counter, "edgeos_requests_total", model="risk") == 3
    assert series(counter, "edgeos_requests_total", model="churn") == 1
    hist = families["edgeos_latency_seconds"]
    for model in ("risk", "churn"):
        assert series(counter, "edgeos_requests_total", model=model) == series(
            hist, "edgeos_latency_seconds_count", model=model
        )
    assert requests.value("risk") == 3
    assert requests.value("nobody") == 0


class Yielding(float):
    """A float whose arithmetic and comparisons run Python code.

    Every operation on it is a point where the interpreter may switch threads, so an
    unlocked read-modify-write loses updates instead of being saved by the GIL.
    """

    def __radd__(self, other: object) -> float:
        return float(other) + float(self)  # type: ignore[arg-type]

    def __gt__(self, other: object) -> bool:
        return float(self) > other  # type: ignore[operator]

    def __lt__(self, other: object) -> bool:
        return float(self) < other  # type: ignore[operator]


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Switch threads very often, so races show up within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


THREADS, ROUNDS = 8, 5000
TOTAL = THREADS * ROUNDS


def hammer(work: Callable[[int], None], registry: MetricsRegistry, renderers: int = 0) -> list[str]:
    """Run ``work(thread_index)`` ROUNDS times on THREADS threads while others render."""
    start = threading.Barrier(THREADS + renderers)
    done = threading.Event()
    pages: list[str] = []

    def worker(index: int) -> None:
        start.wait()
        for _ in range(ROUNDS):
            work(index)

    def render() -> None:
        start.wait()
        while not done.is_set():
            pages.append(registry.render())

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    readers = [threading.Thread(target=render) for _ in range(renderers)]
    for thread in [*workers, *readers]:
        thread.start()
    for thread in workers:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert len(pages) >= renderers
    return pages


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_counter_increments_are_all_counted() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("edgeos_hits_total", "Hits.", ["shard"])
    hammer(lambda _: counter.inc("a", amount=Yielding(1.0)), registry)
    assert counter.value("a") == TOTAL


@pytest.mark.usefixtures("busy_switching")
def test_concurrent_counter_child_increments_are_all_counted() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("edgeos_hits_total", "Hits.", ["shard"])
    child = counter.child("a")
    hammer(lambda _: child.inc(Yielding(1.0)), registry)
    assert counter.value("a") == TOTAL


@pytest.mark.parametrize("via", ["observe", "child"])
@pytest.mark.usefixtures("busy_switching")
def test_concurrent_observations_are_all_counted(via: str) -> None:
    registry = MetricsRegistry()
    histogram = registry.histogram("edgeos_t_seconds", "T.", ["path"], buckets=[0.5])
    child = histogram.child("child")

    def work(index: int) -> None:
        value = Yielding(0.25 if index % 2 else 1.0)
        if via == "observe":
            histogram.observe(value, "observe")
        else:
            child.observe(value)

    pages = hammer(work, registry, renderers=2)
    family = parse(registry.render())["edgeos_t_seconds"]
    assert series(family, "edgeos_t_seconds_bucket", path=via, le="0.5") == TOTAL / 2
    assert series(family, "edgeos_t_seconds_count", path=via) == TOTAL
    assert series(family, "edgeos_t_seconds_sum", path=via) == TOTAL / 2 * (0.25 + 1.0)
    for page in pages:  # every page rendered meanwhile was well-formed and consistent
        samples = parse(page)["edgeos_t_seconds"]
        for _, labels, value in samples.samples:
            if labels.get("le") == "+Inf":
                assert value == series(samples, "edgeos_t_seconds_count", path=labels["path"])


# -- latency summaries -----------------------------------------------------------------
def test_summary_of_a_known_sample() -> None:
    summary = LatencySummary.of([0.004, 0.001, 0.003, 0.002])
    assert summary.count == 4
    assert summary.mean_ms == pytest.approx(2.5)
    assert summary.p50_ms == pytest.approx(2.5)
    assert summary.max_ms == pytest.approx(4.0)
    assert summary.p50_ms <= summary.p95_ms <= summary.p99_ms <= summary.max_ms


def test_summary_matches_independent_percentiles() -> None:
    """numpy's default percentiles are the 'inclusive' method of the statistics module."""
    rng = np.random.default_rng(3)
    seconds = [float(v) for v in rng.gamma(2.0, 0.004, size=997)]
    ms = [s * 1000 for s in seconds]
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    summary = LatencySummary.of(seconds)
    assert summary.count == 997
    assert summary.mean_ms == pytest.approx(statistics.fmean(ms))
    assert summary.p50_ms == pytest.approx(statistics.median(ms))
    assert summary.p95_ms == pytest.approx(cuts[94])
    assert summary.p99_ms == pytest.approx(cuts[98])
    assert summary.max_ms == pytest.approx(max(ms))
    np.testing.assert_allclose(
        [summary.p50_ms, summary.p95_ms, summary.p99_ms], np.percentile(ms, [50, 95, 99])
    )


def test_summary_of_one_sample() -> None:
    summary = LatencySummary.of([0.0125])
    values = (summary.mean_ms, summary.p50_ms, summary.p95_ms, summary.p99_ms, summary.max_ms)
    assert values == pytest.approx((12.5,) * 5)


def test_summary_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="no latencies"):
        LatencySummary.of([])


def test_time_calls_warms_up_then_times_each_iteration() -> None:
    calls: list[float] = []

    def fn() -> None:
        calls.append(time.perf_counter())
        if len(calls) <= 2:
            time.sleep(0.03)  # slow first calls: warm-up must absorb them

    samples = time_calls(fn, iterations=7, warmup=2)
    assert len(calls) == 9
    assert len(samples) == 7
    assert all(0 <= s < 0.03 for s in samples)


def test_time_calls_measures_the_call() -> None:
    samples = time_calls(lambda: time.sleep(0.005), iterations=3, warmup=0)
    assert len(samples) == 3
    assert all(0.005 <= s < 0.5 for s in samples)


def test_time_calls_stops_at_max_seconds_with_a_few_samples() -> None:
    assert len(time_calls(lambda: None, iterations=1000, warmup=0, max_seconds=0)) == 5

    started = time.perf_counter()
    samples = time_calls(lambda: time.sleep(0.01), iterations=1000, warmup=0, max_seconds=0.05)
    elapsed = time.perf_counter() - started
    assert 5 <= len(samples) < 1000
    assert elapsed < 1.0


def test_time_calls_without_limit_runs_every_iteration() -> None:
    assert len(time_calls(lambda: None, iterations=250, warmup=0, max_seconds=None)) == 250
    assert len(time_calls(lambda: None, iterations=3, warmup=0, max_seconds=0)) == 3

"""The request path's lock-free metric families expose what prometheus_client's own would."""

from __future__ import annotations

import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.metrics import _TOKENS, _Family

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def _exposed(registry: CollectorRegistry) -> list[str]:
    """The exposition lines, without prometheus_client's ``_created`` series."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


labels = st.sampled_from(["team-a", "team-b", "other"])
amounts = st.floats(min_value=0, max_value=2e6, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(labels, amounts), max_size=40),
    st.sampled_from([_LATENCY, _TOKENS]),
)
def test_histogram_matches_prometheus_client(
    observations: list[tuple[str, float]], buckets: tuple[float, ...]
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    family = _Family("histogram", "x_seconds", "Doc.", ["tenant"], buckets)
    ours.register(family)
    reference = Histogram("x_seconds", "Doc.", ["tenant"], buckets=buckets, registry=theirs)
    for tenant, value in observations:
        family.labels(tenant).observe(value)
        reference.labels(tenant).observe(value)
    # Bounds are met exactly too: a value equal to a bound counts in that bucket.
    for bound in buckets:
        family.labels("edge").observe(bound)
        reference.labels("edge").observe(bound)
    assert sorted(_exposed(ours)) == sorted(_exposed(theirs))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(labels, amounts), max_size=40))
def test_counter_and_gauge_match_prometheus_client(incs: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    counter = _Family("counter", "y_total", "Doc.", ["tenant"])
    gauge = _Family("gauge", "z", "Doc.")
    ours.register(counter)
    ours.register(gauge)
    ref_counter = Counter("y_total", "Doc.", ["tenant"], registry=theirs)
    ref_gauge = Gauge("z", "Doc.", registry=theirs)
    for tenant, amount in incs:
        counter.labels(tenant).inc(amount)
        ref_counter.labels(tenant).inc(amount)
        gauge.inc()
        ref_gauge.inc()
    gauge.dec()
    ref_gauge.dec()
    assert sorted(_exposed(ours)) == sorted(_exposed(theirs))


def test_wrong_label_count_and_duplicate_names_are_refused() -> None:
    family = _Family("counter", "y_total", "Doc.", ["tenant", "model"])
    with pytest.raises(ValueError, match="takes labels"):
        family.labels("only-one")
    registry = CollectorRegistry()
    registry.register(family)
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("y_total", "Doc.", registry=registry)


def test_a_scrape_on_another_thread_while_label_sets_are_added() -> None:
    """``metrics.port`` scrapes from its own thread while the event loop adds children."""
    registry = CollectorRegistry()
    family = _Family("histogram", "w_seconds", "Doc.", ["tenant"], _LATENCY, registry=registry)
    failures: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                generate_latest(registry)
            except BaseException as exc:  # pragma: no cover - what the test looks for
                failures.append(exc)
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over as often as possible
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for i in range(20_000):
            family.labels(f"t{i}").observe(0.1)
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(old)
    assert failures == []
    assert 'w_seconds_count{tenant="t19999"} 1.0' in generate_latest(registry).decode()

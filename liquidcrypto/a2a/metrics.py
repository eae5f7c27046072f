"""Prometheus metrics of the A2A bus (default registry, ``liquidcrypto_a2a_`` prefix)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, Metric

# The two per-message counts are plain ints read at scrape time: a labelled
# prometheus_client Counter costs ~1 us per increment on the core delivery path.
PUBLISHED_COUNTS: dict[str, int] = {}
RECEIVED_COUNTS: dict[str, int] = {"core": 0, "durable": 0}


class _HotCounters:
    """Exposes ``PUBLISHED_COUNTS``/``RECEIVED_COUNTS`` as Prometheus counters."""

    def collect(self) -> Iterator[Metric]:
        published = CounterMetricFamily(
            "liquidcrypto_a2a_published", "Envelopes published by the A2A bus", labels=["kind"]
        )
        for kind, value in sorted(PUBLISHED_COUNTS.items()):
            published.add_metric([kind], value)
        yield published
        received = CounterMetricFamily(
            "liquidcrypto_a2a_received", "Envelopes handed to A2A handlers (handled without error)", labels=["mode"]
        )
        for mode, value in sorted(RECEIVED_COUNTS.items()):
            received.add_metric([mode], value)
        yield received


REGISTRY.register(_HotCounters())
PUBLISH_FAILURES = Counter(
    "liquidcrypto_a2a_publish_failures_total",
    "A2A publishes that JetStream did not acknowledge (raised, or logged for async acks)",
)
HANDLER_ERRORS = Counter("liquidcrypto_a2a_handler_errors_total", "A2A handler calls that raised", ["mode"])
SKIPPED = Counter(
    "liquidcrypto_a2a_skipped_total",
    "A2A messages skipped (core) or terminated (durable) because they are not valid envelopes",
    ["mode"],
)
REDELIVERIES = Counter("liquidcrypto_a2a_redeliveries_total", "Durable A2A messages delivered more than once")
ALREADY_HANDLED = Counter(
    "liquidcrypto_a2a_already_handled_total",
    "Durable A2A messages delivered again after they were handled: acknowledged without running the handler",
)
GAVE_UP = Counter("liquidcrypto_a2a_gave_up_total", "Durable A2A messages terminated after max_deliver failed attempts")
HANDLER_SECONDS = Histogram("liquidcrypto_a2a_durable_handler_seconds", "Time in a durable A2A handler per message")
REPLIES_REFUSED = Counter(
    "liquidcrypto_a2a_replies_refused_total",
    "Replies not published because the task's reply_to is not a literal subject under the inbox prefix",
    ["reason"],
)

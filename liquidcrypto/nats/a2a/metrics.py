"""Prometheus metrics of the A2A bus (default registry, ``liquidcrypto_a2a_`` prefix)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

PUBLISHED = Counter(
    "liquidcrypto_a2a_published_total", "Envelopes published by the A2A bus", ["kind"]
)
PUBLISH_FAILURES = Counter(
    "liquidcrypto_a2a_publish_failures_total",
    "A2A publishes that JetStream did not acknowledge (raised, or logged for async acks)",
)
RECEIVED = Counter(
    "liquidcrypto_a2a_received_total", "Envelopes handed to A2A handlers", ["mode"]
)
HANDLER_ERRORS = Counter(
    "liquidcrypto_a2a_handler_errors_total", "A2A handler calls that raised", ["mode"]
)
SKIPPED = Counter(
    "liquidcrypto_a2a_skipped_total",
    "A2A messages skipped (core) or terminated (durable) because they are not valid envelopes",
    ["mode"],
)
REDELIVERIES = Counter(
    "liquidcrypto_a2a_redeliveries_total", "Durable A2A messages delivered more than once"
)
GAVE_UP = Counter(
    "liquidcrypto_a2a_gave_up_total", "Durable A2A messages terminated after max_deliver failed attempts"
)
HANDLER_SECONDS = Histogram(
    "liquidcrypto_a2a_durable_handler_seconds", "Time in a durable A2A handler per message"
)

RECEIVED_CORE = RECEIVED.labels("core")
RECEIVED_DURABLE = RECEIVED.labels("durable")

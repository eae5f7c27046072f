"""Prometheus metrics of the WebSocket distribution, one per back-pressure hop.

Hop 1, publisher -> NATS: ``publish_*``. Hop 2, NATS/Redis -> instance: ``feed_*``,
``redis_gaps``. Hop 3, instance -> each client: ``client_*``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PUBLISHED = Counter("liquidcrypto_ws_published", "Trade events published (acknowledged by the backend)", ["backend"])
PUBLISH_FAILED = Counter(
    "liquidcrypto_ws_publish_failed", "Trade events whose publication failed after retries", ["backend"]
)
PUBLISH_INFLIGHT = Gauge("liquidcrypto_ws_publish_inflight", "Trade publications waiting for their JetStream ack")
PUBLISH_WINDOW_FULL = Counter(
    "liquidcrypto_ws_publish_window_full", "Times a publisher waited because the ack window was full"
)
PUBLISH_WAIT = Histogram(
    "liquidcrypto_ws_publish_wait_seconds",
    "Time a publisher waited for room in the ack window",
    buckets=(0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
)
FEEDS = Gauge("liquidcrypto_ws_feeds", "Symbol subscriptions held on the backend by this process")
FEED_MESSAGES = Counter("liquidcrypto_ws_feed_messages", "Trade messages received from the backend")
FEED_BAD = Counter("liquidcrypto_ws_feed_bad_messages", "Backend messages skipped (not JSON)")
SLOW_CONSUMER = Gauge(
    "liquidcrypto_ws_nats_slow_consumer_events",
    "NATS slow-consumer events of the connection used by the WebSocket manager",
)
REDIS_GAPS = Counter("liquidcrypto_ws_redis_gaps", "Trades missing in Redis pub/sub delivery (sequence gaps)")
CLIENTS = Gauge("liquidcrypto_ws_clients", "Connected /ws clients")
FRAMES_SENT = Counter("liquidcrypto_ws_client_frames_sent", "Frames written to /ws clients")
CONFLATED = Counter("liquidcrypto_ws_client_conflated", "Trades replaced by a newer one of the same symbol")
DROPPED = Counter("liquidcrypto_ws_client_dropped", "Frames dropped (oldest first) from full client queues")
DUPLICATES = Counter("liquidcrypto_ws_client_duplicates", "Trades not sent again (sequence already sent)")
GAPS = Counter("liquidcrypto_ws_client_gaps", "Gap frames sent to /ws clients (lost seq ranges announced)", ["reason"])
EVERY_CLOSES = Counter(
    "liquidcrypto_ws_client_every_closes",
    'Clients closed with 1013 because a "policy": "every" subscription would have lost a trade',
)
SLOW_DISCONNECTS = Counter("liquidcrypto_ws_client_slow_disconnects", "Clients closed with 1013 for reading too slowly")
BAD_FRAMES = Counter("liquidcrypto_ws_client_bad_frames", "Client frames answered with an error")
POLICY_CLOSES = Counter("liquidcrypto_ws_client_policy_closes", "Clients closed with 1008 (abuse, auth, limits)")
HISTORY_FRAMES = Counter("liquidcrypto_ws_history_frames", "Trades replayed from the stream to clients")
REPLAYS_RUNNING = Gauge(
    "liquidcrypto_ws_replays_running", "History replays reading the stream (at most WS_MAX_REPLAYS)"
)
REPLAYS_WAITING = Gauge("liquidcrypto_ws_replays_waiting", "History replays waiting for their turn to read")
REPLAYS_REFUSED = Counter(
    "liquidcrypto_ws_replays_refused", "History replays refused (busy: queue full; pending: one already)", ["reason"]
)
HANDLER_DROPPED = Counter(
    "liquidcrypto_ws_handler_dropped", "Trades dropped for a subscribe_to_trade_events handler that lagged"
)

"""The NATS transport: the client with degraded mode, subscriptions, connect options,
subjects, JetStream resources and the embedded server.

The spec's client functions are exported here and by ``liquidcrypto``.
"""

from __future__ import annotations

from liquidcrypto.nats.client import (
    ConnectionState,
    NatsClient,
    close_nats,
    get_client,
    get_nats_health,
    init_nats,
    is_nats_connected,
    publish,
    request,
    subscribe,
)
from liquidcrypto.nats.subscription import Subscription

__all__ = [
    "ConnectionState",
    "NatsClient",
    "Subscription",
    "close_nats",
    "get_client",
    "get_nats_health",
    "init_nats",
    "is_nats_connected",
    "publish",
    "request",
    "subscribe",
]

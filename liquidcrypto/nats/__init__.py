"""The public NATS API of liquidcrypto (the spec's ``server/src/nats/index.ts``)."""

from __future__ import annotations

from liquidcrypto.nats.client import (
    ConnectionState,
    NatsClient,
    Subscription,
    close_nats,
    get_client,
    get_nats_health,
    init_nats,
    is_nats_connected,
    publish,
    request,
    subscribe,
)

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

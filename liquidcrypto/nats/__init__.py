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

# --- a2a_bus exports (issue 3) ---
# --- end a2a_bus exports ---

# --- work_queue exports (issue 4) ---
# --- end work_queue exports ---

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

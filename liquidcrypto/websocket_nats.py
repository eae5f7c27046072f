"""WebSocket distribution of trade events across instances (the spec's ``websocket-nats.ts``).

::

    manager = NatsWebSocketManager()          # or NatsWebSocketManager(client)
    await manager.init()
    await manager.publish_trade_event("BTCUSDT", {"price": 95000, "volume": 1.5})
    unsub = await manager.subscribe_to_trade_events(["BTCUSDT", "ETHUSDT"], print)
    await manager.broadcast({"notice": "maintenance at 22:00"})
    await unsub()

Browsers connect to ``GET /ws`` (see ``liquidcrypto.ws.protocol`` for the frames).
"""

from __future__ import annotations

from liquidcrypto.ws.endpoint import websocket_endpoint
from liquidcrypto.ws.manager import NatsWebSocketManager, TradeEvent
from liquidcrypto.ws.session import ClientSession, QueuePolicy

__all__ = ["ClientSession", "NatsWebSocketManager", "QueuePolicy", "TradeEvent", "websocket_endpoint"]

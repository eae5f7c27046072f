"""WebSocket distribution of trade events (re-exported by ``liquidcrypto.websocket_nats``).

- ``protocol``: the ``/ws`` frames; ``session``: one client's bounded queue and
  graded back-pressure; ``manager``: ``NatsWebSocketManager`` (feeds, fan-out, history);
  ``nats_backend`` / ``redis_backend``: the transports; ``endpoint``: the ASGI route;
  ``metrics``: Prometheus counters per hop.
"""

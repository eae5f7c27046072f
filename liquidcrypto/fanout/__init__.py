"""WebSocket distribution of trade events across instances, with back-pressure.

Modules: ``manager`` (``NatsWebSocketManager``: feeds, fan-out, history), ``protocol``
(the ``/ws`` frames), ``session`` (one client's bounded queue and graded back-pressure),
``nats_backend`` / ``redis_backend`` (the transports), ``endpoint`` (the ASGI route),
``auth``, ``metrics``. The public names are exported by ``liquidcrypto``.
"""

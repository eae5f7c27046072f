"""liquidcrypto: NATS messaging for agents, work queues and live trade distribution."""

from __future__ import annotations

__version__ = "0.1.0"

"""The A2A bus as a small package: envelope model, bus, durable consumers, task lifecycle,
agent registry. ``liquidcrypto.nats.a2a_bus`` is the public face."""

from __future__ import annotations

from liquidcrypto.nats.a2a.bus import A2ABus, absolute_pattern
from liquidcrypto.nats.a2a.durable import DurableSubscription
from liquidcrypto.nats.a2a.envelope import Envelope, Kind
from liquidcrypto.nats.a2a.lifecycle import TaskRecord, TaskState, TaskStateChange
from liquidcrypto.nats.a2a.registry import AgentCard, AgentInfo
from liquidcrypto.nats.a2a.replies import reply

__all__ = [
    "A2ABus",
    "AgentCard",
    "AgentInfo",
    "DurableSubscription",
    "Envelope",
    "Kind",
    "TaskRecord",
    "TaskState",
    "TaskStateChange",
    "absolute_pattern",
    "reply",
]

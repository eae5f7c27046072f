"""The spec's A2A functions (``a2a-bus.ts``) on the default client.

They act on the default client (``init_nats()``), through one ``A2ABus`` built lazily
for it; use ``A2ABus(client)`` directly for any other client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import datetime, timedelta
from typing import Any

from liquidcrypto.a2a.bus import A2ABus, Handler
from liquidcrypto.a2a.durable import DurableSubscription
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.a2a.lifecycle import TaskState, TaskStateChange
from liquidcrypto.a2a.registry import AgentCard, AgentInfo
from liquidcrypto.nats.client import get_client
from liquidcrypto.nats.subscription import Subscription

__all__ = [
    "close_bus",
    "get_bus",
    "list_agents",
    "publish_event",
    "publish_system_event",
    "publish_task",
    "register_agent",
    "replay",
    "request_agent",
    "subscribe_to_events",
    "subscribe_to_tasks",
    "update_task_state",
    "watch_task",
]

_bus: A2ABus | None = None


def get_bus() -> A2ABus:
    """The ``A2ABus`` of the default client (made on first use, remade after ``init_nats``).

    Raises:
        NatsUnavailableError: ``init_nats()`` has not been called.
    """
    global _bus
    client = get_client()
    if _bus is None or _bus.client is not client or _bus._closed:
        _bus = A2ABus(client)
        client.on_close(close_bus)  # close_nats() stops the default bus's heartbeats too
    return _bus


async def close_bus() -> None:
    """Close the default client's bus (heartbeats, durable loops); call before ``close_nats()``."""
    global _bus
    bus, _bus = _bus, None
    if bus is not None:
        await bus.close()


async def publish_task(agent_id: str, task_type: str, task: Any = None, **options: Any) -> int | None:
    """``A2ABus.publish_task`` on the default client."""
    return await get_bus().publish_task(agent_id, task_type, task, **options)


async def publish_event(agent_id: str, event_type: str, data: Any = None, **options: Any) -> int | None:
    """``A2ABus.publish_event`` on the default client."""
    return await get_bus().publish_event(agent_id, event_type, data, **options)


async def publish_system_event(event_type: str, data: Any = None, **options: Any) -> int | None:
    """``A2ABus.publish_system_event`` on the default client."""
    return await get_bus().publish_system_event(event_type, data, **options)


async def subscribe_to_tasks(
    pattern: str, handler: Handler, queue: str | None = None, durable: str | None = None, **options: Any
) -> Subscription | DurableSubscription:
    """``A2ABus.subscribe_to_tasks`` on the default client."""
    return await get_bus().subscribe_to_tasks(pattern, handler, queue, durable, **options)


async def subscribe_to_events(pattern: str, handler: Handler) -> Subscription:
    """``A2ABus.subscribe_to_events`` on the default client."""
    return await get_bus().subscribe_to_events(pattern, handler)


async def request_agent(agent_id: str, task_type: str, task: Any = None, timeout: float = 5.0) -> Any:
    """``A2ABus.request_agent`` on the default client."""
    return await get_bus().request_agent(agent_id, task_type, task, timeout)


def replay(
    pattern: str, since: datetime | timedelta | int | None = None, *, limit: int | None = None
) -> AsyncIterator[Envelope]:
    """``A2ABus.replay`` on the default client."""
    return get_bus().replay(pattern, since, limit=limit)


async def update_task_state(task_id: str, state: TaskState | str, **options: Any) -> TaskStateChange:
    """``A2ABus.update_task_state`` on the default client."""
    return await get_bus().update_task_state(task_id, state, **options)


def watch_task(task_id: str, since_seq: int | None = None) -> AsyncIterator[TaskStateChange]:
    """``A2ABus.watch_task`` on the default client."""
    return get_bus().watch_task(task_id, since_seq)


async def register_agent(card: AgentCard | Mapping[str, Any], **options: Any) -> AgentCard:
    """``A2ABus.register_agent`` on the default client."""
    return await get_bus().register_agent(card, **options)


async def list_agents(include_offline: bool = False) -> list[AgentInfo]:
    """``A2ABus.list_agents`` on the default client."""
    return await get_bus().list_agents(include_offline)

"""liquidcrypto: NATS messaging for agents, work queues and live trade distribution.

This module is the public API: the spec's functions (acting on one default client, as
in the spec) and the classes that own them (``NatsClient``, ``A2ABus``, ``WorkQueue``,
``NatsWebSocketManager``) for programs that need no globals. ``liquidcrypto.nats`` is the
transport underneath. Errors live in ``liquidcrypto.errors``.
"""

from __future__ import annotations

from liquidcrypto.a2a.bus import A2ABus
from liquidcrypto.a2a.default import (
    list_agents,
    publish_event,
    publish_system_event,
    publish_task,
    register_agent,
    replay,
    request_agent,
    subscribe_to_events,
    subscribe_to_tasks,
    update_task_state,
    watch_task,
)
from liquidcrypto.a2a.durable import DurableSubscription
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.a2a.lifecycle import TaskState, TaskStateChange
from liquidcrypto.a2a.registry import AgentCard, AgentInfo
from liquidcrypto.a2a.replies import reply
from liquidcrypto.fanout.handlers import TradeEvent
from liquidcrypto.fanout.manager import NatsWebSocketManager
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
from liquidcrypto.workqueue.models import DeadLetter, EnqueueReceipt, OrchestratorTask, ResultSet, TaskResult
from liquidcrypto.workqueue.queue import (
    WorkQueue,
    collect_results,
    enqueue_orchestrator_task,
    list_dead_letters,
    requeue_dead_letter,
    start_orchestrator_worker,
    subscribe_to_results,
)
from liquidcrypto.workqueue.results import ResultSubscription

__version__ = "0.1.0"

__all__ = [
    "A2ABus",
    "AgentCard",
    "AgentInfo",
    "ConnectionState",
    "DeadLetter",
    "DurableSubscription",
    "EnqueueReceipt",
    "Envelope",
    "NatsClient",
    "NatsWebSocketManager",
    "OrchestratorTask",
    "ResultSet",
    "ResultSubscription",
    "Subscription",
    "TaskResult",
    "TaskState",
    "TaskStateChange",
    "TradeEvent",
    "WorkQueue",
    "close_nats",
    "collect_results",
    "enqueue_orchestrator_task",
    "get_client",
    "get_nats_health",
    "init_nats",
    "is_nats_connected",
    "list_agents",
    "list_dead_letters",
    "publish",
    "publish_event",
    "publish_system_event",
    "publish_task",
    "register_agent",
    "replay",
    "reply",
    "request",
    "request_agent",
    "requeue_dead_letter",
    "start_orchestrator_worker",
    "subscribe",
    "subscribe_to_events",
    "subscribe_to_results",
    "subscribe_to_tasks",
    "update_task_state",
    "watch_task",
]

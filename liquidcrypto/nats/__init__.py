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
# isort: split
from liquidcrypto.nats.a2a_bus import (
    A2ABus,
    AgentCard,
    AgentInfo,
    DurableSubscription,
    Envelope,
    TaskState,
    TaskStateChange,
    list_agents,
    publish_event,
    publish_system_event,
    publish_task,
    register_agent,
    replay,
    reply,
    request_agent,
    subscribe_to_events,
    subscribe_to_tasks,
    update_task_state,
    watch_task,
)

# --- end a2a_bus exports ---
# --- work_queue exports (issue 4) ---
from liquidcrypto.nats.work_queue import (
    DeadLetter,
    EnqueueReceipt,
    OrchestratorTask,
    ResultSet,
    ResultSubscription,
    TaskResult,
    WorkQueue,
    collect_results,
    enqueue_orchestrator_task,
    list_dead_letters,
    requeue_dead_letter,
    start_orchestrator_worker,
    subscribe_to_results,
)

# --- end work_queue exports ---

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
    "OrchestratorTask",
    "ResultSet",
    "ResultSubscription",
    "Subscription",
    "TaskResult",
    "TaskState",
    "TaskStateChange",
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

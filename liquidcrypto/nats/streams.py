"""The three JetStream streams of the spec, defined in one place, and their provisioning.

| Stream               | Subjects                                          | Retention            |
|----------------------|---------------------------------------------------|----------------------|
| ``A2A_TASKS``        | ``agents.>``, ``system.>``                        | limits, max age 1 h  |
| ``ORCHESTRATOR_TASKS`` | ``orchestrator.tasks.>``, ``orchestrator.results.>`` | work queue      |
| ``TRADE_EVENTS``     | ``trades.>``, ``ws.broadcast``                    | limits, max age 5 min |

Provisioning is idempotent: a missing stream is created, a stream whose subjects, age
or de-duplication window drifted is updated, and a stream with a different retention
policy is never silently changed (``StreamConflictError``).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from liquidcrypto.errors import StreamConflictError

log = logging.getLogger(__name__)

A2A_TASKS = "A2A_TASKS"
ORCHESTRATOR_TASKS = "ORCHESTRATOR_TASKS"
TRADE_EVENTS = "TRADE_EVENTS"

A2A_MAX_AGE = 3600.0
TRADE_MAX_AGE = 300.0
DEFAULT_WORK_QUEUE_DEDUPE_WINDOW = 3600.0


def stream_configs(replicas: int = 1, dedupe_window: float = DEFAULT_WORK_QUEUE_DEDUPE_WINDOW) -> list[StreamConfig]:
    """The spec's three streams with ``replicas`` copies each.

    Args:
        replicas: JetStream replicas (1 on a single server, 3 on a 3-node cluster).
        dedupe_window: seconds during which ``ORCHESTRATOR_TASKS`` drops a repeated
            ``Nats-Msg-Id`` (the exactly-once window of the work queue).
    """
    return [
        StreamConfig(
            name=A2A_TASKS,
            description="Agent-to-agent tasks and events (1 hour)",
            subjects=["agents.>", "system.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=A2A_MAX_AGE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=A2A_MAX_AGE,
        ),
        StreamConfig(
            name=ORCHESTRATOR_TASKS,
            description="Orchestrator work queue: tasks and results",
            subjects=["orchestrator.tasks.>", "orchestrator.results.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=dedupe_window,
        ),
        StreamConfig(
            name=TRADE_EVENTS,
            description="Trade events and WebSocket broadcasts (5 minutes)",
            subjects=["trades.>", "ws.broadcast"],
            retention=RetentionPolicy.LIMITS,
            max_age=TRADE_MAX_AGE,
            storage=StorageType.FILE,
            num_replicas=replicas,
            duplicate_window=120.0,
        ),
    ]


STREAM_NAMES = tuple(c.name for c in stream_configs() if c.name)


async def ensure_stream(js: JetStreamContext, wanted: StreamConfig) -> None:
    """Create ``wanted`` if missing; update drifted subjects/age/window; refuse retention changes.

    Raises:
        StreamConflictError: the stream exists with another retention policy.
    """
    assert wanted.name is not None
    try:
        info = await js.stream_info(wanted.name)
    except NotFoundError:
        await js.add_stream(wanted)
        log.info("created stream %s subjects=%s", wanted.name, wanted.subjects)
        return
    have = info.config
    if have.retention != wanted.retention:
        raise StreamConflictError(
            f"stream {wanted.name} exists with retention {have.retention} but {wanted.retention} is "
            "required; delete it deliberately (data loss) to let it be recreated"
        )
    drift = (
        sorted(have.subjects or []) != sorted(wanted.subjects or [])
        or (have.max_age or 0) != (wanted.max_age or 0)
        or have.duplicate_window != wanted.duplicate_window
    )
    if drift:
        # Keep the server's replica count and storage: changing either is an operator's call.
        updated = replace(
            have,
            subjects=wanted.subjects,
            max_age=wanted.max_age,
            duplicate_window=wanted.duplicate_window,
        )
        await js.update_stream(updated)
        log.info("updated stream %s to subjects=%s", wanted.name, wanted.subjects)


async def provision(
    js: JetStreamContext, replicas: int = 1, dedupe_window: float = DEFAULT_WORK_QUEUE_DEDUPE_WINDOW
) -> list[StreamConflictError]:
    """Ensure the three streams exist as specified (idempotent).

    A stream in conflict is logged as an error and left as it is; the others are still
    provisioned, so one misconfigured stream does not take the service down.

    Returns:
        the errors of the streams in conflict (empty when all is well).
    """
    conflicts: list[StreamConflictError] = []
    for cfg in stream_configs(replicas, dedupe_window):
        try:
            await ensure_stream(js, cfg)
        except StreamConflictError as exc:
            log.error("%s", exc)
            conflicts.append(exc)
    return conflicts

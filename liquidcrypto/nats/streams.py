"""Every JetStream resource of liquidcrypto, declared once, and one ensure routine per kind.

Streams (the spec's three, then the work queue's dead letters):

| Stream                 | Subjects                                             | Retention              |
|------------------------|------------------------------------------------------|------------------------|
| ``A2A_TASKS``          | ``agents.>``, ``system.>``                           | limits, max age 1 h    |
| ``ORCHESTRATOR_TASKS`` | ``orchestrator.tasks.>``, ``orchestrator.results.>`` | work queue, msg TTLs   |
| ``TRADE_EVENTS``       | ``trades.>``, ``ws.broadcast``                       | limits, max age 5 min  |
| ``ORCHESTRATOR_DLQ``   | ``orchestrator.dlq.>``                               | limits, max age 14 days |

Key-value buckets: ``ORCHESTRATOR_ATTEMPTS`` (failed runs per work-queue task),
``A2A_TASK_STATES`` (per-task state histories), ``A2A_AGENTS`` (agent cards),
``A2A_HANDLED`` (the durable A2A tasks handled, per durable name and stream sequence). Consumer
template: ``orchestrator-workers``, the work queue's shared durable consumer
(``worker_consumer(ack_wait)``).

They are nats-py's own ``StreamConfig``, ``KeyValueConfig`` and ``ConsumerConfig``
values, declared for one replica; ``deployed()`` fits them to a deployment
(``NATS_JS_REPLICAS``, ``NATS_DEDUPE_WINDOW``). They are grouped per component in
``Resources``: the client ensures ``SPEC_STREAMS`` itself on every (re)connection, and a
component asks for its own group with ``await client.require(WORK_QUEUE_RESOURCES)``,
which ensures it then and after every later (re)connection.

Ensuring is idempotent. A missing stream, bucket or consumer is created. A stream whose
subjects, age or de-duplication window drifted, or that does not yet allow per-message
TTLs it needs, is updated (a TTL, once allowed, is never disallowed); a stream with another
retention policy is never silently changed (``StreamConflictError``); its replicas and
storage are the operator's call. An existing bucket is used as it is (changing its TTL
or history would change what it keeps). A consumer is updated to the wanted
configuration unless the caller's policy keeps it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from liquidcrypto.errors import ConsumerConflictError, StreamConflictError
from liquidcrypto.nats import subjects

log = logging.getLogger(__name__)

# -- names and limits ----------------------------------------------------------------

A2A_TASKS = "A2A_TASKS"
ORCHESTRATOR_TASKS = "ORCHESTRATOR_TASKS"
TRADE_EVENTS = "TRADE_EVENTS"
ORCHESTRATOR_DLQ = "ORCHESTRATOR_DLQ"

ORCHESTRATOR_ATTEMPTS = "ORCHESTRATOR_ATTEMPTS"
A2A_TASK_STATES = "A2A_TASK_STATES"
A2A_AGENTS = "A2A_AGENTS"
A2A_HANDLED = "A2A_HANDLED"

WORKER_CONSUMER = "orchestrator-workers"

A2A_MAX_AGE = 3600.0
TRADE_MAX_AGE = 300.0
DEFAULT_WORK_QUEUE_DEDUPE_WINDOW = 3600.0
DLQ_PREFIX = "orchestrator.dlq"
DLQ_MAX_AGE = 14 * 24 * 3600.0
ATTEMPTS_TTL = 24 * 3600.0
TASK_STATES_TTL = 24 * 3600.0
AGENTS_TTL = 24 * 3600.0
WORKER_MAX_ACK_PENDING = 10_000
TASKS_FILTER = f"{subjects.ORCHESTRATOR_TASKS}.>"

# nats-server error code: "filtered consumer not unique on workqueue stream".
ERR_WQ_OVERLAP = 10100

# -- streams ---------------------------------------------------------------------------

A2A_TASKS_STREAM = StreamConfig(
    name=A2A_TASKS,
    description="Agent-to-agent tasks and events (1 hour)",
    subjects=["agents.>", "system.>"],
    retention=RetentionPolicy.LIMITS,
    max_age=A2A_MAX_AGE,
    storage=StorageType.FILE,
    num_replicas=1,
    duplicate_window=A2A_MAX_AGE,
)
ORCHESTRATOR_TASKS_STREAM = StreamConfig(
    name=ORCHESTRATOR_TASKS,
    description="Orchestrator work queue: tasks and results",
    subjects=["orchestrator.tasks.>", "orchestrator.results.>"],
    retention=RetentionPolicy.WORK_QUEUE,
    storage=StorageType.FILE,
    num_replicas=1,
    duplicate_window=DEFAULT_WORK_QUEUE_DEDUPE_WINDOW,
    # Results carry a Nats-TTL (nats-server 2.11+), so uncollected ones do not stay for
    # ever; tasks carry none and stay until a worker acknowledges them.
    allow_msg_ttl=True,
)
TRADE_EVENTS_STREAM = StreamConfig(
    name=TRADE_EVENTS,
    description="Trade events and WebSocket broadcasts (5 minutes)",
    subjects=["trades.>", "ws.broadcast"],
    retention=RetentionPolicy.LIMITS,
    max_age=TRADE_MAX_AGE,
    storage=StorageType.FILE,
    num_replicas=1,
    duplicate_window=120.0,
)
ORCHESTRATOR_DLQ_STREAM = StreamConfig(
    name=ORCHESTRATOR_DLQ,
    description="Orchestrator tasks that exhausted their attempts",
    subjects=[f"{DLQ_PREFIX}.>"],
    retention=RetentionPolicy.LIMITS,
    max_age=DLQ_MAX_AGE,
    storage=StorageType.FILE,
    num_replicas=1,
    duplicate_window=DEFAULT_WORK_QUEUE_DEDUPE_WINDOW,
)

# The streams whose de-duplication window is the work queue's exactly-once window
# (NATS_DEDUPE_WINDOW, capped at the stream's max age): tasks, results and dead letters.
WORK_QUEUE_WINDOW_STREAMS = frozenset({ORCHESTRATOR_TASKS, ORCHESTRATOR_DLQ})

# -- key-value buckets -----------------------------------------------------------------

ORCHESTRATOR_ATTEMPTS_BUCKET = KeyValueConfig(
    bucket=ORCHESTRATOR_ATTEMPTS,
    description="Failed handler runs per orchestrator task id",
    history=1,
    ttl=ATTEMPTS_TTL,
    storage=StorageType.FILE,
    replicas=1,
)
A2A_TASK_STATES_BUCKET = KeyValueConfig(
    bucket=A2A_TASK_STATES,
    description="A2A task state histories",
    history=1,
    ttl=TASK_STATES_TTL,
    storage=StorageType.FILE,
    replicas=1,
)
A2A_AGENTS_BUCKET = KeyValueConfig(
    bucket=A2A_AGENTS,
    description="A2A agent cards and heartbeats",
    history=1,
    ttl=AGENTS_TTL,
    storage=StorageType.FILE,
    replicas=1,
)

A2A_HANDLED_BUCKET = KeyValueConfig(
    bucket=A2A_HANDLED,
    description="Durable A2A tasks handled: key {durable}.{stream sequence}, value the task id",
    history=1,
    # As long as A2A_TASKS keeps a task: no redelivery can come later than that.
    ttl=A2A_MAX_AGE,
    # Look-ups answered by the stream leader: a direct get may be served by a replica
    # that has not seen the newest mark yet.
    direct=False,
    storage=StorageType.FILE,
    replicas=1,
)

# -- consumer templates ----------------------------------------------------------------


def worker_consumer(ack_wait: float) -> ConsumerConfig:
    """The work queue's durable consumer on ``ORCHESTRATOR_TASKS``, shared by every worker.

    ``max_deliver`` is unlimited on the server: the worker counts failed runs itself (the
    attempts bucket) and terminates the task, so a declined or crashed delivery never
    strands a message that the server stopped delivering.

    Args:
        ack_wait: seconds the server waits for an acknowledgement (consumer-wide).
    """
    return ConsumerConfig(
        durable_name=WORKER_CONSUMER,
        description="Orchestrator workers (shared by every worker process)",
        filter_subject=TASKS_FILTER,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_deliver=-1,
        max_ack_pending=WORKER_MAX_ACK_PENDING,
    )


# -- groups per component --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Resources:
    """The streams and buckets one component needs, ensured together.

    Attributes:
        name: the component (``"spec"``, ``"work-queue"``, ``"a2a"``); one group per name.
        streams: its streams.
        buckets: its key-value buckets.
    """

    name: str
    streams: tuple[StreamConfig, ...] = ()
    buckets: tuple[KeyValueConfig, ...] = ()

    @property
    def stream_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.streams if s.name)


SPEC_STREAMS = Resources(name="spec", streams=(A2A_TASKS_STREAM, ORCHESTRATOR_TASKS_STREAM, TRADE_EVENTS_STREAM))
"""The spec's three streams: the client ensures them by default; health counts them."""

WORK_QUEUE_RESOURCES = Resources(
    name="work-queue", streams=(ORCHESTRATOR_DLQ_STREAM,), buckets=(ORCHESTRATOR_ATTEMPTS_BUCKET,)
)
"""What the work queue needs beyond ``ORCHESTRATOR_TASKS`` (a spec stream)."""

A2A_RESOURCES = Resources(name="a2a", buckets=(A2A_TASK_STATES_BUCKET, A2A_AGENTS_BUCKET, A2A_HANDLED_BUCKET))
"""What the A2A bus needs beyond ``A2A_TASKS`` (a spec stream)."""

STREAM_NAMES = SPEC_STREAMS.stream_names


def deployed(config: StreamConfig, *, replicas: int, dedupe_window: float) -> StreamConfig:
    """``config`` as a deployment runs it.

    Args:
        config: one of the streams above.
        replicas: JetStream replicas (1 on a single server, 3 on a 3-node cluster).
        dedupe_window: seconds during which the work queue's streams drop a repeated
            ``Nats-Msg-Id`` (the exactly-once window); capped at a stream's max age.
    """
    window = config.duplicate_window
    if config.name in WORK_QUEUE_WINDOW_STREAMS:
        window = min(dedupe_window, config.max_age) if config.max_age else dedupe_window
    return replace(config, num_replicas=replicas, duplicate_window=window)


# -- ensuring --------------------------------------------------------------------------


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
        or bool(wanted.allow_msg_ttl and not have.allow_msg_ttl)
    )
    if drift:
        # Keep the server's replica count and storage: changing either is an operator's call.
        updated = replace(
            have,
            subjects=wanted.subjects,
            max_age=wanted.max_age,
            duplicate_window=wanted.duplicate_window,
            allow_msg_ttl=have.allow_msg_ttl or wanted.allow_msg_ttl,
        )
        await js.update_stream(updated)
        log.info("updated stream %s to subjects=%s", wanted.name, wanted.subjects)


async def ensure_bucket(js: JetStreamContext, wanted: KeyValueConfig) -> KeyValue:
    """Bind the bucket, creating it if missing (concurrent creators are fine).

    An existing bucket is used as it is: a different TTL or history is the operator's call.
    """
    try:
        return await js.key_value(wanted.bucket)
    except BucketNotFoundError:
        pass
    try:
        kv = await js.create_key_value(wanted)
    except APIError:
        # Another process created it first with the same config: bind to it.
        return await js.key_value(wanted.bucket)
    log.info("created key-value bucket %s", wanted.bucket)
    return kv


KeepPolicy = Callable[[ConsumerInfo], Awaitable[ConsumerInfo | None]]
"""Given a consumer whose configuration differs from the wanted one: the info to keep it
as it is, or ``None`` to update it."""


async def ensure_consumer(
    js: JetStreamContext, stream: str, wanted: ConsumerConfig, *, keep: KeepPolicy | None = None
) -> ConsumerInfo:
    """Create the durable consumer ``wanted`` on ``stream``, or update it where it differs.

    Args:
        keep: consulted when the consumer exists with another configuration; returning
            its info keeps it unchanged (e.g. a value other users of the consumer rely on).

    Returns:
        the consumer's info.

    Raises:
        ConsumerConflictError: ``stream`` is a work-queue stream and another consumer's
            filter overlaps ``wanted``'s.
    """
    name = wanted.durable_name or wanted.name
    assert name is not None
    try:
        info: ConsumerInfo = await js.consumer_info(stream, name)
    except NotFoundError:
        pass
    else:
        if _matches(info.config, wanted):
            return info
        if keep is not None and (kept := await keep(info)) is not None:
            return kept
    try:
        return await js.add_consumer(stream, wanted)
    except BadRequestError as exc:
        if exc.err_code == ERR_WQ_OVERLAP:
            raise ConsumerConflictError(
                f"cannot create {name} on {stream}: another consumer's filter overlaps "
                f"{wanted.filter_subject!r} (work-queue streams allow one consumer per subject)"
            ) from exc
        raise


def _matches(have: ConsumerConfig, wanted: ConsumerConfig) -> bool:
    """Whether every field ``wanted`` sets has that value on the server (times to 1 ms)."""
    for field in dataclasses.fields(wanted):
        want: Any = getattr(wanted, field.name)
        if want is None:
            continue
        got: Any = getattr(have, field.name)
        if isinstance(want, float) and isinstance(got, int | float):
            if not math.isclose(got, want, abs_tol=1e-3):
                return False
        elif got != want:
            return False
    return True


async def ensure(
    js: JetStreamContext,
    resources: Resources,
    *,
    replicas: int = 1,
    dedupe_window: float = DEFAULT_WORK_QUEUE_DEDUPE_WINDOW,
) -> list[StreamConflictError]:
    """Ensure every stream and bucket of ``resources`` (idempotent).

    A stream in conflict is logged as an error and left as it is; the others are still
    ensured, so one misconfigured stream does not take the service down.

    Args:
        replicas: JetStream replicas of what is created.
        dedupe_window: the work queue's de-duplication window (see ``deployed``).

    Returns:
        the errors of the streams in conflict (empty when all is well).
    """
    conflicts: list[StreamConflictError] = []
    for cfg in resources.streams:
        try:
            await ensure_stream(js, deployed(cfg, replicas=replicas, dedupe_window=dedupe_window))
        except StreamConflictError as exc:
            log.error("%s", exc)
            conflicts.append(exc)
    for bucket in resources.buckets:
        await ensure_bucket(js, replace(bucket, replicas=replicas))
    return conflicts

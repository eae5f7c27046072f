"""JetStream pieces of the work queue beyond the spec's streams, in one place.

- the shared durable consumer ``orchestrator-workers`` on ``orchestrator.tasks.>``;
- the dead-letter stream ``ORCHESTRATOR_DLQ`` on ``orchestrator.dlq.>`` (limits, 14 days);
- the key-value bucket ``ORCHESTRATOR_ATTEMPTS``: failed and unfinished handler runs per
  task id, so attempts are counted exactly even when specialist routing declines
  deliveries (the server's delivery count includes declines). Only failures and
  redeliveries touch it: the first, successful run of a task costs nothing here.

All are created idempotently when the work queue is first used.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

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
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.errors import NotFoundError as JsNotFoundError
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.errors import ConsumerConflictError
from liquidcrypto.nats import streams, subjects
from liquidcrypto.nats.pull import PULL_EXPIRES

log = logging.getLogger(__name__)

TASKS_STREAM = streams.ORCHESTRATOR_TASKS
DLQ_STREAM = "ORCHESTRATOR_DLQ"
DLQ_PREFIX = "orchestrator.dlq"
DLQ_MAX_AGE = 14 * 24 * 3600.0
ATTEMPTS_BUCKET = "ORCHESTRATOR_ATTEMPTS"
ATTEMPTS_TTL = 24 * 3600.0
WORKER_CONSUMER = "orchestrator-workers"
TASKS_FILTER = f"{subjects.ORCHESTRATOR_TASKS}.>"
WORKER_MAX_ACK_PENDING = 10_000
# Longer than a worker's pull cycle: an idle worker has a pull request waiting again by then.
UNUSED_RECHECK = PULL_EXPIRES + 0.5


# nats-server error code: "filtered consumer not unique on workqueue stream".
ERR_WQ_OVERLAP = 10100


def result_msg_id(task_id: str) -> str:
    """The ``Nats-Msg-Id`` of a task's result: one result per task id, whoever runs it."""
    return f"result.{task_id}"


def dlq_config(replicas: int, dedupe_window: float) -> StreamConfig:
    return StreamConfig(
        name=DLQ_STREAM,
        description="Orchestrator tasks that exhausted their attempts",
        subjects=[f"{DLQ_PREFIX}.>"],
        retention=RetentionPolicy.LIMITS,
        max_age=DLQ_MAX_AGE,
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=min(dedupe_window, DLQ_MAX_AGE),
    )


async def ensure_dlq(js: JetStreamContext, replicas: int, dedupe_window: float) -> None:
    await streams.ensure_stream(js, dlq_config(replicas, dedupe_window))


async def ensure_attempts_bucket(js: JetStreamContext, replicas: int) -> KeyValue:
    try:
        return await js.key_value(ATTEMPTS_BUCKET)
    except BucketNotFoundError:
        pass
    kv = await js.create_key_value(
        KeyValueConfig(
            bucket=ATTEMPTS_BUCKET,
            description="Failed handler runs per orchestrator task id",
            history=1,
            ttl=ATTEMPTS_TTL,
            storage=StorageType.FILE,
            replicas=replicas,
        )
    )
    log.info("created key-value bucket %s", ATTEMPTS_BUCKET)
    return kv


def worker_consumer_config(ack_wait: float) -> ConsumerConfig:
    # max_deliver is unlimited on the server: the worker counts failed runs itself (the
    # attempts bucket) and terminates the task, so a declined or crashed delivery never
    # strands a message that the server stopped delivering.
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


async def ensure_worker_consumer(js: JetStreamContext, ack_wait: float) -> ConsumerInfo:
    """Create or update the shared durable consumer.

    ``ack_wait`` is consumer-wide. While other workers use the consumer (a pull request
    waits, or a task is unacknowledged) it is only raised, never lowered: each worker
    heartbeats by the ``ack_wait`` it started with, so a lower value would get a running
    worker's long tasks redelivered while it still runs them.

    Raises:
        ConsumerConflictError: another consumer on the stream overlaps ``orchestrator.tasks.>``.
    """
    try:
        info: ConsumerInfo = await js._jsm.consumer_info(TASKS_STREAM, WORKER_CONSUMER)
        current = info.config.ack_wait
        if current is not None and abs(current - ack_wait) < 1e-3:
            return info
        if current is not None and current > ack_wait:
            if not _in_use(info):
                # An idle worker renews its pull request every second: look once more
                # after a full cycle, so that the gap between two requests is not mistaken
                # for no worker at all.
                await asyncio.sleep(UNUSED_RECHECK)
                info = await js._jsm.consumer_info(TASKS_STREAM, WORKER_CONSUMER)
            if _in_use(info):
                log.info(
                    "%s keeps ack_wait=%gs while other workers use it (this worker asked for %gs and "
                    "heartbeats by its own value)", WORKER_CONSUMER, current, ack_wait,
                )
                return info
    except JsNotFoundError:
        pass
    try:
        return await js._jsm.add_consumer(TASKS_STREAM, worker_consumer_config(ack_wait))
    except BadRequestError as exc:
        if exc.err_code == ERR_WQ_OVERLAP:
            raise ConsumerConflictError(
                f"cannot create {WORKER_CONSUMER} on {TASKS_STREAM}: another consumer's filter overlaps "
                f"{TASKS_FILTER!r} (work-queue streams allow one consumer per subject)"
            ) from exc
        raise


def _in_use(info: ConsumerInfo) -> bool:
    """A worker is on the consumer: a pull request waits, or a task is unacknowledged."""
    return bool(info.num_waiting or info.num_ack_pending)


def attempts_key(task_id: str) -> str:
    """A key-value key for any task id (ids may hold characters keys may not)."""
    return base64.urlsafe_b64encode(task_id.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class Attempts:
    """What the attempts bucket knows of one task id.

    Attributes:
        failures: handler runs that raised.
        unfinished: redelivered runs that neither failed nor acknowledged (the worker
            died, lost the connection, or was stopped while running it).
    """

    failures: int = 0
    unfinished: int = 0


async def _update(
    kv: KeyValue, task_id: str, change: Callable[[Attempts], Attempts | None]
) -> tuple[Attempts, bool]:
    """Compare-and-set ``change`` on the task's entry; the value and whether it changed."""
    key = attempts_key(task_id)
    for _ in range(20):
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:  # also a deleted or expired key
            entry = None
        old = Attempts(**codec.decode(entry.value)) if entry is not None and entry.value else Attempts()
        new = change(old)
        if new is None:
            return old, False
        data = codec.encode(asdict(new))
        try:
            if entry is None:
                await kv.create(key, data)
            else:
                await kv.update(key, data, last=entry.revision)
            return new, True
        except KeyWrongLastSequenceError:
            continue
    raise RuntimeError(f"could not update the attempts of task {task_id!r}: too much contention")


async def record_failure(kv: KeyValue, task_id: str, *, redelivered: bool) -> Attempts:
    """Count a failed run (and close the unfinished run ``record_start`` opened)."""
    state, _ = await _update(
        kv, task_id,
        lambda a: Attempts(a.failures + 1, max(0, a.unfinished - 1) if redelivered else a.unfinished),
    )
    return state


async def record_start(kv: KeyValue, task_id: str, *, limit: int) -> tuple[Attempts, bool]:
    """Before running a redelivered task: count the run as unfinished until it fails or
    succeeds. Returns the state and False when ``limit`` earlier runs never finished
    (a task that kills its workers): do not run it again."""
    return await _update(
        kv, task_id, lambda a: None if a.unfinished >= limit else Attempts(a.failures, a.unfinished + 1)
    )

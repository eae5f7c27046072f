"""The work queue's JetStream policies; its resources are declared in ``liquidcrypto.nats.streams``.

- the shared durable consumer ``orchestrator-workers`` on ``orchestrator.tasks.>``, whose
  ``ack_wait`` is raised but not lowered while other workers use it;
- the dead-letter stream ``ORCHESTRATOR_DLQ`` and the key-value bucket
  ``ORCHESTRATOR_ATTEMPTS`` (``streams.WORK_QUEUE_RESOURCES``): failed and unfinished
  handler runs per task id, so attempts are counted exactly even when specialist routing
  declines deliveries (the server's delivery count includes declines). Only failures and
  redeliveries touch it: the first, successful run of a task costs nothing here.

All are ensured idempotently when the work queue is first used.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StreamConfig
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.pull import PULL_EXPIRES

log = logging.getLogger(__name__)

# The work queue's names for its resources (declared in streams).
TASKS_STREAM = streams.ORCHESTRATOR_TASKS
DLQ_STREAM = streams.ORCHESTRATOR_DLQ
DLQ_PREFIX = streams.DLQ_PREFIX
ATTEMPTS_BUCKET = streams.ORCHESTRATOR_ATTEMPTS
WORKER_CONSUMER = streams.WORKER_CONSUMER
ERR_WQ_OVERLAP = streams.ERR_WQ_OVERLAP
# Longer than a worker's pull cycle: an idle worker has a pull request waiting again by then.
UNUSED_RECHECK = PULL_EXPIRES + 0.5


DEFAULT_RESULT_TTL = 7 * 24 * 3600.0
"""Seconds an uncollected result stays in ``ORCHESTRATOR_TASKS`` (its ``Nats-TTL``)."""


def result_msg_id(task_id: str) -> str:
    """The ``Nats-Msg-Id`` of a task's result: one result per task id, whoever runs it."""
    return f"result.{task_id}"


def result_headers(task_id: str, *, ttl: float | None, msg_id: str | None = None) -> dict[str, str]:
    """A result's headers: its de-duplication id (default ``result_msg_id``), its task id,
    and with ``ttl`` its time to live in whole seconds (at least 1, the server's minimum)."""
    headers = {hdr.MSG_ID: msg_id or result_msg_id(task_id), hdr.TASK_ID: task_id}
    if ttl:
        headers[hdr.TTL] = f"{max(1, math.ceil(ttl))}s"
    return headers


def usable_ttl(tasks_stream: StreamConfig, ttl: float | None) -> float | None:
    """``ttl`` if ``ORCHESTRATOR_TASKS`` (as configured on the server) allows per-message
    TTLs, else ``None`` (logged): the server refuses a ``Nats-TTL`` where it is not allowed."""
    if not ttl:
        return None
    if tasks_stream.allow_msg_ttl:
        return ttl
    log.warning(
        "%s does not allow per-message TTLs (nats-server 2.11+ is needed): results are kept until collected",
        TASKS_STREAM,
    )
    return None


async def ensure(client: NatsClient) -> None:
    """Ensure the work queue's stream and bucket now and after every reconnection.

    Raises:
        StreamConflictError: ``ORCHESTRATOR_DLQ`` exists with another retention policy.
    """
    await client.require(streams.WORK_QUEUE_RESOURCES)


async def ensure_worker_consumer(js: JetStreamContext, ack_wait: float) -> ConsumerInfo:
    """Create or update the shared durable consumer.

    ``ack_wait`` is consumer-wide. While other workers use the consumer (a pull request
    waits, or a task is unacknowledged) it is only raised, never lowered: each worker
    heartbeats by the ``ack_wait`` it started with, so a lower value would get a running
    worker's long tasks redelivered while it still runs them.

    Raises:
        ConsumerConflictError: another consumer on the stream overlaps ``orchestrator.tasks.>``.
    """

    async def keep_longer_ack_wait(info: ConsumerInfo) -> ConsumerInfo | None:
        current = info.config.ack_wait
        if current is None or current <= ack_wait + 1e-3:  # equal, or raising it is safe
            return None
        if not _in_use(info):
            # An idle worker renews its pull request every second: look once more after
            # a full cycle, so that the gap between two requests is not mistaken for no
            # worker at all.
            await asyncio.sleep(UNUSED_RECHECK)
            info = await js.consumer_info(TASKS_STREAM, WORKER_CONSUMER)
        if not _in_use(info):
            return None
        log.info(
            "%s keeps ack_wait=%gs while other workers use it (this worker asked for %gs and "
            "heartbeats by its own value)",
            WORKER_CONSUMER,
            current,
            ack_wait,
        )
        return info

    return await streams.ensure_consumer(js, TASKS_STREAM, streams.worker_consumer(ack_wait), keep=keep_longer_ack_wait)


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


async def _update(kv: KeyValue, task_id: str, change: Callable[[Attempts], Attempts | None]) -> tuple[Attempts, bool]:
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
        kv,
        task_id,
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

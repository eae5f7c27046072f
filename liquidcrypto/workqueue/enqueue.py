"""Publishing tasks to ``ORCHESTRATOR_TASKS`` with a de-duplication id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from nats.js.api import PubAck

from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import metrics
from liquidcrypto.workqueue.models import EnqueueReceipt, OrchestratorTask, coerce_task

log = logging.getLogger(__name__)

_NEW = metrics.TASKS_ENQUEUED.labels(duplicate="false")
_DUPLICATE = metrics.TASKS_ENQUEUED.labels(duplicate="true")


async def store(
    client: NatsClient, subject: str, payload: bytes, msg_id: str, headers: dict[str, str] | None = None,
    *, timeout: float = 5.0,
) -> PubAck:
    """``NatsClient.js_publish`` for bytes on a subject built from validated tokens (the hot
    paths: tasks and results), without validating and encoding a second time.

    Raises:
        NatsUnavailableError: it was not stored (no connection, no stream, timeout).
    """
    hdrs = {**headers, hdr.MSG_ID: msg_id} if headers else {hdr.MSG_ID: msg_id}
    return await client.js_publish_raw(subject, payload, hdrs, timeout=timeout)


async def enqueue(
    client: NatsClient,
    task: OrchestratorTask | Mapping[str, Any],
    *,
    task_id: str | None = None,
    timeout: float = 5.0,
) -> EnqueueReceipt:
    """Store ``task`` on ``orchestrator.tasks.{session_id}.{sub_prd_id}``.

    Args:
        task: the task (model, or dict with snake_case or camelCase keys).
        task_id: the ``Nats-Msg-Id``; default ``{session_id}.{sub_prd_id}`` so that an
            accidental second enqueue inside the duplicate window is stored once.
            Deliberate re-runs (requeue) pass a fresh id.
        timeout: seconds to wait for the stream's acknowledgement.

    Raises:
        ValueError: an invalid id or task shape (``InvalidSubjectError``/``InvalidTaskError``),
            before anything is sent.
        NatsUnavailableError: the task could not be stored.
    """
    model = coerce_task(task)
    tid = task_id or model.dedupe_id
    headers = {hdr.SPECIALIST: model.specialist} if model.specialist else None
    ack = await store(client, model.subject, model.encode(), tid, headers, timeout=timeout)
    (_DUPLICATE if ack.duplicate else _NEW).inc()
    if ack.duplicate:
        log.info("task %s already enqueued (seq %s); stored once", tid, ack.seq)
    return EnqueueReceipt(seq=ack.seq, duplicate=bool(ack.duplicate), stream=ack.stream, task_id=tid)

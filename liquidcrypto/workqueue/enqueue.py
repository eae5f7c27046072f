"""Publishing tasks to ``ORCHESTRATOR_TASKS`` with a de-duplication id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import metrics
from liquidcrypto.workqueue.models import EnqueueReceipt, OrchestratorTask, coerce_task

log = logging.getLogger(__name__)

_NEW = metrics.TASKS_ENQUEUED.labels(duplicate="false")
_DUPLICATE = metrics.TASKS_ENQUEUED.labels(duplicate="true")


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
    headers = {hdr.MSG_ID: tid}
    if model.specialist:
        headers[hdr.SPECIALIST] = model.specialist
    # Pre-validated subject and pre-encoded body: the hot path skips a second check.
    ack = await client.js_publish_raw(model.subject, model.encode(), headers, timeout=timeout)
    (_DUPLICATE if ack.duplicate else _NEW).inc()
    if ack.duplicate:
        log.info("task %s already enqueued (seq %s); stored once", tid, ack.seq)
    return EnqueueReceipt(seq=ack.seq, duplicate=bool(ack.duplicate), stream=ack.stream, task_id=tid)

"""Publishing tasks to ``ORCHESTRATOR_TASKS`` with a de-duplication id."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.wq import infra, metrics
from liquidcrypto.nats.wq.models import EnqueueReceipt, OrchestratorTask, coerce_task

log = logging.getLogger(__name__)


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
    headers = {infra.HDR_SPECIALIST: model.specialist} if model.specialist else None
    ack = await client.js_publish(
        model.subject, model.to_wire(), msg_id=tid, headers=headers, timeout=timeout
    )
    metrics.TASKS_ENQUEUED.labels(duplicate=str(bool(ack.duplicate)).lower()).inc()
    if ack.duplicate:
        log.info("task %s already enqueued (seq %s); stored once", tid, ack.seq)
    return EnqueueReceipt(seq=ack.seq, duplicate=bool(ack.duplicate), stream=ack.stream, task_id=tid)

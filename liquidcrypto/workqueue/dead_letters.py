"""Dead letters: tasks that exhausted their attempts, and results whose
``subscribe_to_results`` handler did, kept in ``ORCHESTRATOR_DLQ``.

A dead letter's id is its sequence in that stream. ``requeue_dead_letter`` enqueues
the task again — or stores the result again, for its subscriber — under a fresh
de-duplication id (the stream never forgets the old one) and deletes the dead letter.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from nats.js.errors import NotFoundError as JsNotFoundError

from liquidcrypto import codec
from liquidcrypto.errors import DeadLetterNotFoundError, InvalidPayloadError, InvalidTaskError
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import infra, metrics
from liquidcrypto.workqueue.enqueue import enqueue
from liquidcrypto.workqueue.models import DeadLetter, EnqueueReceipt, TaskResult, coerce_task

log = logging.getLogger(__name__)


def dlq_subject_for(task_subject: str) -> str:
    """``orchestrator.tasks.X.Y`` -> ``orchestrator.dlq.X.Y`` (any tail, even malformed)."""
    prefix = subjects.ORCHESTRATOR_TASKS + "."
    tail = task_subject[len(prefix) :] if task_subject.startswith(prefix) else task_subject
    return f"{infra.DLQ_PREFIX}.{tail or 'unknown'}"


def result_dlq_subject_for(result_subject: str) -> str:
    """``orchestrator.results.X.Y`` -> ``orchestrator.dlq.results.X.Y``."""
    prefix = subjects.ORCHESTRATOR_RESULTS + "."
    tail = result_subject[len(prefix) :] if result_subject.startswith(prefix) else result_subject
    return f"{infra.DLQ_PREFIX}.results.{tail or 'unknown'}"


async def publish_dead_letter(client: NatsClient, letter: DeadLetter, *, msg_id: str | None = None) -> int:
    """Store ``letter`` (idempotent per ``msg_id``, default per task id); its stream sequence.

    Raises:
        NatsUnavailableError: it could not be stored.
    """
    body = letter.to_dict(exclude={"id"})
    result = letter.kind == "result"
    subject = result_dlq_subject_for(letter.subject) if result else dlq_subject_for(letter.subject)
    ack = await client.js_publish(subject, body, msg_id=msg_id or f"dlq.{letter.task_id}", timeout=5.0)
    if not ack.duplicate:
        metrics.DEAD_LETTERS.inc()
        log.warning(
            "%s %s dead-lettered as %s after %d attempts: %s",
            letter.kind,
            letter.task_id,
            ack.seq,
            letter.attempts,
            letter.last_error,
        )
    return int(ack.seq)


def _letter(seq: int, data: bytes | None) -> DeadLetter:
    try:
        body: Any = codec.decode(data or b"")
    except InvalidPayloadError as exc:
        raise InvalidTaskError(f"dead letter {seq} is not JSON: {exc}") from exc
    return DeadLetter.from_dict({**body, "id": str(seq)})


async def list_dead_letters(client: NatsClient, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters.

    Raises:
        NatsUnavailableError: NATS is not available.
    """
    if limit < 1:
        return []
    await infra.ensure(client)
    js = client.js
    out: list[DeadLetter] = []
    seq = 1
    while len(out) < limit:
        try:
            raw = await js.get_msg(infra.DLQ_STREAM, seq=seq, subject=f"{infra.DLQ_PREFIX}.>", next=True)
        except JsNotFoundError:
            break
        assert raw.seq is not None
        try:
            out.append(_letter(raw.seq, raw.data))
        except (InvalidTaskError, ValueError) as exc:
            log.warning("skipping unreadable dead letter %s: %s", raw.seq, exc)
        seq = raw.seq + 1
    return out


async def get_dead_letter(client: NatsClient, dead_letter_id: str) -> DeadLetter:
    """One dead letter by id.

    Raises:
        DeadLetterNotFoundError: no such dead letter (a ``LookupError``).
        ValueError: the id is not a positive integer.
    """
    try:
        seq = int(dead_letter_id)
    except (TypeError, ValueError):
        raise ValueError(f"dead letter id must be a positive integer, got {dead_letter_id!r}") from None
    if seq < 1:
        raise ValueError(f"dead letter id must be a positive integer, got {dead_letter_id!r}")
    await infra.ensure(client)
    try:
        raw = await client.js.get_msg(infra.DLQ_STREAM, seq=seq)
    except JsNotFoundError:
        raise DeadLetterNotFoundError(f"no dead letter {seq} in {infra.DLQ_STREAM}") from None
    return _letter(seq, raw.data)


async def requeue_dead_letter(client: NatsClient, dead_letter_id: str) -> EnqueueReceipt:
    """Enqueue a dead letter's task again (store its result again, for a result's letter)
    and delete the dead letter.

    The task gets the fresh id ``{session}.{sub_prd}.rq{id}-{failed_at}`` (a result
    ``result.{task_id}.rq{id}-{failed_at}``): concurrent requeues of one dead letter
    collapse to one.

    Raises:
        DeadLetterNotFoundError: no such dead letter.
        InvalidTaskError: the dead task (or result) was malformed and cannot be requeued.
        NatsUnavailableError: the task could not be stored.
    """
    letter = await get_dead_letter(client, dead_letter_id)
    if not isinstance(letter.task, dict):
        raise InvalidTaskError(f"dead letter {letter.id} holds a malformed {letter.kind}; it cannot be requeued")
    fresh = f"rq{letter.id}-{letter.failed_at}"
    if letter.kind == "result":
        receipt = await _store_result_again(client, letter, fresh)
    else:
        task = coerce_task(letter.task)
        receipt = await enqueue(client, task, task_id=f"{task.dedupe_id}.{fresh}")
    # A concurrent requeue may have deleted it; its enqueue was de-duplicated with ours.
    with contextlib.suppress(JsNotFoundError):
        await client.js.delete_msg(infra.DLQ_STREAM, int(letter.id))
    metrics.TASKS_DONE.labels(outcome="requeued").inc()
    log.info("requeued dead letter %s as %s %s (seq %s)", letter.id, letter.kind, receipt.task_id, receipt.seq)
    return receipt


async def _store_result_again(client: NatsClient, letter: DeadLetter, fresh: str) -> EnqueueReceipt:
    """A dead-lettered result back on its subject, with the default time to live."""
    try:
        result = TaskResult.from_dict(letter.task)
    except ValueError as exc:
        raise InvalidTaskError(f"dead letter {letter.id} holds a malformed result: {exc}") from exc
    info = await client.js.stream_info(infra.TASKS_STREAM)
    msg_id = f"{infra.result_msg_id(letter.task_id)}.{fresh}"
    headers = infra.result_headers(
        letter.task_id, ttl=infra.usable_ttl(info.config, infra.DEFAULT_RESULT_TTL), msg_id=msg_id
    )
    ack = await client.js_publish_raw(result.subject, result.encode(), headers, timeout=5.0)
    return EnqueueReceipt(seq=ack.seq, duplicate=bool(ack.duplicate), stream=ack.stream, task_id=msg_id)

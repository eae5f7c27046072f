"""Dead letters: tasks that exhausted their attempts, and results whose
``subscribe_to_results`` handler did, kept in ``ORCHESTRATOR_DLQ``.

A dead letter's id is its sequence in that stream. ``requeue_dead_letter`` enqueues
the task again — or stores the result again, for its subscriber — under a fresh
de-duplication id (the stream never forgets the old one) and deletes the dead letter.

Anything a sender can put on ``orchestrator.>`` can be dead-lettered: a subject token
the package refuses (whitespace, a wildcard, over 256 characters, empty) becomes
``invalid-`` and 16 hex digits of its SHA-256 in the dead letter's subject (the
letter's ``subject`` field keeps the original), and a task or result that cannot be
encoded again or would make the letter exceed ``max_payload`` is kept as its first
``RAW_KEEP`` bytes of text (``publish_dead_letter(raw=...)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import Any

import msgspec
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from liquidcrypto import codec
from liquidcrypto.errors import (
    DeadLetterNotFoundError,
    InvalidPayloadError,
    InvalidSubjectError,
    InvalidTaskError,
    PayloadTooLargeError,
)
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import infra, metrics
from liquidcrypto.workqueue.enqueue import enqueue
from liquidcrypto.workqueue.models import DeadLetter, EnqueueReceipt, TaskResult, coerce_task

log = logging.getLogger(__name__)


POISON_ERRORS = (InvalidPayloadError, PayloadTooLargeError, InvalidSubjectError, BadRequestError)
"""What storing a dead letter (or a failure result) raises for a message whatever is
retried: it cannot be encoded, is too large, or the stream refuses it."""
RAW_KEEP = 4096
"""Bytes of a task (or result) kept, as text, when it cannot be kept as it was."""
MAX_TAIL = 1024
"""Characters of a dead letter's subject tail at most (a longer one is hashed whole): far
below the server's control-line limit, far above two 256-character tokens."""


def dlq_subject_for(task_subject: str) -> str:
    """``orchestrator.tasks.X.Y`` -> ``orchestrator.dlq.X.Y``, for any tail, even malformed:
    an invalid token is replaced by ``invalid-{hash}`` (``safe_tail``)."""
    prefix = subjects.ORCHESTRATOR_TASKS + "."
    tail = task_subject[len(prefix) :] if task_subject.startswith(prefix) else task_subject
    return f"{infra.DLQ_PREFIX}.{safe_tail(tail)}"


def result_dlq_subject_for(result_subject: str) -> str:
    """``orchestrator.results.X.Y`` -> ``orchestrator.dlq.results.X.Y`` (``safe_tail``)."""
    prefix = subjects.ORCHESTRATOR_RESULTS + "."
    tail = result_subject[len(prefix) :] if result_subject.startswith(prefix) else result_subject
    return f"{infra.DLQ_PREFIX}.results.{safe_tail(tail)}"


def safe_tail(tail: str) -> str:
    """``tail`` with each token the package refuses (``subjects.token``) replaced by
    ``invalid-`` and 16 hex digits of its SHA-256; ``unknown`` if empty; the whole tail
    hashed if the result is longer than ``MAX_TAIL``. Always a valid publish subject tail."""
    if not tail:
        return "unknown"
    out = ".".join(t if _valid_token(t) else _hashed(t) for t in tail.split("."))
    return out if len(out) <= MAX_TAIL else _hashed(tail)


def _valid_token(value: str) -> bool:
    try:
        subjects.token(value)
    except InvalidSubjectError:
        return False
    return True


def _hashed(value: str) -> str:
    return "invalid-" + hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def raw_text(data: bytes) -> str:
    """The first ``RAW_KEEP`` bytes of a message body as text (invalid UTF-8 replaced)."""
    return data[:RAW_KEEP].decode("utf-8", errors="replace")


async def publish_dead_letter(
    client: NatsClient, letter: DeadLetter, *, msg_id: str | None = None, raw: bytes | None = None
) -> int:
    """Store ``letter`` (idempotent per ``msg_id``, default per task id); its stream sequence.

    Args:
        raw: the message body the letter is about. When ``letter.task`` cannot be encoded
            (nested past the encoder's 255 levels...) or the letter would exceed the server's
            ``max_payload``, the letter is stored with the first ``RAW_KEEP`` bytes of
            ``raw`` as text instead, and ``last_error`` says so.

    Raises:
        NatsUnavailableError: it could not be stored (now; a retry may succeed).
        InvalidPayloadError, PayloadTooLargeError: it cannot be stored, even shortened
            (or ``raw`` was not given).
        nats.js.errors.BadRequestError: the stream refused it (e.g. its ``max_msg_size``).
    """
    result = letter.kind == "result"
    subject = result_dlq_subject_for(letter.subject) if result else dlq_subject_for(letter.subject)
    mid = msg_id or f"dlq.{letter.task_id}"
    try:
        ack = await client.js_publish(subject, letter.to_dict(exclude={"id"}), msg_id=mid, timeout=5.0)
    except (InvalidPayloadError, PayloadTooLargeError) as exc:
        if raw is None:
            raise
        letter = msgspec.structs.replace(
            letter, task=raw_text(raw),
            last_error=f"{letter.last_error[:RAW_KEEP]} (the {letter.kind} could not be kept as it was: {exc}; "
            f"its first {RAW_KEEP} bytes are kept as text)",
        )
        ack = await client.js_publish(subject, letter.to_dict(exclude={"id"}), msg_id=mid, timeout=5.0)
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
        InvalidTaskError: the dead task (or result) was malformed and cannot be requeued,
            or the task names another session/sub-PRD than the subject it was sent on.
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
        if letter.subject.startswith(subjects.ORCHESTRATOR_TASKS + ".") and task.subject != letter.subject:
            raise InvalidTaskError(
                f"dead letter {letter.id} holds a task for {task.session_id}/{task.sub_prd_id} that was sent on "
                f"{letter.subject!r}; it cannot be requeued (the subject is the authority)"
            )
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
    if letter.subject.startswith(subjects.ORCHESTRATOR_RESULTS + ".") and result.subject != letter.subject:
        raise InvalidTaskError(
            f"dead letter {letter.id} holds a result for {result.session_id}/{result.sub_prd_id} that was sent on "
            f"{letter.subject!r}; it cannot be requeued (the subject is the authority)"
        )
    info = await client.js.stream_info(infra.TASKS_STREAM)
    msg_id = f"{infra.result_msg_id(letter.task_id)}.{fresh}"
    headers = infra.result_headers(
        letter.task_id, ttl=infra.usable_ttl(info.config, infra.DEFAULT_RESULT_TTL), msg_id=msg_id
    )
    ack = await client.js_publish_raw(result.subject, result.encode(), headers, timeout=5.0)
    return EnqueueReceipt(seq=ack.seq, duplicate=bool(ack.duplicate), stream=ack.stream, task_id=msg_id)

"""The work queue's wire shapes, defined once: task, result, receipt, dead letter.

On the wire tasks and results use the spec's camelCase keys (``sessionId``,
``subPrdId``, ``createdAt``...), so a TypeScript peer reads them unchanged; in Python
the fields are snake_case and both spellings are accepted on input. Times are
milliseconds since the epoch, as the spec's ``Date.now()``. The models are frozen
``msgspec`` structs (``codec.Model``); ids that become subject tokens are checked when a
model is built, whether by keyword or from the wire.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import msgspec

from liquidcrypto import codec
from liquidcrypto.errors import InvalidPayloadError, InvalidTaskError
from liquidcrypto.nats import subjects


def now_ms() -> int:
    """Milliseconds since the epoch (the spec's ``Date.now()``)."""
    return int(time.time() * 1000)


class _SubPrd(codec.Model, frozen=True, kw_only=True, rename="camel"):
    """The ids naming one sub-PRD of a session; each is one subject token."""

    session_id: str
    sub_prd_id: str

    def __post_init__(self) -> None:
        subjects.token(self.session_id, "session_id")
        subjects.token(self.sub_prd_id, "sub_prd_id")

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict sent on the wire."""
        return self.to_dict()


class OrchestratorTask(_SubPrd, frozen=True, kw_only=True):
    """One sub-PRD for a specialist agent (the spec's task)."""

    specialist: str | None = None
    payload: Any = None
    created_at: int = msgspec.field(default_factory=now_ms)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.specialist is not None:
            subjects.token(self.specialist, "specialist")

    @property
    def subject(self) -> str:
        """``orchestrator.tasks.{session_id}.{sub_prd_id}`` (ids were validated as tokens)."""
        return f"{subjects.ORCHESTRATOR_TASKS}.{self.session_id}.{self.sub_prd_id}"

    @property
    def result_subject(self) -> str:
        """``orchestrator.results.{session_id}.{sub_prd_id}``: where its result is stored."""
        return f"{subjects.ORCHESTRATOR_RESULTS}.{self.session_id}.{self.sub_prd_id}"

    @property
    def dedupe_id(self) -> str:
        """The ``Nats-Msg-Id`` of a first enqueue: ``{session_id}.{sub_prd_id}``."""
        return f"{self.session_id}.{self.sub_prd_id}"


class TaskResult(_SubPrd, frozen=True, kw_only=True):
    """The outcome of one task (the spec's result)."""

    success: bool
    result: Any = None
    error: str | None = None
    completed_at: int = msgspec.field(default_factory=now_ms)

    @property
    def subject(self) -> str:
        """``orchestrator.results.{session_id}.{sub_prd_id}`` (ids were validated as tokens)."""
        return f"{subjects.ORCHESTRATOR_RESULTS}.{self.session_id}.{self.sub_prd_id}"


class EnqueueReceipt(codec.Model, frozen=True, kw_only=True):
    """What ``enqueue_orchestrator_task`` stored.

    Attributes:
        seq: the stream sequence of the task (of the first copy, for a duplicate).
        duplicate: the stream already held this task id inside its duplicate window.
        task_id: the ``Nats-Msg-Id`` used.
    """

    seq: int
    duplicate: bool
    stream: str
    task_id: str


class DeadLetter(codec.Model, frozen=True, kw_only=True):
    """A task that exhausted its attempts — or a result whose ``subscribe_to_results``
    handler did — as kept in the ``ORCHESTRATOR_DLQ`` stream.

    Stored as ``to_dict(exclude={"id"})`` (snake_case keys); read back with
    ``from_dict({**body, "id": ...})``.

    Attributes:
        id: the dead letter's id (its ``ORCHESTRATOR_DLQ`` sequence, as a string).
        task: the task as received (a dict; the raw text if it was not JSON); for a
            ``kind="result"`` letter, the result.
        task_id: the ``Nats-Msg-Id`` the task had (for a result: its task's).
        subject: where the task (or result) was.
        attempts: handler runs that failed (or deliveries, for a task no worker finished).
        last_error: why the last attempt failed.
        failed_at: when it was dead-lettered (ms since the epoch).
        kind: ``"task"`` or ``"result"``.
    """

    id: str = ""
    task: Any
    task_id: str
    subject: str
    attempts: int
    last_error: str
    failed_at: int = msgspec.field(default_factory=now_ms)
    kind: str = "task"


class ResultSet(list[TaskResult]):
    """The results of ``collect_results``: a list, plus whether it is complete.

    Attributes:
        session_id: the session collected.
        expected: how many results were asked for.
        complete: ``expected`` distinct sub-PRDs have a result.
        missing: sub-PRDs known to be enqueued (still queued, or enqueued through this
            ``WorkQueue``) that have no result yet; sorted.
    """

    def __init__(
        self, results: list[TaskResult], *, session_id: str, expected: int, missing: list[str] | None = None
    ) -> None:
        super().__init__(results)
        self.session_id = session_id
        self.expected = expected
        self.missing: list[str] = sorted(missing or [])

    @property
    def complete(self) -> bool:
        return len(self) >= self.expected

    def __repr__(self) -> str:
        return (
            f"ResultSet(session_id={self.session_id!r}, {len(self)}/{self.expected}, "
            f"complete={self.complete}, missing={self.missing!r})"
        )


def coerce_task(task: OrchestratorTask | Mapping[str, Any]) -> OrchestratorTask:
    """A task model from a model or a dict with snake_case or camelCase keys.

    Raises:
        InvalidSubjectError: (a ``ValueError``) an id cannot be a subject token.
        InvalidTaskError: (a ``ValueError``) any other shape problem.
    """
    if isinstance(task, OrchestratorTask):
        return task
    if not isinstance(task, Mapping):
        raise InvalidTaskError(f"task must be an OrchestratorTask or a dict, not {type(task).__name__}")
    try:
        return OrchestratorTask.from_dict(task)
    except InvalidPayloadError as exc:  # an InvalidSubjectError passes through as itself
        raise InvalidTaskError(str(exc)) from exc


def decode_task(raw: bytes) -> OrchestratorTask:
    """Parse a task message body.

    Raises:
        InvalidPayloadError: not JSON.
        InvalidTaskError / InvalidSubjectError: JSON of the wrong shape.
    """
    task = OrchestratorTask.try_decode(raw)  # a well-formed camelCase task, in one pass
    if task is not None:
        return task
    data = codec.decode(raw)
    if not isinstance(data, dict):
        raise InvalidTaskError(f"task message must be a JSON object, not {type(data).__name__}")
    return coerce_task(data)


def coerce_result(value: Any, task: OrchestratorTask) -> TaskResult:
    """The result a handler returned, checked against its task.

    Accepts a ``TaskResult`` or a dict (either key case); ``session_id``/``sub_prd_id``
    default to the task's, ``completed_at`` to now. ``success`` is required.

    Raises:
        InvalidTaskError: the value has the wrong shape or names another task.
    """
    if isinstance(value, TaskResult):
        result = value
    elif isinstance(value, Mapping):
        data = dict(value)
        for snake, camel, default in (
            ("session_id", "sessionId", task.session_id),
            ("sub_prd_id", "subPrdId", task.sub_prd_id),
        ):
            if snake not in data and camel not in data:
                data[snake] = default
        if "success" not in data:
            raise InvalidTaskError(
                f"handler result for {task.session_id}/{task.sub_prd_id} has no 'success' field "
                f"(keys: {sorted(map(str, data))[:8]})"
            )
        try:
            result = TaskResult.from_dict(data)
        except ValueError as exc:  # InvalidPayloadError or InvalidSubjectError
            raise InvalidTaskError(f"handler returned an invalid result: {exc}") from exc
    else:
        raise InvalidTaskError(
            f"handler returned {type(value).__name__}; expected a TaskResult or a dict with "
            "'success' (and optionally 'result', 'error')"
        )
    if (result.session_id, result.sub_prd_id) != (task.session_id, task.sub_prd_id):
        raise InvalidTaskError(
            f"handler returned a result for {result.session_id}/{result.sub_prd_id} "
            f"while processing {task.session_id}/{task.sub_prd_id}"
        )
    return result


def decode_result(raw: bytes) -> TaskResult:
    """Parse a result message body.

    Raises:
        InvalidPayloadError: not JSON, or not a result.
    """
    result = TaskResult.try_decode(raw)  # a well-formed camelCase result, in one pass
    if result is not None:
        return result
    data = codec.decode(raw)
    if not isinstance(data, dict):
        raise InvalidPayloadError(f"result message must be a JSON object, not {type(data).__name__}")
    try:
        return TaskResult.from_dict(data)
    except ValueError as exc:  # InvalidPayloadError or InvalidSubjectError
        raise InvalidPayloadError(f"invalid result message: {exc}") from exc

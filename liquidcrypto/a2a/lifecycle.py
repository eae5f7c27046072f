"""Task lifecycle: the A2A protocol's task states, their legal transitions, and a
resumable per-task history kept in a JetStream key-value bucket.

Why a KV bucket and not only ``system.events.task_state_changed``: the events of every
task share that one subject, so the stream alone cannot give a per-task sequence without
scanning it, and two writers could both claim "seq 3". The bucket ``A2A_TASK_STATES``
holds one key per task whose value is the task's recent history; every change is a
compare-and-set on the key's revision (``Nats-Expected-Last-Subject-Sequence``), so the
per-task ``seq`` is gap-free and monotonic even with concurrent writers, and a watcher
that sees any later value can emit every change it missed. After the change is committed
it is also published as the system event ``task_state_changed`` (de-duplicated by the id
``{task_id}:state:{seq}``) for subscribers of ``system.events.>``.

The stored value is bounded, so no task (and no sender of updates) can grow it past the
server's ``max_payload``: it keeps the last ``HISTORY_LIMIT`` changes (fewer if they
would pass ``MAX_RECORD_BYTES``), and the last change's ``seq`` is the total count. One
change larger than ``MAX_CHANGE_BYTES`` encoded is refused. The full history stays in the
``task_state_changed`` events of the ``A2A_TASKS`` stream (one hour).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.a2a.envelope import now_ms
from liquidcrypto.a2a.kv import kv_key, open_bucket
from liquidcrypto.errors import IllegalTransitionError, InvalidPayloadError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient

log = logging.getLogger(__name__)

TASK_STATES_BUCKET = streams.A2A_TASK_STATES
_CAS_ATTEMPTS = 50
HISTORY_LIMIT = 100
"""The most state changes a task's stored record keeps (the newest ones)."""
MAX_CHANGE_BYTES = 64 * 1024
"""The largest state change (``message`` and ``data`` included), JSON-encoded."""
MAX_RECORD_BYTES = 256 * 1024
"""The largest stored record: older changes are dropped to stay under it."""


class TaskState(StrEnum):
    """The A2A protocol's task states."""

    SUBMITTED = "submitted"
    WORKING = "working"
    INPUT_REQUIRED = "input-required"
    AUTH_REQUIRED = "auth-required"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    REJECTED = "rejected"

    @property
    def terminal(self) -> bool:
        """Whether no transition leaves this state."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED})

_S = TaskState
# None = the task has no state yet. Repeating "working" is a progress update.
TRANSITIONS: dict[TaskState | None, frozenset[TaskState]] = {
    None: frozenset({_S.SUBMITTED, _S.WORKING, _S.REJECTED}),
    _S.SUBMITTED: frozenset(
        {_S.WORKING, _S.INPUT_REQUIRED, _S.AUTH_REQUIRED, _S.COMPLETED, _S.FAILED, _S.CANCELED, _S.REJECTED}
    ),
    _S.WORKING: frozenset({_S.WORKING, _S.INPUT_REQUIRED, _S.AUTH_REQUIRED, _S.COMPLETED, _S.FAILED, _S.CANCELED}),
    _S.INPUT_REQUIRED: frozenset({_S.WORKING, _S.COMPLETED, _S.FAILED, _S.CANCELED}),
    _S.AUTH_REQUIRED: frozenset({_S.WORKING, _S.FAILED, _S.CANCELED, _S.REJECTED}),
}


def check_transition(task_id: str, current: TaskState | None, new: TaskState) -> None:
    """Raise unless ``current -> new`` is a legal move.

    Raises:
        IllegalTransitionError: naming the task and both states.
    """
    if new not in TRANSITIONS.get(current, frozenset()):
        where = "its first state" if current is None else f"{current.value!r} -> {new.value!r}"
        why = " (terminal)" if current is not None and current.terminal else ""
        raise IllegalTransitionError(f"task {task_id!r}: illegal transition {where}{why}")


class TaskStateChange(codec.Model, frozen=True, kw_only=True, omit_defaults=True):
    """One state change of one task; ``seq`` counts 1, 2, 3... per task.

    On the wire (the ``task_state_changed`` event's data, the stored history) fields that
    are ``None`` are left out.
    """

    task_id: str
    seq: int
    state: TaskState
    previous: TaskState | None = None
    timestamp: int
    agent_id: str | None = None
    message: str | None = None
    data: Any = None


class TaskRecord(codec.Model, frozen=True, kw_only=True, omit_defaults=True):
    """The stored history of a task (the value of its key in ``A2A_TASK_STATES``).

    ``changes`` are the newest ones, at most ``HISTORY_LIMIT``; ``count`` (the last
    ``seq``) is how many the task had in all.
    """

    task_id: str
    changes: list[TaskStateChange]

    @property
    def state(self) -> TaskState:
        return self.changes[-1].state

    @property
    def seq(self) -> int:
        return self.changes[-1].seq

    @property
    def count(self) -> int:
        """How many changes the task had, including those no longer kept."""
        return self.changes[-1].seq


def _bounded(task_id: str, changes: list[TaskStateChange]) -> bytes:
    """The encoded record of the newest ``changes`` within ``HISTORY_LIMIT`` and ``MAX_RECORD_BYTES``."""
    changes = changes[-HISTORY_LIMIT:]
    value = TaskRecord(task_id=task_id, changes=changes).encode()
    if len(value) <= MAX_RECORD_BYTES:
        return value
    excess = len(value) - MAX_RECORD_BYTES
    drop = 0
    while excess > 0 and drop < len(changes) - 1:
        excess -= len(changes[drop].encode()) + 1  # the change and its comma
        drop += 1
    return TaskRecord(task_id=task_id, changes=changes[drop:]).encode()


def _parse(task_id: str, raw: bytes | None) -> TaskRecord:
    try:
        return TaskRecord.decode(raw or b"")
    except ValueError as exc:
        raise InvalidPayloadError(f"stored state of task {task_id!r} is unreadable: {exc}") from exc


def _check_size(task_id: str, state: TaskState, message: str | None, data: Any) -> None:
    """Refuse a change whose ``message`` and ``data`` pass ``MAX_CHANGE_BYTES`` encoded.

    Raises:
        InvalidPayloadError: naming the task, the size and the limit.
    """
    probe = TaskStateChange(task_id=task_id, seq=0, state=state, timestamp=0, message=message, data=data)
    size = len(probe.encode())
    if size > MAX_CHANGE_BYTES:
        raise InvalidPayloadError(
            f"task {task_id!r}: a state change of {size:,} bytes (message and data) exceeds the limit of "
            f"{MAX_CHANGE_BYTES:,} bytes; store large results elsewhere and reference them"
        )


class TaskStateStore:
    """The per-task histories in the ``A2A_TASK_STATES`` bucket."""

    def __init__(self, client: NatsClient) -> None:
        self._client = client
        self._kv: KeyValue | None = None

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await open_bucket(self._client, TASK_STATES_BUCKET)
        return self._kv

    async def get(self, task_id: str) -> TaskRecord | None:
        """The task's history, or ``None`` if it has no state."""
        kv = await self.bucket()
        try:
            entry = await kv.get(kv_key(task_id, "task_id"))
        except nats.js.errors.KeyNotFoundError:
            return None
        return _parse(task_id, entry.value)

    async def commit(
        self,
        task_id: str,
        state: TaskState,
        *,
        agent_id: str | None,
        message: str | None,
        data: Any,
    ) -> TaskStateChange:
        """Append a legal change with the next ``seq`` (compare-and-set, retried on races).

        Raises:
            IllegalTransitionError: the move is illegal from the task's current state.
            InvalidPayloadError: ``data`` is not JSON-able, or the change is larger than
                ``MAX_CHANGE_BYTES`` encoded.
        """
        kv = await self.bucket()
        key = kv_key(task_id, "task_id")
        _check_size(task_id, state, message, data)
        for _ in range(_CAS_ATTEMPTS):
            try:
                entry = await kv.get(key)
                record: TaskRecord | None = _parse(task_id, entry.value)
                revision = entry.revision or 0
            except nats.js.errors.KeyNotFoundError:
                record, revision = None, 0
            current = record.state if record else None
            check_transition(task_id, current, state)
            change = TaskStateChange(
                task_id=task_id,
                seq=(record.seq if record else 0) + 1,
                state=state,
                previous=current,
                timestamp=now_ms(),
                agent_id=agent_id,
                message=message,
                data=data,
            )
            value = _bounded(task_id, [*(record.changes if record else []), change])
            try:
                if revision:
                    await kv.update(key, value, last=revision)
                else:
                    await kv.create(key, value)
            except nats.js.errors.KeyWrongLastSequenceError:
                log.debug("task %s changed concurrently; retrying the state change", task_id)
                continue
            return change
        raise IllegalTransitionError(f"task {task_id!r}: gave up after {_CAS_ATTEMPTS} concurrent state changes")

    async def watch(self, task_id: str, since_seq: int | None = None) -> AsyncIterator[TaskStateChange]:
        """Yield the task's changes after ``since_seq`` in order, then live ones.

        Ends after a terminal state. A task with no state yet is waited for. Only the
        last ``HISTORY_LIMIT`` changes are stored: a cursor older than that resumes at the
        oldest kept change (its ``seq`` shows how many were missed).
        """
        kv = await self.bucket()
        key = kv_key(task_id, "task_id")
        cursor = since_seq or 0
        watcher = await kv.watch(key)
        try:
            async for entry in watcher:
                if entry is None or entry.operation is not None or not entry.value:
                    continue  # the "caught up" marker, or a delete/purge marker
                try:
                    record = _parse(task_id, entry.value)
                except InvalidPayloadError:
                    log.warning("skipping unreadable state of task %s (revision %s)", task_id, entry.revision)
                    continue
                for change in record.changes:
                    if change.seq > cursor:
                        cursor = change.seq
                        yield change
                if record.state.terminal:
                    return
        finally:
            try:
                await watcher.stop()  # type: ignore[no-untyped-call]
            except Exception as exc:  # noqa: BLE001 - stopping a watcher must not mask the exit
                log.debug("stopping the watcher of task %s failed: %s", task_id, exc)

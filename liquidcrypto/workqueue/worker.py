"""The orchestrator worker: handler slots on the shared durable consumer, exactly once in effect.

Messages come from a ``PullConsumer`` (``liquidcrypto.nats.pull``) with ``capacity`` =
``concurrency``: pull requests ask for exactly the free slots, so a busy worker never
holds tasks another worker could run, each slot asks for the next task as soon as it
finishes, running tasks get ``in_progress()`` every ``ack_wait/2``, and ``stop()`` hands
unfinished tasks back. Per task (``_process``): decode it; a task whose body names
another session or sub-PRD than its subject is dead-lettered as invalid, never run (the
subject is the authority); if it is a redelivery whose result is stored already (an
earlier run died before its ack), acknowledge it and stop; run the handler (a plain
``def`` one in the worker's own threads, so the loop keeps beating); if the task was
stored more than half the de-duplication window ago, look for a result another run
stored meanwhile; publish its result (``results.publish_result``,
``Nats-Msg-Id = result.{task_id}``, ``Nats-TTL = result_ttl``), then double-ack
(``ack_sync``). A failed run is counted in the attempts bucket and ``nak``-ed with a
back-off delay; after ``max_deliver`` failures the task gets a failure result and a dead
letter (``dead_letters``), then is acknowledged; a task that cannot even be
dead-lettered is terminated (logged at error, ``outcome="terminated"``). A permanent
error of the consumer stops the worker visibly (``failure``, ``wait()``, ``health()``,
``liquidcrypto_wq_workers_failed``)."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.errors import (
    InvalidPayloadError,
    InvalidSubjectError,
    InvalidTaskError,
    LiquidNatsError,
)
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.pull import PullConsumer
from liquidcrypto.nats.subscription import as_async, is_async_handler
from liquidcrypto.workqueue import dead_letters, infra, metrics, results
from liquidcrypto.workqueue.models import DeadLetter, OrchestratorTask, TaskResult, coerce_result, decode_task

log = logging.getLogger(__name__)

TaskHandler = Callable[[OrchestratorTask], Any]
StopFn = Callable[..., Awaitable[None]]

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0)
DEFAULT_STOP_TIMEOUT = 30.0
DECLINE_DELAY = 1.0
_HANDED_BACK = metrics.TASKS_DONE.labels(outcome="handed_back")


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How one worker runs: the keyword arguments of ``start_orchestrator_worker``.

    Attributes:
        concurrency: handlers running at once (and tasks held at most).
        specialist: only run tasks whose ``specialist`` is this; others are declined
            (``nak`` after ``decline_delay``) for workers that take them.
        ack_wait: seconds before an unacknowledged task is redelivered; the worker sends
            ``in_progress`` every ``ack_wait/2`` while a handler runs.
        max_deliver: failed runs before the task is dead-lettered with a failure result.
        backoff: ``nak`` delays after the 1st, 2nd... failure (the last repeats).
        stop_timeout: how long ``stop()`` waits for running handlers by default.
        decline_delay: seconds before a declined task is offered again.
        result_ttl: seconds a result stays in ``ORCHESTRATOR_TASKS`` if nobody collects
            it (at least 1; ``None``: until collected).

    Raises:
        ValueError: an invalid option.
    """

    concurrency: int = 1
    specialist: str | None = None
    ack_wait: float = DEFAULT_ACK_WAIT
    max_deliver: int = DEFAULT_MAX_DELIVER
    backoff: Sequence[float] = DEFAULT_BACKOFF
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    decline_delay: float = DECLINE_DELAY
    result_ttl: float | None = infra.DEFAULT_RESULT_TTL

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.ack_wait <= 0.2:
            raise ValueError(f"ack_wait must be more than 0.2 s, got {self.ack_wait}")
        if self.max_deliver < 1:
            raise ValueError(f"max_deliver must be at least 1, got {self.max_deliver}")
        if any(b < 0 for b in self.backoff):
            raise ValueError(f"backoff delays must not be negative, got {list(self.backoff)}")
        if self.result_ttl is not None and self.result_ttl < 1:
            raise ValueError(f"result_ttl must be at least 1 s (or None: until collected), got {self.result_ttl}")
        object.__setattr__(self, "backoff", tuple(self.backoff) or (0.0,))


class Worker:
    """One ``start_orchestrator_worker``: a ``PullConsumer`` feeding ``concurrency`` handler slots."""

    def __init__(self, client: NatsClient, handler: TaskHandler, options: WorkerOptions | None = None) -> None:
        self.client = client
        self.handler = handler
        self.options = options or WorkerOptions()
        # A plain handler runs in a thread of the worker's own, one per slot: it never
        # waits behind other handlers, and the loop keeps sending in_progress meanwhile.
        self._executor: ThreadPoolExecutor | None = None
        if not is_async_handler(handler):
            self._executor = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="orchestrator-worker")
        self._run_handler = as_async(handler, self._executor)
        self._kv: KeyValue | None = None
        self._dedupe_window = 0.0  # ORCHESTRATOR_TASKS's, read at every bind
        self._result_ttl: float | None = None  # options.result_ttl where the stream allows it
        self._bound = False
        self.processed = 0
        self._pull = PullConsumer(
            client,
            infra.TASKS_STREAM,
            self._run_one,
            self._bind,
            capacity=self.options.concurrency,
            concurrency=self.options.concurrency,
            ack_wait=self.options.ack_wait,
            heartbeats=2,
            stop_timeout=self.options.stop_timeout,
            name="orchestrator worker",
            on_overflow=_HANDED_BACK.inc,
            on_failure=self._on_failure,
        )

    @property
    def handed_back(self) -> int:
        """Tasks that arrived with no free slot (a request that outlived a reconnect) and
        were handed back at once."""
        return self._pull.handed_back

    @property
    def failure(self) -> BaseException | None:
        """The permanent error that stopped the worker (``None`` while it runs)."""
        return self._pull.failure

    @property
    def stopped(self) -> bool:
        """Whether it stopped: ``stop()`` was called, or a permanent error (``failure``)."""
        return self._pull.stopping

    def health(self) -> dict[str, Any]:
        """``{"state", "failure", "last_error", "processed"}``: ``state`` is ``running``,
        ``retrying`` (binding or pulling fails and is retried; ``last_error`` says why),
        ``failed`` (stopped by ``failure``), ``stopped`` or ``new``."""
        last = self._pull.last_error
        return {
            "state": str(self._pull.state),
            "failure": _describe(self.failure),
            "last_error": _describe(last),
            "processed": self.processed,
        }

    async def wait(self) -> None:
        """Wait until the worker stops.

        Raises:
            Exception: the permanent error that stopped it, e.g. ``ConsumerConflictError``
                (another consumer took ``orchestrator.tasks.>``) or an ``AttributeError``
                of an incompatible nats-py.
        """
        await self._pull.wait()

    def _on_failure(self, exc: BaseException) -> None:
        metrics.WORKERS_FAILED.inc()
        log.error(
            "orchestrator worker stopped by a permanent error after %d task(s): %r; tasks wait for another worker",
            self.processed,
            exc,
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> StopFn:
        """Provision and bind, then run; returns ``stop``.

        With the client in degraded mode (NATS down) the worker starts anyway and binds
        when the client connects.

        Raises:
            ConsumerConflictError: another consumer overlaps ``orchestrator.tasks.>``.
        """
        await self._pull.start()
        o = self.options
        log.info(
            "orchestrator worker started: concurrency=%d specialist=%s ack_wait=%gs max_deliver=%d",
            o.concurrency,
            o.specialist or "*",
            o.ack_wait,
            o.max_deliver,
        )
        return self.stop

    async def stop(self, timeout: float | None = None) -> None:
        """Stop pulling, let running tasks finish (up to ``timeout`` s, default
        ``stop_timeout``), nak the rest.

        Unfinished tasks are ``nak``-ed so another worker takes them at once; a task
        that still arrives for an open pull request is handed back the same way.
        Idempotent.
        """
        first = not self._pull.stopping
        await self._pull.stop(timeout)
        if self._executor is not None:
            # A plain handler still running past the timeout cannot be interrupted: its
            # task was handed back, and the thread finishes on its own.
            self._executor.shutdown(wait=False, cancel_futures=True)
        if first:
            log.info("orchestrator worker stopped after %d task(s)", self.processed)

    async def _bind(self) -> ConsumerInfo:
        """Check (or create) what the worker needs: the dead-letter stream, the attempts
        bucket and the shared consumer. Runs at start and after every reconnection."""
        js = self.client.js
        await infra.ensure(self.client)
        self._kv = await js.key_value(infra.ATTEMPTS_BUCKET)
        stream = await js.stream_info(infra.TASKS_STREAM)
        self._dedupe_window = stream.config.duplicate_window or 0.0
        self._result_ttl = infra.usable_ttl(stream.config, self.options.result_ttl)
        info = await infra.ensure_worker_consumer(js, self.options.ack_wait)
        if self._bound:
            metrics.CONSUMER_REBINDS.inc()
        self._bound = True
        return info

    # -- one task ----------------------------------------------------------------

    async def _run_one(self, msg: Msg) -> None:
        """The ``PullConsumer`` handler (cancelled by ``stop()``: the message is handed back)."""
        metrics.IN_FLIGHT.inc()
        try:
            await self._process(msg)
        finally:
            metrics.IN_FLIGHT.dec()

    async def _process(self, msg: Msg) -> None:
        md = msg.metadata
        headers = msg.headers or {}
        task_id = headers.get(hdr.MSG_ID) or f"seq{md.sequence.stream}"
        if len(task_id) > MAX_TASK_ID:
            task_id = _task_id(task_id)
        try:
            task = decode_task(msg.data)
        except (InvalidPayloadError, InvalidTaskError, ValueError) as exc:
            await self._give_up(msg, None, task_id, 1, f"malformed task: {exc}", outcome="invalid")
            return
        if task.subject != msg.subject:
            # The subject is the authority (permissions are per subject): a body naming
            # another session or sub-PRD would put its result there.
            await self._give_up(
                msg, None, task_id, 1,
                f"task names session/sub-PRD {task.session_id}/{task.sub_prd_id} but was sent on "
                f"{msg.subject!r}; not run",
                outcome="invalid",
            )
            return
        o = self.options
        if o.specialist is not None and task.specialist != o.specialist:
            metrics.TASKS_DONE.labels(outcome="declined").inc()
            await msg.nak(delay=o.decline_delay)
            return
        redelivered = md.num_delivered > 1
        if redelivered:
            # It may have run before: a worker that stored the result and died (or lost
            # its connection) before its ack. Only redeliveries pay for this look-up.
            if await results.result_stored(self.client, task.result_subject, task_id):
                await self._already_done(msg, task_id)
                return
            if not await self._may_run(msg, task, task_id):
                return
        started = time.perf_counter()
        try:
            value = await self._run_handler(task)
        except Exception as exc:  # noqa: BLE001 - a handler failure is a retry, logged
            await self._failed(msg, task, task_id, exc, redelivered)
            return
        finally:
            metrics.TASK_SECONDS.observe(time.perf_counter() - started)
        try:
            result = coerce_result(value, task)
        except InvalidTaskError as exc:
            await self._give_up(msg, task, task_id, 1, str(exc), outcome="invalid")
            return
        # Past the stream's de-duplication window the result id may be forgotten: a result
        # another run stored meanwhile must be looked for, or it would be stored twice.
        if self._outlived_window(md) and await results.result_stored(self.client, result.subject, task_id):
            await self._already_done(msg, task_id)
            return
        # The result is stored (under its own de-duplication id) before the task is
        # acknowledged: a worker dying in between leaves a task whose re-run stores nothing new.
        try:
            stored = await results.publish_result(self.client, result, task_id, ttl=self._result_ttl)
        except POISON_ERRORS as exc:  # too large, not JSON-able: no retry would store it
            await self._give_up(msg, task, task_id, 1, f"its result cannot be stored: {exc}", outcome="invalid")
            return
        if not stored:
            await msg.nak(delay=o.backoff[0])
            return
        try:
            await msg.ack_sync(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - a redelivery re-publishes the same result id
            log.warning("double ack of task %s failed (%s); a redelivery will be de-duplicated", task_id, exc)
            return
        self.processed += 1
        (metrics.OK if result.success else metrics.FAILED).inc()

    def _outlived_window(self, md: Msg.Metadata) -> bool:
        """Whether the task was stored so long ago (half the de-duplication window, for
        clock skew) that a result another run stored may no longer be de-duplicated."""
        return time.time() - md.timestamp.timestamp() >= self._dedupe_window / 2

    async def _already_done(self, msg: Msg, task_id: str) -> None:
        """Acknowledge a task whose result is stored already, without running it again."""
        log.info("task %s: its result is stored already (an earlier run); acknowledged", task_id)
        try:
            await msg.ack_sync(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - the next redelivery finds the result again
            log.warning("ack of completed task %s failed (%s); it will be redelivered", task_id, exc)
            return
        self.processed += 1
        metrics.TASKS_DONE.labels(outcome="already_done").inc()

    async def _may_run(self, msg: Msg, task: OrchestratorTask, task_id: str) -> bool:
        """For a redelivered task: False (and dead-lettered) if ``max_deliver`` earlier
        runs never finished — workers died or lost it while running it."""
        assert self._kv is not None
        try:
            state, ok = await infra.record_start(self._kv, task_id, limit=self.options.max_deliver)
        except Exception as exc:  # noqa: BLE001 - cannot tell; run it
            log.warning("could not record the start of %s (%s); running it", task_id, exc)
            return True
        if not ok:
            await self._give_up(
                msg,
                task,
                task_id,
                state.failures + state.unfinished,
                f"{state.unfinished} runs never finished (the worker died, lost its connection or "
                f"exceeded ack_wait={self.options.ack_wait:g}s without heartbeats)",
            )
        return ok

    async def _failed(self, msg: Msg, task: OrchestratorTask, task_id: str, exc: Exception, redelivered: bool) -> None:
        error = f"{type(exc).__name__}: {exc}"
        assert self._kv is not None
        try:
            attempts = (await infra.record_failure(self._kv, task_id, redelivered=redelivered)).failures
        except Exception as kv_exc:  # noqa: BLE001 - fall back to the server's delivery count
            log.warning("could not count failure of %s (%s); using delivery count", task_id, kv_exc)
            attempts = msg.metadata.num_delivered
        o = self.options
        if attempts >= o.max_deliver:
            log.warning("task %s failed %d time(s), giving up: %s", task_id, attempts, error)
            await self._give_up(msg, task, task_id, attempts, error)
            return
        delay = o.backoff[min(attempts - 1, len(o.backoff) - 1)]
        log.info(
            "task %s failed (attempt %d/%d), retry in %gs: %s",
            task_id,
            attempts,
            o.max_deliver,
            delay,
            error,
        )
        metrics.TASKS_DONE.labels(outcome="retry").inc()
        await msg.nak(delay=delay)

    async def _give_up(
        self,
        msg: Msg,
        task: OrchestratorTask | None,
        task_id: str,
        attempts: int,
        error: str,
        *,
        outcome: str = "failure",
    ) -> None:
        """Failure result + dead letter, then acknowledge.

        ``task`` is ``None`` for a task that is malformed or names another session than
        its subject: the failure result goes to the session and sub-PRD of the subject
        (none if its tokens are not valid ids), the dead letter holds the body as received.
        NATS unavailable: left for redelivery. A task that cannot be dead-lettered at all
        (the dead-letter stream refuses it) is terminated, logged at error and counted.
        """
        error = error if len(error) <= MAX_ERROR else f"{error[:MAX_ERROR]}... ({len(error):,} characters)"
        raw_task: Any = task.to_wire() if task is not None else _raw_body(msg.data)
        try:
            if not await self._publish_failure(msg, task, task_id, error):
                await msg.nak(delay=self.options.backoff[0])
                return
            letter = DeadLetter(
                task=raw_task, task_id=task_id, subject=msg.subject, attempts=attempts, last_error=error
            )
            try:
                await dead_letters.publish_dead_letter(self.client, letter, raw=msg.data)
            except POISON_ERRORS as exc:
                await self._terminate(msg, task_id, f"{type(exc).__name__}: {exc}", error)
                return
            await msg.ack_sync(timeout=5.0)
        except (LiquidNatsError, ValueError, nats.errors.Error, TimeoutError) as exc:
            log.error("could not dead-letter task %s (%s); it will be redelivered", task_id, exc)
            return
        self.processed += 1
        metrics.TASKS_DONE.labels(outcome=outcome).inc()

    async def _publish_failure(self, msg: Msg, task: OrchestratorTask | None, task_id: str, error: str) -> bool:
        """Store the failure result of a task given up on; False if NATS is unavailable.

        A result that cannot be stored at all (its task id makes its headers too large) is
        skipped with a warning: the dead letter still records the task."""
        ids = (task.session_id, task.sub_prd_id) if task is not None else _subject_ids(msg.subject)
        if ids is None:
            log.info("task %s on %r: no failure result (the subject names no valid session/sub-PRD)",
                     task_id, msg.subject[:300])
            return True
        failure = TaskResult(session_id=ids[0], sub_prd_id=ids[1], success=False, error=error)
        try:
            return await results.publish_result(self.client, failure, task_id, ttl=self._result_ttl)
        except POISON_ERRORS as exc:
            log.warning("task %s: its failure result cannot be stored (%s); dead-lettering it without one",
                        task_id, exc)
            return True

    async def _terminate(self, msg: Msg, task_id: str, reason: str, error: str) -> None:
        """The last resort for a task that cannot even be dead-lettered: never redelivered
        again, never dropped silently."""
        metrics.TASKS_DONE.labels(outcome="terminated").inc()
        log.error(
            "task %s on %r (%d bytes) cannot be dead-lettered (%s); terminated, it will not be redelivered. "
            "It was given up because: %s",
            task_id, msg.subject[:300], len(msg.data), reason, error,
        )
        try:
            await msg.term()
        except Exception as exc:  # noqa: BLE001 - redelivered after ack_wait: terminated again
            log.warning("term of task %s failed (%s); it will be redelivered", task_id, exc)


MAX_ERROR = 4096
"""Characters of an error kept in a failure result and dead letter."""
MAX_TASK_ID = 1024
"""A longer ``Nats-Msg-Id`` is replaced by ``sha256-{hex}`` as the worker's task id: it is
repeated in the headers of the result and dead letter, which the server bounds (64 KiB)."""
POISON_ERRORS = dead_letters.POISON_ERRORS


def _subject_ids(subject: str) -> tuple[str, str] | None:
    """``(session_id, sub_prd_id)`` of ``orchestrator.tasks.{session_id}.{sub_prd_id}``, or
    ``None`` if the subject has another shape or its tokens are not valid ids."""
    parts = subject.split(".")
    if len(parts) != 4 or f"{parts[0]}.{parts[1]}" != subjects.ORCHESTRATOR_TASKS:
        return None
    try:
        return subjects.token(parts[2], "session_id"), subjects.token(parts[3], "sub_prd_id")
    except InvalidSubjectError:
        return None


def _task_id(msg_id: str) -> str:
    if len(msg_id) <= MAX_TASK_ID:
        return msg_id
    return "sha256-" + hashlib.sha256(msg_id.encode("utf-8", "surrogatepass")).hexdigest()


def _describe(exc: BaseException | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def _raw_body(data: bytes) -> Any:
    try:
        return codec.decode(data)
    except InvalidPayloadError:
        return dead_letters.raw_text(data)

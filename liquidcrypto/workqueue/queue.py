"""The orchestrator work queue (the spec's ``work-queue.ts``): exactly-once task processing.

Tasks go to ``orchestrator.tasks.{session_id}.{sub_prd_id}`` on the work-queue stream
``ORCHESTRATOR_TASKS`` with ``Nats-Msg-Id = {session_id}.{sub_prd_id}``; workers share
one durable pull consumer; each result is published with its own ``Nats-Msg-Id`` before
the task is double-acknowledged; readers de-duplicate results. ``WorkQueue`` ties the
package's parts together; the module-level functions act on the default client.

Example::

    client = await init_nats()
    await enqueue_orchestrator_task({"sessionId": "session-123", "subPrdId": "ui-component",
                                     "specialist": "ui-agent", "payload": {"story": "Build login page"}})
    stop = await start_orchestrator_worker(handle)
    results = await collect_results("session-123", 1, timeout=30.0)
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

from liquidcrypto.nats.client import NatsClient, get_client
from liquidcrypto.workqueue import dead_letters as _dlq
from liquidcrypto.workqueue import results as _results
from liquidcrypto.workqueue.enqueue import enqueue as _enqueue
from liquidcrypto.workqueue.infra import DEFAULT_RESULT_TTL
from liquidcrypto.workqueue.models import (
    DeadLetter,
    EnqueueReceipt,
    OrchestratorTask,
    ResultSet,
    coerce_task,
)
from liquidcrypto.workqueue.results import ResultHandler, ResultSubscription
from liquidcrypto.workqueue.worker import (
    DEFAULT_ACK_WAIT,
    DEFAULT_BACKOFF,
    DEFAULT_MAX_DELIVER,
    DEFAULT_STOP_TIMEOUT,
    StopFn,
    TaskHandler,
    Worker,
    WorkerOptions,
)

log = logging.getLogger(__name__)

_KNOWN_SESSIONS = 10_000


class WorkQueue:
    """The work queue on one ``NatsClient``.

    Use as ``async with WorkQueue(client) as wq:`` or call ``close()``, which stops the
    workers this object started.
    """

    def __init__(self, client: NatsClient) -> None:
        self.client = client
        self._workers: list[Worker] = []
        # sub-PRDs enqueued through this object, per session: reported as `missing`.
        self._enqueued: OrderedDict[str, set[str]] = OrderedDict()

    async def __aenter__(self) -> WorkQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop every worker started here (each lets its running tasks finish)."""
        workers, self._workers = self._workers, []
        for w in workers:
            await w.stop()

    @property
    def workers(self) -> tuple[Worker, ...]:
        """The workers started here and not stopped by ``close()`` (failed ones included)."""
        return tuple(self._workers)

    def health(self) -> dict[str, Any]:
        """``{"workers": n, "running": n, "failed": [{"failure": "...", "processed": n}, ...]}``:
        a worker stopped by a permanent error is listed under ``failed``."""
        states = [w.health() for w in self._workers]
        return {
            "workers": len(states),
            "running": sum(h["state"] in ("running", "retrying") for h in states),
            "failed": [{"failure": h["failure"], "processed": h["processed"]} for h in states if h["failure"]],
        }

    async def enqueue_orchestrator_task(
        self, task: OrchestratorTask | Mapping[str, Any], *, timeout: float = 5.0
    ) -> EnqueueReceipt:
        """Store a task once (``Nats-Msg-Id = {session_id}.{sub_prd_id}``).

        Args:
            task: an ``OrchestratorTask`` or a dict with snake_case or the spec's camelCase
                keys (``sessionId``, ``subPrdId``, ``specialist``, ``payload``, ``createdAt``).
            timeout: seconds to wait for the stream's acknowledgement.

        Returns:
            the ``EnqueueReceipt`` (``seq``, ``duplicate``, ``task_id``).

        Raises:
            ValueError: an invalid id or shape (nothing was sent).
            NatsUnavailableError: the task could not be stored.
        """
        model = coerce_task(task)
        receipt = await _enqueue(self.client, model, timeout=timeout)
        known = self._enqueued.setdefault(model.session_id, set())
        self._enqueued.move_to_end(model.session_id)
        known.add(model.sub_prd_id)
        while len(self._enqueued) > _KNOWN_SESSIONS:
            self._enqueued.popitem(last=False)
        return receipt

    async def start_orchestrator_worker(
        self,
        handler: TaskHandler,
        *,
        concurrency: int = 1,
        specialist: str | None = None,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        result_ttl: float | None = DEFAULT_RESULT_TTL,
    ) -> StopFn:
        """Run ``handler(task)`` (sync or async) for tasks, exactly once in effect.

        Args:
            handler: receives an ``OrchestratorTask``; returns a ``TaskResult`` or a dict
                with ``success`` (and ``result``/``error``; ids default to the task's).
                Raising means "retry".
            concurrency, specialist, ack_wait, max_deliver, backoff, stop_timeout, result_ttl:
                the ``WorkerOptions`` of the same names (defaults and meaning there).

        While NATS is down (degraded mode) the worker starts anyway and begins pulling
        when the client connects.

        Returns:
            ``stop``: an async callable; stops fetching, waits for running handlers up to
            ``stop_timeout`` and hands unfinished tasks back for redelivery.

        Raises:
            ValueError: an invalid option.
            ConsumerConflictError: another consumer overlaps ``orchestrator.tasks.>``.
        """
        options = WorkerOptions(
            concurrency=concurrency,
            specialist=specialist,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            backoff=backoff,
            stop_timeout=stop_timeout,
            result_ttl=result_ttl,
        )
        worker = Worker(self.client, handler, options)
        stop = await worker.start()
        self._workers.append(worker)
        return stop

    async def collect_results(self, session_id: str, count: int, timeout: float = 30.0) -> ResultSet:
        """The session's results, one per sub-PRD, as soon as ``count`` arrived.

        On timeout returns what arrived: ``.complete`` is False and ``.missing`` names
        the sub-PRDs still queued or enqueued here without a result. Results are removed
        from the stream only when a complete set is returned.

        Args:
            session_id: the session.
            count: distinct sub-PRD results to wait for.
            timeout: seconds (float).

        Raises:
            ValueError: invalid arguments.
            ConsumerConflictError: another reader of this session is active.
        """
        out = await _results.collect_results(
            self.client, session_id, count, timeout, known=self._enqueued.get(session_id, ())
        )
        if out.complete:
            self._enqueued.pop(session_id, None)
        return out

    async def subscribe_to_results(self, session_id: str, handler: ResultHandler) -> ResultSubscription:
        """Call ``handler(result)`` (sync or async) for each result of the session.

        Each result is acknowledged (removed) after the handler returns; a handler
        exception retries it (3 tries, then it is dead-lettered, ``kind="result"``).

        Raises:
            ValueError: invalid session id.
            ConsumerConflictError: another reader of this session is active.
        """
        return await ResultSubscription(self.client, session_id, handler).start()

    async def list_dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters."""
        return await _dlq.list_dead_letters(self.client, limit)

    async def requeue_dead_letter(self, dead_letter_id: str) -> EnqueueReceipt:
        """Enqueue a dead letter's task again under a fresh id and delete the dead letter."""
        return await _dlq.requeue_dead_letter(self.client, dead_letter_id)


# -- the module-level functions on the default client (the spec's API) -------------

_queues: WeakKeyDictionary[NatsClient, WorkQueue] = WeakKeyDictionary()


def get_work_queue(client: NatsClient | None = None) -> WorkQueue:
    """The ``WorkQueue`` of ``client`` (default: the default client)."""
    c = client or get_client()
    wq = _queues.get(c)
    if wq is None:
        wq = _queues[c] = WorkQueue(c)
    return wq


async def enqueue_orchestrator_task(task: OrchestratorTask | Mapping[str, Any]) -> EnqueueReceipt:
    """``WorkQueue.enqueue_orchestrator_task`` on the default client."""
    return await get_work_queue().enqueue_orchestrator_task(task)


async def start_orchestrator_worker(handler: TaskHandler, **options: Any) -> StopFn:
    """``WorkQueue.start_orchestrator_worker`` on the default client."""
    return await get_work_queue().start_orchestrator_worker(handler, **options)


async def collect_results(session_id: str, count: int, timeout: float = 30.0) -> ResultSet:
    """``WorkQueue.collect_results`` on the default client (``timeout`` in seconds)."""
    return await get_work_queue().collect_results(session_id, count, timeout)


async def subscribe_to_results(session_id: str, handler: ResultHandler) -> ResultSubscription:
    """``WorkQueue.subscribe_to_results`` on the default client."""
    return await get_work_queue().subscribe_to_results(session_id, handler)


async def list_dead_letters(client: NatsClient, limit: int = 100) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters (for ``liquidcrypto dlq ls``)."""
    return await _dlq.list_dead_letters(client, limit)


async def requeue_dead_letter(client: NatsClient, dead_letter_id: str) -> EnqueueReceipt:
    """Re-enqueue dead letter ``dead_letter_id`` under a fresh id (``liquidcrypto dlq requeue``).

    Raises:
        DeadLetterNotFoundError: no such dead letter (a ``LookupError``).
        ValueError: the id is not a positive integer.
    """
    return await _dlq.requeue_dead_letter(client, dead_letter_id)


__all__ = [
    "WorkQueue",
    "collect_results",
    "enqueue_orchestrator_task",
    "get_work_queue",
    "list_dead_letters",
    "requeue_dead_letter",
    "start_orchestrator_worker",
    "subscribe_to_results",
]

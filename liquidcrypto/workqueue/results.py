"""Reading results: ``collect_results`` and ``subscribe_to_results``.

Results live on the work-queue stream ``ORCHESTRATOR_TASKS`` under
``orchestrator.results.{session}.{sub_prd}``. A reader is an ephemeral pull consumer
filtered on ``orchestrator.results.{session}.>``, which never overlaps the workers'
``orchestrator.tasks.>``. Consequences (documented in the README):

- one reader per session at a time (a second one waits, then ``ConsumerConflictError``);
- ``collect_results`` acknowledges — removes — the results only when it returns a
  complete set; a partial (timed-out) collection leaves them for the next call;
- ``subscribe_to_results`` acknowledges each result after its handler returned.

Both de-duplicate: a result message seen twice (redelivery, a second run after a
crash) is dropped by task id, and ``collect_results`` keeps one result per sub-PRD,
a success over a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from liquidcrypto.errors import ConsumerConflictError, InvalidPayloadError
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.subscription import call_handler
from liquidcrypto.workqueue import infra, metrics
from liquidcrypto.workqueue.models import ResultSet, TaskResult, decode_result
from liquidcrypto.workqueue.puller import PULL_EXPIRES, Puller

log = logging.getLogger(__name__)

ResultHandler = Callable[[TaskResult], Any]

INACTIVE_THRESHOLD = 10.0
CONFLICT_WAIT = INACTIVE_THRESHOLD + 2.0
MAX_BATCH = 1000
SUBSCRIPTION_WINDOW = 64
HANDLER_ATTEMPTS = 3
REMOVE_TIMEOUT = 5.0


class Reader:
    """An ephemeral pull consumer on one session's results, fed by a ``Puller``.

    Messages arrive through ``on_msg`` as soon as the server sends them. After a
    reconnect or the loss of the consumer, ``ensure()`` creates a new one; results that
    were delivered and not acknowledged come again from it.
    """

    def __init__(
        self, client: NatsClient, session_id: str, on_msg: Callable[[Msg], None], *, ack_wait: float
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.on_msg = on_msg
        self.ack_wait = ack_wait
        self.wake = asyncio.Event()
        self.name = ""
        self.puller: Puller | None = None
        self._reconnects = client.reconnects

    async def open(self, wait: float = CONFLICT_WAIT) -> None:
        """Create the consumer; a crashed reader's consumer lingers up to
        ``INACTIVE_THRESHOLD`` s, so retry creating it for up to ``wait`` s.

        Raises:
            ConsumerConflictError: another reader of the session stayed active.
        """
        filt = subjects.orchestrator_results(self.session_id)
        self.name = f"results-{uuid.uuid4().hex[:16]}"
        config = ConsumerConfig(
            name=self.name,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=-1,
            inactive_threshold=INACTIVE_THRESHOLD,
            # Replicas are inherited: a work-queue stream's consumers must match its own.
        )
        deadline = time.monotonic() + wait
        delay = 0.1
        while True:
            try:
                await self.client.js._jsm.add_consumer(infra.TASKS_STREAM, config)
                break
            except BadRequestError as exc:
                if exc.err_code != infra.ERR_WQ_OVERLAP:
                    raise
                if time.monotonic() + delay > deadline:
                    raise ConsumerConflictError(
                        f"another reader of session {self.session_id!r} is active ({filt!r} overlaps a "
                        f"consumer on {infra.TASKS_STREAM}); one collect_results/subscribe_to_results "
                        "per session at a time"
                    ) from exc
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        self.puller = Puller(self.client, infra.TASKS_STREAM, self.name, self.on_msg, self.wake.set)
        await self.puller.open()
        self._reconnects = self.client.reconnects

    @property
    def broken(self) -> bool:
        return self.puller is None or self.puller.consumer_gone or self.client.reconnects != self._reconnects

    async def request(self, want: int) -> None:
        """Keep up to ``want`` messages requested (a reconnect or lost consumer: reopen)."""
        if self.broken:
            await self.close()
            await self.open(wait=CONFLICT_WAIT)
        assert self.puller is not None
        self.puller.expire_stale()
        more = min(MAX_BATCH, want - self.puller.outstanding)
        if more > 0:
            await self.puller.request(more)

    async def wait(self, timeout: float) -> None:
        nxt = self.puller.seconds_to_next_deadline() if self.puller else None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.01, min(timeout, nxt if nxt is not None else timeout))):
                await self.wake.wait()
        self.wake.clear()

    async def close(self) -> None:
        puller, self.puller = self.puller, None
        if puller is not None:
            await puller.close()
        if not self.name:
            return
        try:
            await self.client.js._jsm.delete_consumer(infra.TASKS_STREAM, self.name)
        except JsNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - it expires by inactivity anyway
            log.debug("delete results consumer %s: %s", self.name, exc)


def _better(new: TaskResult, old: TaskResult | None) -> bool:
    return old is None or (new.success and not old.success)


async def pending_sub_prds(client: NatsClient, session_id: str) -> set[str]:
    """Sub-PRDs of the session whose task is still in ``ORCHESTRATOR_TASKS``."""
    prefix = f"{subjects.ORCHESTRATOR_TASKS}.{session_id}."
    try:
        info = await client.js._jsm.stream_info(infra.TASKS_STREAM, subjects_filter=prefix + ">")
    except Exception as exc:  # noqa: BLE001 - best effort, only for reporting
        log.debug("stream_info for missing sub-PRDs failed: %s", exc)
        return set()
    return {s[len(prefix) :] for s in (info.state.subjects or {})}


async def collect_results(
    client: NatsClient, session_id: str, count: int, timeout: float, *, known: Iterable[str] = ()
) -> ResultSet:
    """Results of a session, one per sub-PRD, as soon as ``count`` have arrived.

    Args:
        session_id: the session.
        count: how many distinct sub-PRD results to wait for.
        timeout: seconds to wait at most.
        known: sub-PRD ids known to be enqueued (reported in ``.missing``).

    Returns:
        a ``ResultSet`` (a list) with ``.complete`` and ``.missing``.

    Raises:
        ValueError: invalid session id, count or timeout.
        ConsumerConflictError: another reader of the session is active.
        NatsUnavailableError: NATS is not available.
    """
    subjects.token(session_id, "session_id")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive seconds, got {timeout}")
    deadline = time.monotonic() + timeout
    got: dict[str, TaskResult] = {}
    seen: set[str] = set()
    msgs: list[Msg] = []

    def on_msg(msg: Msg) -> None:
        msgs.append(msg)
        result = _read(msg, seen)
        if result is not None and _better(result, got.get(result.sub_prd_id)):
            got[result.sub_prd_id] = result
            if len(got) >= count:
                reader.wake.set()

    reader = Reader(client, session_id, on_msg, ack_wait=timeout + 30)
    complete = count == 0
    try:
        if not complete:
            await reader.open(wait=max(0.1, min(CONFLICT_WAIT, timeout)))
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if reader.broken:
                msgs.clear()  # unacknowledged, they come again from the new consumer
                seen.clear()
            try:
                await reader.request(count - len(got))
            except (ConsumerConflictError, ValueError):
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. reconnecting; retry until the deadline
                log.warning("collect_results(%s): pull failed (%s); retrying", session_id, exc)
                await asyncio.sleep(min(0.2, max(0.0, remaining)))
                continue
            await reader.wait(remaining)
        complete = len(got) >= count
        if complete and msgs:
            # Returned to the caller: now they leave the work-queue stream, confirmed by
            # the server before we return (a plain ack can still sit in the server's queue
            # when it shuts down, and the next collection would count the results again).
            await remove_results(client, msgs, session_id)
    finally:
        await reader.close()
    metrics.RESULTS_COLLECTED.inc(len(got))
    missing: set[str] = set()
    if not complete:
        missing = (await pending_sub_prds(client, session_id) | set(known)) - set(got)
        log.info("collect_results(%s): %d of %d after %gs; missing %s", session_id, len(got), count, timeout,
                 sorted(missing)[:20])
    return ResultSet(list(got.values()), session_id=session_id, expected=count, missing=sorted(missing))


async def remove_results(client: NatsClient, msgs: list[Msg], session_id: str) -> None:
    """Acknowledge collected results, confirmed by the server before returning.

    The server handles one consumer's acks in order, so plain acks followed by one
    double ack (``ack_sync``) of the last message confirm them all in one round trip.
    Without that confirmation (e.g. the reader's consumer was lost in a restart) the
    results are deleted by stream sequence instead. Logged, never raised: the caller has
    its results, and at worst a later collection of the session sees them again.
    """
    try:
        for msg in msgs[:-1]:
            await msg.ack()
        await msgs[-1].ack_sync(timeout=REMOVE_TIMEOUT)
        return
    except Exception as exc:  # noqa: BLE001 - fall back to deleting them
        log.info("collect_results(%s): acks not confirmed (%s); deleting the results", session_id, exc)
    deadline = time.monotonic() + REMOVE_TIMEOUT
    seqs = [msg.metadata.sequence.stream for msg in msgs]
    while seqs:
        try:
            await client.js._jsm.delete_msg(infra.TASKS_STREAM, seqs[-1])
        except (BadRequestError, JsNotFoundError) as exc:
            log.debug("result seq %d already removed: %s", seqs[-1], exc)  # its ack did arrive
        except Exception as exc:  # noqa: BLE001 - e.g. reconnecting; retry until the deadline
            if time.monotonic() > deadline:
                log.warning("collect_results(%s): %d results not removed (%s); a later collection of the "
                            "session sees them again", session_id, len(seqs), exc)
                return
            await asyncio.sleep(0.1)
            continue
        seqs.pop()


def _read(msg: Msg, seen: set[str] | OrderedDict[str, None]) -> TaskResult | None:
    """Decode a result message; ``None`` for a duplicate or an unreadable one (logged)."""
    headers = msg.headers or {}
    rid = headers.get(hdr.MSG_ID) or f"seq{msg.metadata.sequence.stream}"
    if rid in seen:
        metrics.DUPLICATE_RESULTS.inc()
        return None
    try:
        result = decode_result(msg.data)
    except InvalidPayloadError as exc:
        log.warning("unreadable result on %s skipped: %s", msg.subject, exc)
        return None
    if isinstance(seen, OrderedDict):
        seen[rid] = None
        while len(seen) > 100_000:
            seen.popitem(last=False)
    else:
        seen.add(rid)
    return result


class ResultSubscription:
    """A running ``subscribe_to_results``; ``await unsubscribe()`` to stop it."""

    def __init__(self, client: NatsClient, session_id: str, handler: ResultHandler) -> None:
        self.client = client
        self.session_id = subjects.token(session_id, "session_id")
        self.subject = subjects.orchestrator_results(session_id)
        self._handler = handler
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._reader = Reader(client, session_id, self._queue.put_nowait, ack_wait=30.0)
        self._pull: asyncio.Task[None] | None = None
        self._deliver: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.closed = False
        self.delivered = 0

    @property
    def active(self) -> bool:
        return self._pull is not None and not self._pull.done() and not self.closed

    async def start(self) -> ResultSubscription:
        await self._reader.open()
        self._pull = asyncio.create_task(self._pull_loop(), name=f"wq-results-pull-{self.session_id}")
        self._deliver = asyncio.create_task(self._deliver_loop(), name=f"wq-results-{self.session_id}")
        return self

    async def unsubscribe(self) -> None:
        """Stop and delete the reader; idempotent. Undelivered results stay in the stream."""
        if self.closed:
            return
        self.closed = True
        for task in (self._pull, self._deliver):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._reader.close()

    drain = unsubscribe

    async def _pull_loop(self) -> None:
        """Keep a window of results requested; the handler's pace sets the flow."""
        failures = 0
        while not self.closed:
            try:
                await self._reader.request(max(0, SUBSCRIPTION_WINDOW - self._queue.qsize()))
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - outlive outages; the reader is re-created
                if self.client.state is ConnectionState.CLOSED:
                    log.warning("results of %s: client closed before unsubscribe()", self.session_id)
                    return
                failures += 1
                log.warning("results of %s: pull failed (%s); retrying", self.session_id, exc)
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                continue
            await self._reader.wait(PULL_EXPIRES)

    async def _deliver_loop(self) -> None:
        while True:
            msg = await self._queue.get()
            try:
                await self._deliver_one(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("results of %s: delivery failed", self.session_id)
            self._reader.wake.set()

    async def _deliver_one(self, msg: Msg) -> None:
        result = _read(msg, self._seen)
        if result is not None:
            try:
                await call_handler(self._handler, result)
            except Exception:
                rid = (msg.headers or {}).get(hdr.MSG_ID)
                self._seen.pop(rid or "", None)
                if msg.metadata.num_delivered < HANDLER_ATTEMPTS:
                    log.exception("results handler of %s failed; retrying the result", self.session_id)
                    await msg.nak(delay=0.5)
                    return
                log.exception("results handler of %s failed %d times; result %s acknowledged",
                              self.session_id, HANDLER_ATTEMPTS, rid)
            self.delivered += 1
        await msg.ack()

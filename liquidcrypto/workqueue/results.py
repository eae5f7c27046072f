"""Results: publishing a task's result (the worker), ``collect_results`` and ``subscribe_to_results``.

Results live on the work-queue stream ``ORCHESTRATOR_TASKS`` under
``orchestrator.results.{session}.{sub_prd}``, each stored once per task
(``Nats-Msg-Id = result.{task_id}``). A reader is an ephemeral pull consumer filtered on
``orchestrator.results.{session}.>`` (which never overlaps the workers'
``orchestrator.tasks.>``), read through a ``PullConsumer``. Consequences (documented in
the README):

- one reader per session at a time (a second one waits, then ``ConsumerConflictError``);
- ``collect_results`` acknowledges — removes — the results only when it returns a
  complete set; a partial (timed-out) collection leaves them for the next call;
- ``subscribe_to_results`` acknowledges each result after its handler returned; a result
  its handler failed on ``HANDLER_ATTEMPTS`` times, that cannot be read, or whose body
  names another session/sub-PRD than its subject, is dead-lettered (``ORCHESTRATOR_DLQ``,
  ``kind="result"``) before it is acknowledged (terminated and logged at error if the
  dead-letter stream refuses it); ``collect_results`` skips the last two kinds.

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

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from liquidcrypto.errors import ConsumerConflictError, InvalidPayloadError, LiquidNatsError, NatsUnavailableError
from liquidcrypto.nats import failures, subjects
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.pull import PullConsumer
from liquidcrypto.nats.subscription import MsgHandler, as_async
from liquidcrypto.workqueue import dead_letters, infra, metrics
from liquidcrypto.workqueue.models import DeadLetter, ResultSet, TaskResult, decode_result

log = logging.getLogger(__name__)

ResultHandler = Callable[[TaskResult], Any]

INACTIVE_THRESHOLD = 10.0
CONFLICT_WAIT = INACTIVE_THRESHOLD + 2.0
SUBSCRIPTION_WINDOW = 64
SUBSCRIPTION_ACK_WAIT = 30.0
HANDLER_ATTEMPTS = 3
REMOVE_TIMEOUT = 5.0
PUBLISH_ATTEMPTS = 3
STORED_SCAN_LIMIT = 16  # results on one sub-PRD's subject looked at, at most


async def publish_result(client: NatsClient, result: TaskResult, task_id: str, *, ttl: float | None = None) -> bool:
    """Store a task's result once per task id (``Nats-Msg-Id = result.{task_id}``),
    whoever runs the task and however often; retried while NATS is unavailable.

    Args:
        ttl: seconds the result stays if nobody collects it (``Nats-TTL``; the stream
            must allow per-message TTLs, see ``infra.usable_ttl``); ``None``: until collected.

    Returns:
        whether the stream stored it (or already had it).
    """
    headers = infra.result_headers(task_id, ttl=ttl)
    payload = result.encode()
    for attempt in range(PUBLISH_ATTEMPTS):
        try:
            await client.js_publish_raw(result.subject, payload, headers)
            return True
        except NatsUnavailableError as exc:
            log.warning("result of %s not stored (%s); attempt %d/%d", task_id, exc, attempt + 1, PUBLISH_ATTEMPTS)
            await asyncio.sleep(0.2 * 2**attempt)
    return False


async def result_stored(client: NatsClient, subject: str, task_id: str) -> bool:
    """Whether ``ORCHESTRATOR_TASKS`` holds the result of ``task_id`` on ``subject`` now.

    For a task that may have run before (a redelivery) or whose result id the stream's
    de-duplication window may have forgotten. A result already collected (acknowledged,
    hence removed) is not seen. The last message on the subject is looked at first; the
    rest only when another result follows it (a requeued run's). Errors are logged and
    answer False: the caller runs or publishes, as it would have without the check.
    """
    wanted = infra.result_msg_id(task_id)
    js = client.js
    try:
        last = await js.get_last_msg(infra.TASKS_STREAM, subject)
        if (last.headers or {}).get(hdr.MSG_ID) == wanted:
            return True
        seq = 1
        for _ in range(STORED_SCAN_LIMIT):
            raw = await js.get_msg(infra.TASKS_STREAM, seq=seq, subject=subject, next=True)
            if raw.seq is None or raw.seq >= (last.seq or 0):
                return False
            if (raw.headers or {}).get(hdr.MSG_ID) == wanted:
                return True
            seq = raw.seq + 1
    except JsNotFoundError:
        return False
    except Exception as exc:  # noqa: BLE001 - cannot tell: behave as without the check
        log.warning("could not look for the stored result of %s on %s: %s", task_id, subject, exc)
    return False


class ResultReader:
    """An ephemeral pull consumer on one session's results, read by a ``PullConsumer``.

    After a reconnect or the loss of the consumer it deletes the old consumer and creates
    a new one; results that were delivered and not acknowledged come again from it
    (``on_rebind`` runs first, so the owner forgets what it held).
    """

    def __init__(
        self,
        client: NatsClient,
        session_id: str,
        handler: MsgHandler,
        *,
        ack_wait: float,
        capacity: int,
        on_rebind: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.session_id = session_id
        self.ack_wait = ack_wait
        self.name = ""
        self._on_rebind = on_rebind
        self._conflict_wait = CONFLICT_WAIT
        self.pull = PullConsumer(
            client,
            infra.TASKS_STREAM,
            handler,
            self._create,
            capacity=capacity,
            ack_wait=ack_wait,
            name=f"results of {session_id}",
        )

    async def open(self, wait: float = CONFLICT_WAIT) -> None:
        """Create the consumer and start reading; a crashed reader's consumer lingers up
        to ``INACTIVE_THRESHOLD`` s, so creating it is retried for up to ``wait`` s.

        Raises:
            ConsumerConflictError: another reader of the session stayed active.
            NatsUnavailableError: NATS is not available.
        """
        self._conflict_wait = wait
        try:
            await self.pull.start(require_nats=True)
        finally:
            self._conflict_wait = CONFLICT_WAIT

    async def stop(self) -> None:
        """Stop reading (queued results are handed back); the consumer stays until ``close()``."""
        await self.pull.stop(linger=False)  # close() deletes the consumer and all it holds

    async def close(self) -> None:
        await self.stop()
        await self._delete()

    async def _create(self) -> ConsumerInfo:
        if self.name:  # a reconnect or a lost consumer: start afresh
            await self._delete()
            if self._on_rebind is not None:
                self._on_rebind()
        filt = subjects.orchestrator_results(self.session_id)
        name = f"results-{uuid.uuid4().hex[:16]}"
        config = ConsumerConfig(
            name=name,
            filter_subject=filt,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.ack_wait,
            max_ack_pending=-1,
            inactive_threshold=INACTIVE_THRESHOLD,
            # Replicas are inherited: a work-queue stream's consumers must match its own.
        )
        deadline = time.monotonic() + self._conflict_wait
        delay = 0.1
        # Named before asking: a request that timed out may still have made it (a cluster
        # electing leaders), and the next attempt deletes it first instead of conflicting.
        self.name = name
        while True:
            try:
                info = await self.client.js.add_consumer(infra.TASKS_STREAM, config)
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
        return info

    async def _delete(self) -> None:
        name, self.name = self.name, ""
        if not name:
            return
        try:
            await self.client.js.delete_consumer(infra.TASKS_STREAM, name)
        except JsNotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - it expires by inactivity anyway
            log.debug("delete results consumer %s: %s", name, exc)


def _better(new: TaskResult, old: TaskResult | None) -> bool:
    return old is None or (new.success and not old.success)


async def pending_sub_prds(client: NatsClient, session_id: str) -> set[str]:
    """Sub-PRDs of the session whose task is still in ``ORCHESTRATOR_TASKS``."""
    prefix = f"{subjects.ORCHESTRATOR_TASKS}.{session_id}."
    try:
        info = await client.js.stream_info(infra.TASKS_STREAM, subjects_filter=prefix + ">")
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
        timeout: seconds to wait at most, waiting for the connection and for JetStream
            included (a process started during a reconnect or a leader election).
        known: sub-PRD ids known to be enqueued (reported in ``.missing``).

    Returns:
        a ``ResultSet`` (a list) with ``.complete`` and ``.missing``.

    Raises:
        ValueError: invalid session id, count or timeout.
        ConsumerConflictError: another reader of the session is active.
        NatsUnavailableError: NATS or JetStream not available within ``timeout``.
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
    done = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        msgs.append(msg)
        result = _read(msg, seen)
        if result is not None and _better(result, got.get(result.sub_prd_id)):
            got[result.sub_prd_id] = result
        # Hold (unacknowledged) no more than the distinct results still missing.
        reader.pull.capacity = max(0, count - len(got))
        if len(got) >= count:
            done.set()

    def on_rebind() -> None:
        msgs.clear()  # unacknowledged, they come again from the new consumer
        seen.clear()

    reader = ResultReader(client, session_id, on_msg, ack_wait=timeout + 30, capacity=count, on_rebind=on_rebind)
    complete = count == 0
    try:
        if not complete:
            await _open_within(client, reader, deadline)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await done.wait()
            await reader.stop()
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
        log.info(
            "collect_results(%s): %d of %d after %gs; missing %s",
            session_id,
            len(got),
            count,
            timeout,
            sorted(missing)[:20],
        )
    return ResultSet(list(got.values()), session_id=session_id, expected=count, missing=sorted(missing))


async def _open_within(client: NatsClient, reader: ResultReader, deadline: float) -> None:
    """Open ``reader`` by the monotonic ``deadline``: wait for the connection and for
    JetStream (a reconnect, a cluster electing its leaders) and retry while JetStream
    does not answer, instead of failing at once.

    Raises:
        NatsUnavailableError: not connected, or JetStream not answering, by ``deadline``.
        ConsumerConflictError: another reader of the session stayed active.
    """
    delay = 0.1
    while True:
        if not client.is_connected:
            await client.wait_connected(max(0.0, deadline - time.monotonic()))
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(0.0, left)):
                await reader.open(wait=max(0.1, min(CONFLICT_WAIT, left)))
            return
        except (NatsUnavailableError, nats.errors.Error, TimeoutError) as exc:
            if failures.refused(exc):
                raise
            if time.monotonic() + delay >= deadline:
                if isinstance(exc, NatsUnavailableError):
                    raise
                raise NatsUnavailableError(
                    f"collect_results({reader.session_id!r}): JetStream did not answer in time ({exc!r})"
                ) from exc
            log.info("collect_results(%s): JetStream not answering yet (%r); retrying", reader.session_id, exc)
        await asyncio.sleep(delay)
        delay = min(1.0, delay * 2)


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
            await client.js.delete_msg(infra.TASKS_STREAM, seqs[-1])
        except (BadRequestError, JsNotFoundError) as exc:
            log.debug("result seq %d already removed: %s", seqs[-1], exc)  # its ack did arrive
        except Exception as exc:  # noqa: BLE001 - e.g. reconnecting; retry until the deadline
            if time.monotonic() > deadline:
                log.warning(
                    "collect_results(%s): %d results not removed (%s); a later collection of the "
                    "session sees them again",
                    session_id,
                    len(seqs),
                    exc,
                )
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
    if result.subject != msg.subject:
        log.warning("result skipped: %s", _misplaced(result, msg.subject))
        return None
    if isinstance(seen, OrderedDict):
        _remember(seen, rid)
    else:
        seen.add(rid)
    return result


def _misplaced(result: TaskResult, subject: str) -> str:
    return (f"result names session/sub-PRD {result.session_id}/{result.sub_prd_id} but was sent on {subject!r}; "
            "not delivered")


def _remember(seen: OrderedDict[str, None], rid: str) -> None:
    seen[rid] = None
    while len(seen) > 100_000:
        seen.popitem(last=False)


class ResultSubscription:
    """A running ``subscribe_to_results``; ``await unsubscribe()`` to stop it.

    Up to ``SUBSCRIPTION_WINDOW`` results are held (requested or waiting); the handler
    runs for one at a time, so its pace sets the flow.
    """

    def __init__(self, client: NatsClient, session_id: str, handler: ResultHandler) -> None:
        self.client = client
        self.session_id = subjects.token(session_id, "session_id")
        self.subject = subjects.orchestrator_results(session_id)
        self._handler = handler
        self._run_handler = as_async(handler)  # a plain handler runs in a thread
        self._reader = ResultReader(
            client, session_id, self._deliver_one, ack_wait=SUBSCRIPTION_ACK_WAIT, capacity=SUBSCRIPTION_WINDOW
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.closed = False
        self.delivered = 0

    @property
    def active(self) -> bool:
        return self._reader.pull.running and not self.closed

    async def start(self) -> ResultSubscription:
        """Create the reader and start delivering.

        Raises:
            ConsumerConflictError: another reader of the session stayed active.
        """
        await infra.ensure(self.client)  # the dead-letter stream, for results its handler fails on
        await self._reader.open()
        return self

    async def unsubscribe(self) -> None:
        """Stop (a running handler may finish, up to 5 s) and delete the reader; idempotent.
        Undelivered results stay in the stream."""
        if self.closed:
            return
        self.closed = True
        await self._reader.close()

    drain = unsubscribe

    async def _deliver_one(self, msg: Msg) -> None:
        headers = msg.headers or {}
        rid = headers.get(hdr.MSG_ID) or f"seq{msg.metadata.sequence.stream}"
        if rid in self._seen:  # delivered already (a redelivery, a second run)
            metrics.DUPLICATE_RESULTS.inc()
            await msg.ack()
            return
        try:
            result = decode_result(msg.data)
        except InvalidPayloadError as exc:
            log.warning("unreadable result on %s: %s", msg.subject, exc)
            await self._dead_letter(msg, rid, None, 1, f"unreadable result: {exc}")
            return
        if result.subject != msg.subject:  # the subject is the authority: never delivered as another's
            error = _misplaced(result, msg.subject)
            log.warning("result dead-lettered: %s", error)
            await self._dead_letter(msg, rid, None, 1, error)
            return
        try:
            await self._run_handler(result)
        except Exception as exc:
            attempts = msg.metadata.num_delivered
            if attempts < HANDLER_ATTEMPTS:
                log.exception(
                    "results handler of %s failed on %s (attempt %d of %d); retrying the result",
                    self.session_id,
                    rid,
                    attempts,
                    HANDLER_ATTEMPTS,
                )
                await msg.nak(delay=0.5)
                return
            log.exception(
                "results handler of %s failed on %s %d times; dead-lettering the result", self.session_id, rid, attempts
            )
            await self._dead_letter(msg, rid, result, attempts, f"{type(exc).__name__}: {exc}")
            return
        _remember(self._seen, rid)
        self.delivered += 1
        await msg.ack()

    async def _dead_letter(self, msg: Msg, rid: str, result: TaskResult | None, attempts: int, error: str) -> None:
        """Keep the result in ``ORCHESTRATOR_DLQ``, then acknowledge it; if it cannot be
        stored there, leave it for redelivery (never acknowledged and lost)."""
        headers = msg.headers or {}
        letter = DeadLetter(
            kind="result", task=result.to_wire() if result is not None else dead_letters.raw_text(msg.data),
            task_id=headers.get(hdr.TASK_ID) or rid, subject=msg.subject, attempts=attempts, last_error=error,
        )
        try:
            # One letter per stored result message, however often it is redelivered.
            await dead_letters.publish_dead_letter(
                self.client, letter, msg_id=f"dlq.result.{msg.metadata.sequence.stream}", raw=msg.data
            )
            await msg.ack_sync(timeout=REMOVE_TIMEOUT)
        except dead_letters.POISON_ERRORS as exc:
            metrics.RESULTS_TERMINATED.inc()
            log.error("result %s on %r (%d bytes) cannot be dead-lettered (%s: %s); terminated, it will not be "
                      "redelivered. It was given up because: %s",
                      rid, msg.subject[:300], len(msg.data), type(exc).__name__, exc, error)
            with contextlib.suppress(LiquidNatsError, nats.errors.Error, TimeoutError):
                await msg.term()
            return
        except (LiquidNatsError, nats.errors.Error, TimeoutError) as exc:
            log.error("could not dead-letter result %s of %s (%s); it will be redelivered", rid, self.session_id, exc)
            with contextlib.suppress(LiquidNatsError, nats.errors.Error, TimeoutError):
                await msg.nak(delay=1.0)
            return
        _remember(self._seen, rid)

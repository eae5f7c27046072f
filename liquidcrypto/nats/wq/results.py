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
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from liquidcrypto.errors import ConsumerConflictError, InvalidPayloadError
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient, call_handler
from liquidcrypto.nats.wq import infra, metrics
from liquidcrypto.nats.wq.models import ResultSet, TaskResult, decode_result

log = logging.getLogger(__name__)

ResultHandler = Callable[[TaskResult], Any]

INACTIVE_THRESHOLD = 10.0
CONFLICT_WAIT = INACTIVE_THRESHOLD + 2.0
FETCH_BATCH = 256
FETCH_TIMEOUT = 1.0
HANDLER_ATTEMPTS = 3


async def open_reader(
    client: NatsClient, session_id: str, *, ack_wait: float, wait: float = CONFLICT_WAIT
) -> tuple[JetStreamContext.PullSubscription, str]:
    """An ephemeral pull consumer on one session's results, and its name.

    A consumer of a crashed reader lingers up to ``INACTIVE_THRESHOLD`` s; while
    creating conflicts, retry for up to ``wait`` s.

    Raises:
        ConsumerConflictError: another reader of the session stayed active.
    """
    filt = subjects.orchestrator_results(session_id)
    name = f"results-{uuid.uuid4().hex[:16]}"
    config = ConsumerConfig(
        name=name,
        filter_subject=filt,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait,
        max_ack_pending=-1,
        inactive_threshold=INACTIVE_THRESHOLD,
        num_replicas=1,
        mem_storage=True,
    )
    js = client.js
    deadline = time.monotonic() + wait
    delay = 0.1
    while True:
        try:
            await js._jsm.add_consumer(infra.TASKS_STREAM, config)
            break
        except BadRequestError as exc:
            if exc.err_code != infra.ERR_WQ_OVERLAP:
                raise
            if time.monotonic() + delay > deadline:
                raise ConsumerConflictError(
                    f"another reader of session {session_id!r} is active ({filt!r} overlaps a consumer on "
                    f"{infra.TASKS_STREAM}); one collect_results/subscribe_to_results per session at a time"
                ) from exc
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
    return await js.pull_subscribe_bind(name, stream=infra.TASKS_STREAM), name


async def close_reader(client: NatsClient, psub: JetStreamContext.PullSubscription | None, name: str) -> None:
    if psub is not None:
        try:
            await psub.unsubscribe()
        except Exception as exc:  # noqa: BLE001 - closing must not raise
            log.debug("results unsubscribe: %s", exc)
    try:
        await client.js._jsm.delete_consumer(infra.TASKS_STREAM, name)
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
    psub: JetStreamContext.PullSubscription | None = None
    psub, name = await open_reader(
        client, session_id, ack_wait=timeout + 30, wait=max(0.1, min(CONFLICT_WAIT, timeout))
    )
    try:
        while len(got) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                if psub is None:
                    psub, name = await open_reader(client, session_id, ack_wait=timeout + 30, wait=remaining)
                want = max(1, min(FETCH_BATCH, count - len(got)))
                batch = await psub.fetch(want, timeout=max(0.05, min(remaining, FETCH_TIMEOUT)))
            except TimeoutError:
                continue
            except (ConsumerConflictError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. a server restart lost the reader
                log.warning("collect_results(%s): fetch failed (%s); re-creating the reader", session_id, exc)
                old, psub = psub, None
                await close_reader(client, old, name)
                msgs.clear()  # their acks would go to the old consumer; they come again
                await asyncio.sleep(0.2)
                continue
            for msg in batch:
                msgs.append(msg)
                result = _read(msg, seen)
                if result is not None and _better(result, got.get(result.sub_prd_id)):
                    got[result.sub_prd_id] = result
        complete = len(got) >= count
        if complete:
            # Returned to the caller: now they may leave the work-queue stream.
            for msg in msgs:
                await msg.ack()
            await client.nc.flush()
    finally:
        await close_reader(client, psub, name)
    metrics.RESULTS_COLLECTED.inc(len(got))
    missing: set[str] = set()
    if not complete:
        missing = (await pending_sub_prds(client, session_id) | set(known)) - set(got)
        log.info("collect_results(%s): %d of %d after %gs; missing %s", session_id, len(got), count, timeout,
                 sorted(missing)[:20])
    return ResultSet(list(got.values()), session_id=session_id, expected=count, missing=sorted(missing))


def _read(msg: Msg, seen: set[str] | OrderedDict[str, None]) -> TaskResult | None:
    """Decode a result message; ``None`` for a duplicate or an unreadable one (logged)."""
    headers = msg.headers or {}
    rid = headers.get(infra.HDR_MSG_ID) or f"seq{msg.metadata.sequence.stream}"
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
        self._psub: JetStreamContext.PullSubscription | None = None
        self._name = ""
        self._task: asyncio.Task[None] | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.closed = False
        self.delivered = 0

    @property
    def active(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> ResultSubscription:
        self._psub, self._name = await open_reader(self.client, self.session_id, ack_wait=30.0)
        self._task = asyncio.create_task(self._run(), name=f"wq-results-{self.session_id}")
        return self

    async def unsubscribe(self) -> None:
        """Stop and delete the reader; idempotent."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await close_reader(self.client, self._psub, self._name)
        self._psub = None

    drain = unsubscribe

    async def _run(self) -> None:
        failures = 0
        while not self.closed:
            try:
                if self._psub is None:
                    self._psub, self._name = await open_reader(self.client, self.session_id, ack_wait=30.0)
                batch = await self._psub.fetch(64, timeout=FETCH_TIMEOUT)
            except TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - outlive outages; re-create the reader
                failures += 1
                log.warning("results of %s: fetch failed (%s); re-creating the reader", self.session_id, exc)
                old, self._psub = self._psub, None
                await close_reader(self.client, old, self._name)
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                continue
            failures = 0
            for msg in batch:
                await self._deliver(msg)

    async def _deliver(self, msg: Msg) -> None:
        result = _read(msg, self._seen)
        if result is not None:
            try:
                await call_handler(self._handler, result)
            except Exception:
                rid = (msg.headers or {}).get(infra.HDR_MSG_ID)
                self._seen.pop(rid or "", None)
                if msg.metadata.num_delivered < HANDLER_ATTEMPTS:
                    log.exception("results handler of %s failed; retrying the result", self.session_id)
                    await msg.nak(delay=0.5)
                    return
                log.exception("results handler of %s failed %d times; result %s acknowledged",
                              self.session_id, HANDLER_ATTEMPTS, rid)
            self.delivered += 1
        await msg.ack()

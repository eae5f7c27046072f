"""The orchestrator worker: one pull loop, ``concurrency`` handler slots, exactly-once in effect.

Per task: run the handler, publish its result with ``Nats-Msg-Id = result.{task_id}``,
then double-ack (``ack_sync``). Pull requests ask for exactly the free slots (running +
queued + requested <= concurrency), so a busy worker never holds tasks another worker
could run; each slot asks for the next task as soon as it finishes, and the slots' result
publishes and double acks overlap. A heartbeat sends ``in_progress()`` for every running
task every ``ack_wait/2``. A failed run is counted in the attempts bucket and ``nak``-ed
with a back-off delay; after ``max_deliver`` failures the task gets a failure result and
a dead letter, then is acknowledged."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from liquidcrypto import codec
from liquidcrypto.errors import InvalidPayloadError, InvalidTaskError, LiquidNatsError, NatsUnavailableError
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.subscription import call_handler
from liquidcrypto.workqueue import dead_letters, infra, metrics
from liquidcrypto.workqueue.enqueue import store
from liquidcrypto.workqueue.models import DeadLetter, OrchestratorTask, TaskResult, coerce_result, decode_task
from liquidcrypto.workqueue.puller import PULL_EXPIRES, Puller

log = logging.getLogger(__name__)

TaskHandler = Callable[[OrchestratorTask], Any]
StopFn = Callable[..., Awaitable[None]]

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
DEFAULT_BACKOFF: tuple[float, ...] = (1.0, 5.0, 30.0)
DEFAULT_STOP_TIMEOUT = 30.0
DECLINE_DELAY = 1.0
_HANDED_BACK = metrics.TASKS_DONE.labels(outcome="handed_back")


class Worker:
    """One ``start_orchestrator_worker``: a fetch loop feeding ``concurrency`` handler slots."""

    def __init__(
        self,
        client: NatsClient,
        handler: TaskHandler,
        *,
        concurrency: int = 1,
        specialist: str | None = None,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        decline_delay: float = DECLINE_DELAY,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if ack_wait <= 0.2:
            raise ValueError(f"ack_wait must be more than 0.2 s, got {ack_wait}")
        if max_deliver < 1:
            raise ValueError(f"max_deliver must be at least 1, got {max_deliver}")
        if any(b < 0 for b in backoff):
            raise ValueError(f"backoff delays must not be negative, got {list(backoff)}")
        self.client = client
        self.handler = handler
        self.concurrency = concurrency
        self.specialist = specialist
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.backoff = tuple(backoff) or (0.0,)
        self.stop_timeout = stop_timeout
        self.decline_delay = decline_delay
        self._puller: Puller | None = None
        self._kv: KeyValue | None = None
        self._heartbeat_every = ack_wait / 2
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._busy: dict[int, tuple[Msg, float]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._rebind = False
        self._loop: asyncio.Task[None] | None = None
        self._slots: list[asyncio.Task[None]] = []
        self._handbacks: set[asyncio.Task[None]] = set()
        self._heartbeat: asyncio.Task[None] | None = None
        self.processed = 0
        self.handed_back = 0

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> StopFn:
        """Provision and bind, then run; returns ``stop``.

        With the client in degraded mode (NATS down) the worker starts anyway and binds
        when the client connects.

        Raises:
            ConsumerConflictError: another consumer overlaps ``orchestrator.tasks.>``.
        """
        try:
            await self._bind()
        except NatsUnavailableError as exc:
            # Degraded mode: the pull loop binds as soon as the client connects.
            log.warning("orchestrator worker waiting for NATS (%s)", exc)
            self._rebind = True
        self.client.on_connect(self._on_reconnect)
        self._wake.set()
        self._slots = [asyncio.create_task(self._slot(i), name=f"wq-slot-{i}") for i in range(self.concurrency)]
        self._loop = asyncio.create_task(self._pull_loop(), name="wq-pull")
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="wq-heartbeat")
        log.info(
            "orchestrator worker started: concurrency=%d specialist=%s ack_wait=%gs max_deliver=%d",
            self.concurrency, self.specialist or "*", self.ack_wait, self.max_deliver,
        )
        return self.stop

    async def stop(self, timeout: float | None = None) -> None:
        """Stop pulling, let running tasks finish (up to ``timeout`` s), nak the rest.

        Unfinished tasks are ``nak``-ed so another worker takes them at once; a task
        that still arrives for an open pull request is handed back the same way.
        Idempotent.
        """
        if self._stopping:
            if self._loop is not None:
                await asyncio.gather(self._loop, return_exceptions=True)
            return
        self._stopping = True
        self.client.remove_on_connect(self._on_reconnect)
        self._wake.set()
        if self._loop is not None:
            await asyncio.gather(self._loop, return_exceptions=True)
        wait = self.stop_timeout if timeout is None else timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._idle.wait()
        if self._busy:
            log.warning("worker stop: %d task(s) unfinished; handed back for redelivery", len(self._busy))
        for slot in self._slots:  # a running handler is cancelled and its task nak-ed
            slot.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
        while not self._queue.empty():
            self._hand_back(self._queue.get_nowait())
        # Open pull requests expire within PULL_EXPIRES; keep the inbox until then and hand
        # back what they still deliver (e.g. a task nak-ed above), rather than leave it in
        # a dead inbox until ack_wait runs out.
        deadline = time.monotonic() + PULL_EXPIRES + 0.5
        while self._puller is not None and self._puller.outstanding and time.monotonic() < deadline:
            self._puller.expire_stale()
            await asyncio.sleep(0.05)
        await asyncio.gather(*self._handbacks, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        if self._puller is not None:
            await self._puller.close()
            self._puller = None
        log.info("orchestrator worker stopped after %d task(s)", self.processed)

    async def _on_reconnect(self, client: NatsClient) -> None:
        # The server may have lost our pull requests (and, per nats.py #504, a pull
        # subscription can go silent after a restart): bind afresh.
        self._rebind = True
        self._wake.set()

    async def _bind(self) -> None:
        js = self.client.js
        s = self.client.settings
        await dead_letters.ensure(self.client)
        self._kv = await infra.ensure_attempts_bucket(js, s.js_replicas)
        info = await infra.ensure_worker_consumer(js, self.ack_wait)
        actual = info.config.ack_wait or self.ack_wait
        self._heartbeat_every = max(0.1, min(self.ack_wait, actual) / 2)
        if self._puller is None:
            puller = Puller(self.client, infra.TASKS_STREAM, infra.WORKER_CONSUMER, self._arrived, self._wake.set)
            await puller.open()
            self._puller = puller
        else:
            # nats-py restores the inbox subscription on reconnect; the server may have
            # lost our pull requests, so ask again. Requests that survived a mere blip
            # still deliver here (they wait in the queue for a slot), never to a dead
            # inbox where they would wait out ack_wait.
            self._puller.reset()
            self._puller.consumer_gone = False
        self._rebind = False

    # -- the loops -------------------------------------------------------------

    def _free(self) -> int:
        """Slots neither running, nor promised to a queued or requested message."""
        outstanding = self._puller.outstanding if self._puller is not None else 0
        return self.concurrency - len(self._busy) - self._queue.qsize() - outstanding

    async def _top_up(self) -> None:
        """Request exactly the free slots (the accounting is updated before any await)."""
        if self._puller is not None and not self._stopping and not self._rebind:
            self._puller.expire_stale()
            free = self._free()
            if free > 0:
                await self._puller.request(free)

    async def _pull_loop(self) -> None:
        """(Re)bind and top up after expired requests; slots top up after each task."""
        failures = 0
        while not self._stopping:
            puller = self._puller
            timeout = (puller.seconds_to_next_deadline() if puller else None) or PULL_EXPIRES
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                if self._rebind or self._puller is None or self._puller.consumer_gone:
                    await self._bind()
                    metrics.CONSUMER_REBINDS.inc()
                await self._top_up()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must outlive outages
                if self.client.state is ConnectionState.CLOSED:
                    log.warning("orchestrator worker: client closed before stop(); no longer pulling")
                    break
                failures += 1
                self._rebind = True
                delay = min(2.0, 0.1 * 2**failures)
                (log.warning if failures == 1 else log.debug)(
                    "worker pull failed (%s); binding again in %.1fs", exc, delay
                )
                await asyncio.sleep(delay)
                self._wake.set()

    def _arrived(self, msg: Msg) -> None:
        """A task message for one of our pull requests: queue it for a slot.

        Without a slot for it (a pull request that outlived a reconnect delivered more than
        the free slots) it is handed back at once, never held while another worker idles.
        """
        if self._stopping:
            self._hand_back(msg)
        elif len(self._busy) + self._queue.qsize() >= self.concurrency:
            log.debug("task arrived with no free slot; handed back")
            _HANDED_BACK.inc()
            self.handed_back += 1
            self._hand_back(msg)
        else:
            self._queue.put_nowait(msg)

    def _hand_back(self, msg: Msg) -> None:
        task = asyncio.create_task(_hand_back(msg), name="wq-hand-back")
        self._handbacks.add(task)
        task.add_done_callback(self._handbacks.discard)

    async def _slot(self, index: int) -> None:
        """One handler slot: take a queued task, run it, ask for the next."""
        while True:
            msg = await self._queue.get()
            if self._stopping:
                self._hand_back(msg)
                continue
            self._busy[index] = (msg, time.monotonic())
            self._idle.clear()
            metrics.IN_FLIGHT.inc()
            try:
                await self._run_one(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("worker slot %d: task processing crashed", index)
            finally:
                del self._busy[index]
                metrics.IN_FLIGHT.dec()
                if not self._busy:
                    self._idle.set()
            try:
                await self._top_up()
            except Exception as exc:  # noqa: BLE001 - the pull loop retries and rebinds
                log.debug("top-up after a task failed: %s", exc)
                self._wake.set()

    async def _heartbeat_loop(self) -> None:
        """Every ``ack_wait/2``: ``in_progress`` for every running task, so the server's
        ack timer of a task is never older than half its ``ack_wait``."""
        while True:
            await asyncio.sleep(self._heartbeat_every)
            for msg, _started in list(self._busy.values()):
                try:
                    await msg.in_progress()
                except Exception as exc:  # noqa: BLE001 - the next beat retries
                    log.debug("in_progress failed: %s", exc)

    # -- one task ----------------------------------------------------------------

    async def _run_one(self, msg: Msg) -> None:
        try:
            await self._process(msg)
        except asyncio.CancelledError:
            # Stopped before finishing: hand it back at once (not counted as a failure).
            try:
                await msg.nak()
            except Exception as exc:  # noqa: BLE001
                log.debug("nak on stop failed: %s", exc)
            raise

    async def _process(self, msg: Msg) -> None:
        md = msg.metadata
        headers = msg.headers or {}
        task_id = headers.get(hdr.MSG_ID) or f"seq{md.sequence.stream}"
        try:
            task = decode_task(msg.data)
        except (InvalidPayloadError, InvalidTaskError, ValueError) as exc:
            await self._give_up(msg, None, task_id, 1, f"malformed task: {exc}", outcome="invalid")
            return
        if self.specialist is not None and task.specialist != self.specialist:
            metrics.TASKS_DONE.labels(outcome="declined").inc()
            await msg.nak(delay=self.decline_delay)
            return
        redelivered = md.num_delivered > 1
        if redelivered and not await self._may_run(msg, task, task_id):
            return
        started = time.perf_counter()
        try:
            value = await call_handler(self.handler, task)
        except asyncio.CancelledError:
            raise
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
        if not await self._publish_result(result, task_id):
            await msg.nak(delay=self.backoff[0])
            return
        try:
            await msg.ack_sync(timeout=5.0)
        except Exception as exc:  # noqa: BLE001 - a redelivery re-publishes the same result id
            log.warning("double ack of task %s failed (%s); a redelivery will be de-duplicated", task_id, exc)
            return
        self.processed += 1
        (metrics.OK if result.success else metrics.FAILED).inc()

    async def _may_run(self, msg: Msg, task: OrchestratorTask, task_id: str) -> bool:
        """For a redelivered task: False (and dead-lettered) if ``max_deliver`` earlier
        runs never finished — workers died or lost it while running it."""
        assert self._kv is not None
        try:
            state, ok = await infra.record_start(self._kv, task_id, limit=self.max_deliver)
        except Exception as exc:  # noqa: BLE001 - cannot tell; run it
            log.warning("could not record the start of %s (%s); running it", task_id, exc)
            return True
        if not ok:
            await self._give_up(
                msg, task, task_id, state.failures + state.unfinished,
                f"{state.unfinished} runs never finished (the worker died, lost its connection or "
                f"exceeded ack_wait={self.ack_wait:g}s without heartbeats)",
            )
        return ok

    async def _failed(
        self, msg: Msg, task: OrchestratorTask, task_id: str, exc: Exception, redelivered: bool
    ) -> None:
        error = f"{type(exc).__name__}: {exc}"
        assert self._kv is not None
        try:
            attempts = (await infra.record_failure(self._kv, task_id, redelivered=redelivered)).failures
        except Exception as kv_exc:  # noqa: BLE001 - fall back to the server's delivery count
            log.warning("could not count failure of %s (%s); using delivery count", task_id, kv_exc)
            attempts = msg.metadata.num_delivered
        if attempts >= self.max_deliver:
            log.warning("task %s failed %d time(s), giving up: %s", task_id, attempts, error)
            await self._give_up(msg, task, task_id, attempts, error)
            return
        delay = self.backoff[min(attempts - 1, len(self.backoff) - 1)]
        log.info(
            "task %s failed (attempt %d/%d), retry in %gs: %s",
            task_id, attempts, self.max_deliver, delay, error,
        )
        metrics.TASKS_DONE.labels(outcome="retry").inc()
        await msg.nak(delay=delay)

    async def _give_up(
        self, msg: Msg, task: OrchestratorTask | None, task_id: str, attempts: int, error: str,
        *, outcome: str = "failure",
    ) -> None:
        """Failure result + dead letter, then acknowledge; on any error leave it for redelivery."""
        tokens = msg.subject.split(".")
        raw_task: Any = task.to_wire() if task is not None else _raw_body(msg.data)
        try:
            if task is not None or len(tokens) == 4:
                sid, pid = (task.session_id, task.sub_prd_id) if task is not None else (tokens[2], tokens[3])
                failure = TaskResult(session_id=sid, sub_prd_id=pid, success=False, error=error)
                if not await self._publish_result(failure, task_id):
                    await msg.nak(delay=self.backoff[0])
                    return
            letter = DeadLetter(
                task=raw_task, task_id=task_id, subject=msg.subject, attempts=attempts, last_error=error
            )
            await dead_letters.publish_dead_letter(self.client, letter)
            await msg.ack_sync(timeout=5.0)
        except (LiquidNatsError, ValueError, nats.errors.Error, TimeoutError) as exc:
            log.error("could not dead-letter task %s (%s); it will be redelivered", task_id, exc)
            return
        self.processed += 1
        metrics.TASKS_DONE.labels(outcome=outcome).inc()

    async def _publish_result(self, result: TaskResult, task_id: str) -> bool:
        for attempt in range(3):
            try:
                await store(
                    self.client, result.subject, result.encode(), infra.result_msg_id(task_id),
                    {hdr.TASK_ID: task_id},
                )
                return True
            except NatsUnavailableError as exc:
                log.warning("result of %s not stored (%s); attempt %d/3", task_id, exc, attempt + 1)
                await asyncio.sleep(0.2 * 2**attempt)
        return False


async def _hand_back(msg: Msg) -> None:
    try:
        await msg.nak()
    except Exception as exc:  # noqa: BLE001 - it is redelivered after ack_wait anyway
        log.debug("nak while stopping failed: %s", exc)


def _raw_body(data: bytes) -> Any:
    try:
        return codec.decode(data)
    except InvalidPayloadError:
        return data[:4096].decode("utf-8", errors="replace")

"""``PullConsumer``: the one way the package consumes a JetStream pull consumer.

The work-queue worker, the work-queue result readers and A2A durable subscriptions all
read JetStream through it. What it does, and why:

- **Capacity-bounded pulls.** nats-py's ``fetch(n)`` waits for all ``n`` messages (or its
  timeout) once the first has arrived, so a consumer with free handlers would sit on
  delivered messages; and coroutines sharing one pull subscription are slow (four
  fetching on one fell to ~0.5k msgs/s). ``PullConsumer`` sends the JetStream pull
  requests itself (``$JS.API.CONSUMER.MSG.NEXT``, ``batch`` = free capacity, short
  ``expires``) on one private inbox and queues each message for a handler slot the
  moment it arrives. It counts what was requested and not yet delivered, so it never
  holds more than ``capacity`` messages: requested + queued + running <= capacity. A
  message that arrives without room (a request that outlived a reconnect) is handed
  back at once (``nak``), never held while another consumer idles.
- **Handler slots.** ``concurrency`` slots take queued messages in arrival order; each
  asks for more as soon as its handler returns, so round trips of concurrent messages
  overlap. The handler settles its message (ack, nak, term) itself.
- **Heartbeats.** Every ``ack_wait / heartbeats`` seconds each message held (running, or
  queued for a slot) gets ``in_progress()``, so a long handler keeps its message and
  what waits behind it is not redelivered elsewhere meanwhile (it would run twice).
- **Reconnects and restarts.** After every (re)connection, and when the server says
  the consumer is gone, the owner's ``bind`` runs again (creating or checking the
  consumer) and the open requests are forgotten and asked for afresh: pull
  subscriptions have gone silent after a server restart (nats.py #504). A request
  whose end never came is forgotten after its expiry plus a grace. No ``fetch``
  heartbeats (nats.py #986, #794).
- **Clean stop.** ``stop()`` stops pulling, lets running handlers finish up to a
  timeout, then cancels them and hands their messages back with ``nak``, as it does
  with queued ones and with those that still arrive for open requests (it keeps the
  inbox until they expire), so another consumer takes them at once instead of after
  ``ack_wait``.
- **Never idle in silence.** A failure to bind or pull is retried with back-off; while
  it repeats it is logged at error level (``nats.failures.Retries``: at most every 30 s,
  with the count). A permanent one — a conflicting consumer, our own code failing
  (``AttributeError``/``TypeError``... as after a nats-py upgrade), or JetStream
  refusing to create the consumer for 30 s — stops the consumer: ``failure`` holds the
  error, ``wait()`` raises it, ``on_failure`` is called and it is logged at error level.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum

import nats.errors
import nats.js.errors
import orjson
from nats.aio.msg import Msg
from nats.js.api import DEFAULT_PREFIX, ConsumerInfo

from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.failures import PROGRAMMING_ERRORS, Retries, is_permanent
from liquidcrypto.nats.subscription import MsgHandler, Subscription
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

_ACK_PREFIX = "$JS.ACK."  # the reply subject of every message a consumer delivers

Bind = Callable[[], Awaitable[ConsumerInfo]]

PULL_EXPIRES = 1.0
"""Seconds a pull request waits on the server: an idle consumer asks again this often."""
GRACE = 2.0
"""A request whose end never came (lost in a reconnect) is forgotten this long after it expired."""
MAX_BATCH = 1000
"""The largest single pull request."""
_FLUSH_ERRORS = (nats.errors.Error, nats.js.errors.Error, NatsUnavailableError, TimeoutError)


class PullState(StrEnum):
    """Where a ``PullConsumer`` stands."""

    NEW = "new"
    RUNNING = "running"
    RETRYING = "retrying"
    """binding or pulling fails, and is retried"""
    FAILED = "failed"
    """stopped by a permanent error (``failure``)"""
    STOPPED = "stopped"


class PullConsumer:
    """One JetStream pull consumer read by ``concurrency`` handler slots (see the module doc).

    ``bind`` is the owner's: it creates or checks the consumer and returns its
    ``ConsumerInfo`` (the name and ``ack_wait`` are taken from it); it runs at start,
    after every (re)connection and when the consumer was lost.
    """

    def __init__(
        self,
        client: NatsClient,
        stream: str,
        handler: MsgHandler,
        bind: Bind,
        *,
        capacity: int,
        concurrency: int = 1,
        ack_wait: float,
        heartbeats: int = 2,
        stop_timeout: float = 5.0,
        name: str = "pull consumer",
        on_overflow: Callable[[], None] | None = None,
        expires: float = PULL_EXPIRES,
        on_failure: Callable[[BaseException], None] | None = None,
        permanent: Callable[[BaseException], bool] = is_permanent,
    ) -> None:
        """
        Args:
            client: the connection.
            stream: the stream of the consumer.
            handler: ``await handler(msg)`` per message; it acks/naks/terms the message.
                An exception is logged and leaves the message for redelivery.
            bind: creates or checks the consumer; returns its ``ConsumerInfo``.
            capacity: messages held at most (requested + queued + running); the owner
                may lower ``capacity`` as it goes (a reader that needs fewer).
            concurrency: handlers running at once (at most ``capacity`` are ever busy).
            ack_wait: the owner's ``ack_wait``; heartbeats follow the smaller of it and
                the consumer's.
            heartbeats: ``in_progress()`` beats per ``ack_wait`` for each message held.
            stop_timeout: how long ``stop()`` waits for running handlers by default.
            name: for logs and task names.
            on_overflow: called for each message handed back because it arrived with no room.
            expires: seconds each pull request waits on the server.
            on_failure: called once with the error that stopped it for good.
            permanent: which errors of binding or pulling stop it for good.
        """
        if capacity < 0 or concurrency < 1:
            raise ValueError(f"capacity must be >= 0 and concurrency >= 1, got {capacity} and {concurrency}")
        self.client = client
        self.stream = stream
        self.capacity = capacity
        self.concurrency = concurrency
        self.ack_wait = ack_wait
        self.heartbeats = heartbeats
        self.stop_timeout = stop_timeout
        self.name = name
        self.expires = expires
        self._handler = handler
        self._bind_consumer = bind
        self._on_overflow = on_overflow
        self._on_failure = on_failure
        self._retries = Retries(name, permanent)
        self.failure: BaseException | None = None
        self.consumer = ""
        self.handed_back = 0
        self._heartbeat_every = max(0.05, ack_wait / heartbeats)
        self._next_subject = ""
        self._inbox_sub: Subscription | None = None
        # FIFO of [still expected, forget-after deadline], one per pull request.
        self._requests: collections.deque[list[float]] = collections.deque()
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._queued: dict[int, Msg] = {}  # the queue's messages by id(), for heartbeats
        self._busy: dict[int, Msg] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._wake = asyncio.Event()
        self._rebind = True
        self._consumer_gone = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._stopper: asyncio.Task[object] | None = None
        self._tasks = TaskSet(name)
        self._loop: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._slots: list[asyncio.Task[None]] = []

    # -- state -----------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Messages requested and not yet delivered or expired."""
        return int(sum(r[0] for r in self._requests))

    @property
    def running(self) -> bool:
        """Whether it pulls (started, not stopped, its loop alive)."""
        return self._loop is not None and not self._loop.done() and not self._stopping

    @property
    def stopping(self) -> bool:
        """Whether ``stop()`` was called (or a permanent error stopped it)."""
        return self._stopping

    @property
    def last_error(self) -> BaseException | None:
        """The error of binding or pulling while it is being retried (``None`` once it works)."""
        return self._retries.last_error

    @property
    def state(self) -> PullState:
        if self.failure is not None:
            return PullState.FAILED
        if self._stopping:
            return PullState.STOPPED
        if self._loop is None:
            return PullState.NEW
        return PullState.RETRYING if self.last_error is not None else PullState.RUNNING

    async def wait(self) -> None:
        """Wait until it has stopped.

        Raises:
            Exception: the permanent error that stopped it (``failure``).
        """
        await self._stopped.wait()
        if self.failure is not None:
            raise self.failure

    # -- lifecycle -------------------------------------------------------------

    async def start(self, *, require_nats: bool = False) -> None:
        """Bind (at once when connected, else when the client connects) and start pulling.

        Args:
            require_nats: bind now whatever the connection's state, and raise what
                binding raises, ``NatsUnavailableError`` included.

        Raises:
            Exception: what ``bind`` raised while NATS was available (a conflicting
                consumer, say); nothing was started then.
        """
        if require_nats:
            await self._bind()
        elif self.client.is_connected:
            try:
                await self._bind()
            except NatsUnavailableError as exc:
                log.warning("%s: waiting for NATS (%s)", self.name, exc)
        else:
            log.info("%s: waiting for NATS to bind", self.name)
        self.client.on_connect(self._on_connect)
        self._slots = [self._tasks.spawn(self._slot(i), f"slot-{i}") for i in range(self.concurrency)]
        self._loop = self._tasks.spawn(self._pull_loop(), "pull")
        self._heartbeat = self._tasks.spawn(self._heartbeat_loop(), "in-progress")
        self._wake.set()

    async def stop(self, timeout: float | None = None, *, linger: bool = True) -> None:
        """Stop pulling, let running handlers finish (up to ``timeout`` s), nak the rest.

        Unfinished and queued messages are ``nak``-ed so another consumer takes them at
        once. With ``linger`` the inbox is kept until the open requests expired (at most
        ``expires`` + 0.5 s) and what they still deliver is handed back the same way; an
        owner that deletes the consumer next passes ``linger=False``. A handler may call
        ``stop()``: its own run is neither awaited nor cancelled. Idempotent.
        """
        if self._stopping:
            if asyncio.current_task() not in self._slots:
                await self._stopped.wait()
            return
        self._stopping = True
        self.client.remove_on_connect(self._on_connect)
        self._wake.set()
        if self._loop is not None:
            await asyncio.gather(self._loop, return_exceptions=True)
        self._stopper = asyncio.current_task()
        if not self._settled():
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stop_timeout if timeout is None else timeout):
                    await self._idle.wait()
        if not self._settled():
            log.warning("%s: stopping with %d message(s) unfinished; handed back", self.name, len(self._busy))
        others = [slot for slot in self._slots if slot is not self._stopper]
        for slot in others:  # a running handler is cancelled and its message nak-ed
            slot.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        while not self._queue.empty():
            await _hand_back(self._take())
        if linger:
            await self._linger()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        sub, self._inbox_sub = self._inbox_sub, None
        if sub is not None:
            await sub.unsubscribe()
        if self.client.is_connected:
            with contextlib.suppress(*_FLUSH_ERRORS):
                await self.client.flush(2)  # acks and naks reach the server before we return
        self._requests.clear()
        self._stopped.set()

    async def _linger(self) -> None:
        deadline = time.monotonic() + self.expires + 0.5
        while self.outstanding and self.client.state is not ConnectionState.CLOSED:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.25)):
                    await self._wake.wait()
            self._expire_stale()

    def _settled(self) -> bool:
        """No handler runs but the one that called ``stop()``."""
        return all(self._slots[i] is self._stopper for i in self._busy)

    async def _on_connect(self, client: NatsClient) -> None:
        # The server may have lost our pull requests (and a pull subscription can go
        # silent after a restart, nats.py #504): bind again and ask afresh.
        self._rebind = True
        self._wake.set()

    async def _bind(self) -> None:
        info = await self._bind_consumer()
        self.consumer = info.name
        self._next_subject = f"{DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{self.stream}.{info.name}"
        server_ack_wait = info.config.ack_wait or self.ack_wait
        self._heartbeat_every = max(0.05, min(self.ack_wait, server_ack_wait) / self.heartbeats)
        if self._inbox_sub is None:
            # Restored by nats-py after a reconnect: requests that survived a mere blip
            # still deliver here (and wait for a slot), never to a dead inbox.
            self._inbox_sub = await self.client.subscribe_msgs(self.client.nc.new_inbox(), self._on_msg)
        self._requests.clear()
        self._consumer_gone = False
        self._rebind = False

    # -- pulling ---------------------------------------------------------------

    async def request(self, batch: int) -> None:
        """Ask for up to ``batch`` more messages, delivered within ``expires`` seconds."""
        assert self._inbox_sub is not None, "request() before the consumer was bound"
        body = orjson.dumps({"batch": batch, "expires": int(self.expires * 1e9)})
        # Counted before the await, so concurrent callers never ask twice for one slot.
        entry = [float(batch), time.monotonic() + self.expires + GRACE]
        self._requests.append(entry)
        try:
            await self.client.nc.publish(self._next_subject, body, reply=self._inbox_sub.subject)
        except BaseException:
            if entry in self._requests:
                self._requests.remove(entry)
            raise

    async def _top_up(self) -> None:
        """Request exactly the free capacity (the accounting is updated before any await)."""
        if self._stopping or self._rebind or self._inbox_sub is None:
            return
        self._expire_stale()
        free = self.capacity - len(self._busy) - self._queue.qsize() - self.outstanding
        if free > 0:
            await self.request(min(free, MAX_BATCH))

    async def _pull_loop(self) -> None:
        """(Re)bind when needed and top up after expired requests; slots top up after each message."""
        while not self._stopping:
            due = self._seconds_to_next_deadline()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.expires if due is None else due):
                    await self._wake.wait()
            self._wake.clear()
            if self._stopping:
                break
            try:
                if self._rebind or self._consumer_gone:
                    await self._bind()
                await self._top_up()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop must outlive outages
                if self.client.state is ConnectionState.CLOSED:
                    log.warning("%s: client closed before stop(); no longer pulling", self.name)
                    break
                delay = self._retries.failed(exc)  # logged there, loudly while it repeats
                if delay is None:
                    self._fail(exc)
                    break
                self._rebind = True
                await asyncio.sleep(delay)
                self._wake.set()
            else:
                self._retries.succeeded()

    def _fail(self, exc: BaseException) -> None:
        """Stop for good on a permanent error, loudly."""
        self.failure = exc
        log.error("%s: stopped by a permanent error: %r", self.name, exc, exc_info=exc)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:
                log.exception("%s: on_failure callback failed", self.name)
        if not self._stopping:
            self._tasks.spawn(self.stop(), "stop-on-failure")

    def _expire_stale(self) -> None:
        now = time.monotonic()
        while self._requests and self._requests[0][1] < now:
            self._requests.popleft()

    def _seconds_to_next_deadline(self) -> float | None:
        if not self._requests:
            return None
        return max(0.0, self._requests[0][1] - time.monotonic())

    def _release(self, n: int) -> None:
        while n > 0 and self._requests:
            head = self._requests[0]
            take = min(n, int(head[0]))
            head[0] -= take
            n -= take
            if head[0] <= 0:
                self._requests.popleft()
                self._wake.set()  # a request is complete: the loop may ask for more

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply.startswith(_ACK_PREFIX):
            # A delivery, whatever its headers: a stored message may carry a Status header
            # of its own (any publisher can set one); only the server's replies lack $JS.ACK.
            self._release(1)
            await self._arrived(msg)
            return
        status = msg.headers.get(hdr.STATUS) if msg.headers else None
        if not status:
            # Not from JetStream: anyone who learns the inbox could send a "message"
            # whose reply names any subject ($JS.API...), which an ack would publish to.
            log.warning("%s: dropped a message on the inbox that JetStream did not send", self.name)
            return
        if status == "100":  # idle heartbeat
            return
        headers = msg.headers or {}
        pending = headers.get(hdr.PENDING_MESSAGES)
        if pending is not None and pending.isdigit():
            self._release(int(pending))
        elif self._requests:
            self._requests.popleft()
        desc = headers.get(hdr.DESCRIPTION, "")
        if status == "503":
            # No responders: JetStream is not there (a restart, a leader election). Bind
            # again before asking more, with the loop's back-off while that fails.
            log.debug("%s: pull request unanswered (503); binding again", self.name)
            self._rebind = True
        elif status == "409" or (status == "404" and "consumer" in desc.lower()):
            if "Deleted" in desc or "push" in desc or "not found" in desc.lower():
                self._consumer_gone = True
            if "Exceeded" in desc:
                log.warning("%s: pull request refused: %s", self.name, desc)
            else:
                log.info("%s: pull request ended: %s %s", self.name, status, desc)
        self._wake.set()

    async def _arrived(self, msg: Msg) -> None:
        """Queue a message for a slot, or hand it back when there is no room for it."""
        if self._stopping:
            await _hand_back(msg)
        elif len(self._busy) + self._queue.qsize() >= self.capacity:
            log.debug("%s: message arrived with no room; handed back", self.name)
            self.handed_back += 1
            if self._on_overflow is not None:
                self._on_overflow()
            await _hand_back(msg)
        else:
            self._queued[id(msg)] = msg
            self._queue.put_nowait(msg)

    # -- handling --------------------------------------------------------------

    async def _slot(self, index: int) -> None:
        """One handler slot: take a queued message, run the handler, ask for more."""
        while not self._stopping:
            msg = await self._queue.get()
            del self._queued[id(msg)]
            if self._stopping:
                await _hand_back(msg)
                break
            self._busy[index] = msg
            try:
                await self._handler(msg)
            except asyncio.CancelledError:
                if not msg.is_acked:  # stopped before finishing: hand it back at once
                    await _hand_back(msg)
                raise
            except Exception:
                log.exception("%s: handler failed on %s; left for redelivery", self.name, msg.subject)
            finally:
                del self._busy[index]
                if self._stopping and self._settled():
                    self._idle.set()
            try:
                await self._top_up()
            except Exception as exc:  # noqa: BLE001 - the pull loop retries and rebinds
                log.debug("%s: top-up after a message failed: %s", self.name, exc)
                self._wake.set()

    def _take(self) -> Msg:
        msg = self._queue.get_nowait()
        del self._queued[id(msg)]
        return msg

    async def _heartbeat_loop(self) -> None:
        """``in_progress``, ``heartbeats`` times per ``ack_wait``, for every message held:
        running, and queued for a slot (held messages are this consumer's; redelivered
        elsewhere meanwhile, they would run twice)."""
        while True:
            await asyncio.sleep(self._heartbeat_every)
            for msg in [*self._busy.values(), *self._queued.values()]:
                if msg.is_acked:
                    continue
                try:
                    await msg.in_progress()
                except PROGRAMMING_ERRORS as exc:  # no heartbeat will ever work: held messages would run twice
                    self._fail(exc)
                    return
                except Exception as exc:  # noqa: BLE001 - the next beat retries
                    log.debug("%s: in_progress failed: %s", self.name, exc)


async def _hand_back(msg: Msg) -> None:
    try:
        await msg.nak()
    except Exception as exc:  # noqa: BLE001 - it is redelivered after ack_wait anyway
        log.debug("nak of a handed-back message failed: %s", exc)

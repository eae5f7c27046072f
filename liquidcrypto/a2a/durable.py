"""Durable task subscriptions: a JetStream pull consumer on ``A2A_TASKS``.

One named durable consumer per ``durable=`` name, filtered on the subscription's
pattern. It lives on the server, so a subscriber that stops (or crashes) and comes back
with the same name receives what was published meanwhile, in order. Several processes
using the same name share the consumer: each message goes to one of them (the queue
group of the durable world).

Per message: decode the envelope (a bad one is logged and *terminated*, so it is never
redelivered); if it may have been handled before, look up its mark and, if found, ``ack``
it without running the handler; run the handler; store its mark; then ``ack``.

Once in effect: the mark (key ``{durable}.{stream sequence}`` in the ``A2A_HANDLED``
bucket, value the task id, kept as long as the stream keeps tasks) is stored, and
confirmed by JetStream, before the ack is sent, so a delivery that repeats a handled task
finds it: an ack lost with a crashed server or a dropped connection, a process that died
between the mark and the ack. Looked up are redeliveries (``num_delivered > 1``) and
messages at or below the *horizon*: the stream's last sequence when the subscription last
bound (at start and after every reconnection) and the highest sequence it handled. The
horizon is needed because a nats-server that is killed loses what it had not written of
its consumers' state and delivers those messages again with ``num_delivered`` 1. A first
delivery above the horizon (the steady state) is not looked up. A failing mark or look-up
(NATS down, JetStream not answering yet) is retried until it answers or ``stop()``, the
message kept and the later ones waiting. The ack is a plain one: a double ack to a server
that restarted and lost the delivery is never answered, and a lost ack is harmless here.

A handler that raises is retried *in place*
after a growing delay (``nak_delay``), up to ``max_deliver`` attempts in all, after which
the message is terminated and counted. The message is kept (``in_progress()``) meanwhile
and the messages behind it wait: a subscriber handles its messages in stream order, a
retried one included (a ``nak`` with a delay would let later messages overtake it). A
long handler keeps its message the same way, so ``ack_wait`` does not expire under it.
A process that dies leaves its message unacked: the server redelivers it after
``ack_wait``, possibly after later messages were handled by another subscriber of the
same durable (the order guarantee is per subscriber, see ``docs/a2a.md``). The consumer is read
through ``liquidcrypto.nats.pull.PullConsumer`` (bounded pulls, heartbeats, re-binding
after reconnects, a clean stop).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.kv import KeyValue

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a import metrics
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.a2a.kv import open_bucket
from liquidcrypto.a2a.replies import run_handler
from liquidcrypto.errors import InvalidPayloadError, NatsUnavailableError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.failures import Retries
from liquidcrypto.nats.pull import PullConsumer

log = logging.getLogger(__name__)

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
DEFAULT_BATCH = 32
STOP_TIMEOUT = 5.0
STOP_GRACE = 2.0
"""Seconds a stopping subscription still waits for a mark or a look-up under way while
NATS is connected."""
_RETRY_CAP = 5.0
_KEY_TOKEN = re.compile(r"^[-_=a-zA-Z0-9]+$")


def nak_delay(attempt: int) -> float:
    """Delay before retrying after the ``attempt``-th failure: 0.1 s doubling, 5 s cap."""
    return float(min(_RETRY_CAP, 0.1 * 2 ** max(0, attempt - 1)))


class DurableSubscription:
    """A running durable consumer; ``stop()`` ends it (the consumer stays).

    Messages come from a ``PullConsumer`` holding up to ``batch`` of them, handled one at
    a time in stream order.
    """

    def __init__(
        self,
        client: NatsClient,
        *,
        durable: str,
        filter_subject: str,
        handler: Callable[[Envelope], Any],
        batch: int = DEFAULT_BATCH,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
    ) -> None:
        self.client = client
        self.durable = durable
        self.subject = filter_subject
        self._handler = handler
        self.batch = batch
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.handled = 0
        self.since = datetime.now(UTC)
        self._stopping = asyncio.Event()  # cuts a retry's wait short
        self._marks: KeyValue | None = None  # A2A_HANDLED, bound at every bind
        self._mark_prefix = mark_prefix(durable)
        # Stream sequences up to here may have been handled before (see _process).
        self._horizon = 0
        self._check_all = False
        # One handler at a time keeps the stream's order; a quarter of ack_wait between
        # heartbeats marks a running message well before its ack_wait runs out, whatever
        # the phase of the beat relative to the handler's start.
        self._pull = PullConsumer(
            client,
            streams.A2A_TASKS,
            self._process,
            self._bind,
            capacity=batch,
            concurrency=1,
            ack_wait=ack_wait,
            heartbeats=4,
            stop_timeout=STOP_TIMEOUT,
            name=f"durable {durable} on {filter_subject}",
        )

    @property
    def closed(self) -> bool:
        return self._pull.stopping

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=self.durable,
            durable_name=self.durable,
            description=f"A2A durable task subscription on {self.subject}",
            filter_subject=self.subject,
            # From when subscribe_to_tasks was called, even if NATS was down then and the
            # consumer is only created on connection: tasks sent meanwhile are not lost.
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=self.since,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            max_ack_pending=max(1000, self.batch * 4),
        )

    async def ensure_consumer(self) -> ConsumerInfo:
        """Create the durable consumer if missing; refuse to re-point an existing one.

        Returns:
            the consumer's info.

        Raises:
            ValueError: a consumer of that name exists with another filter subject.
        """
        js = self.client.js
        try:
            info: ConsumerInfo = await js.consumer_info(streams.A2A_TASKS, self.durable)
        except nats.js.errors.NotFoundError:
            created: ConsumerInfo = await js.add_consumer(streams.A2A_TASKS, self.consumer_config())
            log.info("created durable consumer %s on %s", self.durable, self.subject)
            return created
        have = info.config.filter_subject
        if have != self.subject:
            raise ValueError(
                f"durable {self.durable!r} already consumes {have!r}, not {self.subject!r}; "
                "use another name or delete it with A2ABus.delete_durable()"
            )
        return info

    async def start(self) -> None:
        """Create or check the consumer and start (binding in the background if degraded).

        Raises:
            ValueError: the durable name is in use with another filter subject.
        """
        await self._pull.start()

    async def _bind(self) -> ConsumerInfo:
        """The ``PullConsumer``'s bind (at start and after every reconnection): the
        consumer, the handled-marks bucket, and the horizon of messages to check."""
        info = await self.ensure_consumer()
        self._marks = await open_bucket(self.client, streams.A2A_HANDLED)
        try:
            stream = await self.client.js.stream_info(streams.A2A_TASKS)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            # Without the horizon every delivery is checked: slower, never twice.
            if not self._check_all:
                log.warning("durable %s: cannot read the A2A_TASKS stream (%s); checking every task", self.durable, exc)
            self._check_all = True
        else:
            # A server that crashed may deliver again, as if for the first time, what it
            # had delivered before: everything stored before this bind is checked.
            self._horizon = max(self._horizon, stream.state.last_seq or 0)
            self._check_all = False
        return info

    def _mark_key(self, msg: Msg) -> str:
        return f"{self._mark_prefix}.{msg.metadata.sequence.stream}"

    async def _process(self, msg: Msg) -> None:
        try:
            envelope = env_mod.decode(msg.data, msg.subject, msg.headers)
        except InvalidPayloadError as exc:
            metrics.SKIPPED.labels("durable").inc()
            log.warning("durable %s: terminating bad message on %s: %s", self.durable, msg.subject, exc)
            await _quietly(msg.term(), "term")
            return
        md = msg.metadata
        attempt = md.num_delivered or 1
        if attempt > 1:
            metrics.REDELIVERIES.inc()
        seq = md.sequence.stream
        # Only a message that may have been handled before pays for the look-up: one
        # delivered again, or one stored before the last (re)connection or at or below
        # the highest this subscription handled (a server that lost its consumer's
        # state delivers those again as first deliveries).
        maybe_repeat = attempt > 1 or self._check_all or seq <= self._horizon
        self._horizon = max(self._horizon, seq)
        if maybe_repeat:
            try:
                done = await self._retrying(lambda: self._handled_before(msg, envelope), "look up", envelope)
            except _Stopped:
                return  # left unacknowledged: redelivered to whoever comes next
            if done:
                metrics.ALREADY_HANDLED.inc()
                log.info(
                    "durable %s: task %.80r (%s) was handled already; acknowledged", self.durable, envelope.id, seq
                )
                await self._ack(msg, envelope)
                return
        while not await self._attempt(msg, envelope, attempt):
            if attempt >= self.max_deliver:
                metrics.GAVE_UP.inc()
                log.error(
                    "durable %s: giving up on task %.80r (%s) after %d attempts; terminated",
                    self.durable,
                    envelope.id,
                    msg.subject,
                    attempt,
                )
                await _quietly(msg.term(), "term")
                return
            # Retried here, the message kept: later messages must not overtake it.
            delay = nak_delay(attempt)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                attempt += 1
                continue
            await _quietly(msg.nak(), "nak")  # stopping: another subscriber takes it now
            return
        metrics.RECEIVED_COUNTS["durable"] += 1
        self.handled += 1
        # The mark is stored before the ack: a redelivery (an ack lost with a crashed
        # server, or a process that died before its ack) finds it and is not run again.
        try:
            await self._retrying(lambda: self._mark(msg, envelope), "mark as handled", envelope)
        except (_Stopped, asyncio.CancelledError) as exc:
            log.warning(
                "durable %s: task %.80r (%s) was handled but its mark could not be stored before stop(); "
                "if the ack is lost too, it runs again",
                self.durable,
                envelope.id,
                seq,
            )
            if isinstance(exc, asyncio.CancelledError):
                # stop() ran out of time: ack it rather than let it be handed back (nak) and run again.
                await self._ack(msg, envelope)
                raise
        await self._ack(msg, envelope)

    async def _attempt(self, msg: Msg, envelope: Envelope, attempt: int) -> bool:
        """Run the handler once; whether it returned (a failure is logged and counted)."""
        started = time.perf_counter()
        try:
            await run_handler(self._handler, envelope, self.client, msg.subject)
        except Exception:
            metrics.HANDLER_ERRORS.labels("durable").inc()
            log.exception(
                "durable %s: handler failed on %s (task %.80r), attempt %d of %d",
                self.durable,
                msg.subject,
                envelope.id,
                attempt,
                self.max_deliver,
            )
            return False
        finally:
            metrics.HANDLER_SECONDS.observe(time.perf_counter() - started)
        return True

    async def _handled_before(self, msg: Msg, envelope: Envelope) -> bool:
        """Whether this message's mark is in ``A2A_HANDLED`` (a value naming another task
        id is a stream that was recreated since: not this message)."""
        assert self._marks is not None
        try:
            entry = await self._marks.get(self._mark_key(msg))
        except nats.js.errors.KeyNotFoundError:
            return False
        return entry.value == _mark_value(envelope)

    async def _mark(self, msg: Msg, envelope: Envelope) -> bool:
        assert self._marks is not None
        await self._marks.put(self._mark_key(msg), _mark_value(envelope))
        return True

    async def _retrying(self, op: Callable[[], Awaitable[bool]], what: str, envelope: Envelope) -> bool:
        """``op()`` until it answers (the message kept meanwhile, later ones waiting).

        NATS unreachable, a server restarting, JetStream not answering yet: retried with
        back-off, logged at error level while it lasts (``Retries``). A retry binds the
        bucket again first (and so re-creates it if it was deleted).

        Raises:
            _Stopped: ``stop()`` was called before it answered.
        """
        retries = Retries(f"durable {self.durable}: {what} task {envelope.id[:80]!r}", _never_permanent)

        async def attempt() -> bool:
            if retries.count or self._marks is None:
                self._marks = await open_bucket(self.client, streams.A2A_HANDLED)
            return await op()

        while True:
            try:
                result = await self._unless_stopping(attempt())
            except _TRANSIENT as exc:
                delay = retries.failed(exc) or _RETRY_CAP
            else:
                retries.succeeded()
                return result
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
            except TimeoutError:
                continue
            raise _Stopped

    async def _unless_stopping(self, coro: Awaitable[bool]) -> bool:
        """``await coro``, cut short by ``stop()`` when NATS is not connected (an attempt
        then waits out the JetStream timeout); while connected, a stopping subscription
        still gives it ``STOP_GRACE`` seconds.

        Raises:
            _Stopped: ``stop()`` was called and the attempt did not answer in time.
        """
        attempt = asyncio.ensure_future(coro)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait((attempt, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not attempt.done() and self.client.is_connected:
                await asyncio.wait((attempt,), timeout=STOP_GRACE)
        finally:
            stopping.cancel()
            if not attempt.done():
                attempt.cancel()
                await asyncio.gather(attempt, return_exceptions=True)
        if attempt.cancelled():
            raise _Stopped
        return attempt.result()

    async def _ack(self, msg: Msg, envelope: Envelope) -> None:
        """A plain ack, not a double ack (``ack_sync``): a server that restarted and lost
        the delivery never answers a double ack (each message held across the crash
        would wait out the timeout), and nothing depends on the answer: a message whose
        ack is lost comes again and its mark makes that harmless."""
        try:
            await msg.ack()
        except (nats.errors.Error, nats.js.errors.Error, NatsUnavailableError) as exc:
            log.info(
                "durable %s: ack of task %.80r failed (%r); a redelivery is acknowledged without running",
                self.durable,
                envelope.id,
                exc,
            )

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop after the message in hand (cancelled and handed back after ``timeout``);
        messages fetched and not yet handled are handed back; the consumer stays."""
        self._stopping.set()
        await self._pull.stop(timeout)

    async def unsubscribe(self) -> None:
        """Same as ``stop()`` (the name the core subscriptions use)."""
        await self.stop()


class _Stopped(Exception):
    """``stop()`` was called while a look-up or a mark was being retried."""


_TRANSIENT = (nats.errors.Error, nats.js.errors.Error, NatsUnavailableError, TimeoutError)


def _never_permanent(exc: BaseException) -> bool:
    return False


def _mark_value(envelope: Envelope) -> bytes:
    return envelope.id.encode()


def mark_prefix(durable: str) -> str:
    """The key prefix of a durable's marks in ``A2A_HANDLED``: the name itself when it is a
    valid key token (so permissions can scope ``$KV.A2A_HANDLED.{durable}.>``), else a digest."""
    if _KEY_TOKEN.match(durable):
        return durable
    return "h-" + hashlib.sha256(durable.encode()).hexdigest()[:32]


async def _quietly(coro: Any, what: str) -> None:
    try:
        await coro
    except (nats.errors.Error, nats.js.errors.Error, NatsUnavailableError) as exc:
        # The server redelivers after ack_wait; nothing is lost, but say so.
        log.warning("%s failed (%s); the server will redeliver after ack_wait", what, exc)

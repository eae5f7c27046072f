"""Durable task subscriptions: a JetStream pull consumer on ``A2A_TASKS``.

One named durable consumer per ``durable=`` name, filtered on the subscription's
pattern. It lives on the server, so a subscriber that stops (or crashes) and comes back
with the same name receives what was published meanwhile, in order. Several processes
using the same name share the consumer: each message goes to one of them (the queue
group of the durable world).

Per message: decode the envelope (a bad one is logged and *terminated*, so it is never
redelivered), run the handler, then ``ack``. A handler that raises gets the message
``nak``-ed with a growing delay and redelivered, up to ``max_deliver`` attempts, after
which it is terminated and counted. A long handler keeps its message with
``in_progress()`` so ``ack_wait`` does not expire under it. A process that dies leaves
its message unacked: the server redelivers it after ``ack_wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a import metrics
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.a2a.replies import run_handler
from liquidcrypto.errors import InvalidPayloadError, NatsUnavailableError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import ConnectionState, NatsClient

log = logging.getLogger(__name__)

DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_DELIVER = 5
DEFAULT_BATCH = 32
IDLE_WAIT = 1.0  # a long-poll fetch of one message while idle (short: a lost pull request costs this)
BUSY_WAIT = 0.01  # while messages flow, fetch a batch without lingering
_RETRY_CAP = 5.0


def nak_delay(attempt: int) -> float:
    """Delay before redelivering after the ``attempt``-th failure: 0.1 s doubling, 5 s cap."""
    return float(min(_RETRY_CAP, 0.1 * 2 ** max(0, attempt - 1)))


class DurableSubscription:
    """A running durable consumer loop; ``stop()`` ends it (the consumer stays)."""

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
        self._psub: JetStreamContext.PullSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._current: Msg | None = None
        self._stopping = False
        self._fetching = False
        self.handled = 0
        self.since = datetime.now(UTC)

    @property
    def closed(self) -> bool:
        return self._stopping

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

    async def ensure_consumer(self) -> None:
        """Create the durable consumer if missing; refuse to re-point an existing one.

        Raises:
            ValueError: a consumer of that name exists with another filter subject.
        """
        js = self.client.js
        try:
            info = await js.consumer_info(streams.A2A_TASKS, self.durable)
        except nats.js.errors.NotFoundError:
            await js.add_consumer(streams.A2A_TASKS, self.consumer_config())
            log.info("created durable consumer %s on %s", self.durable, self.subject)
            return
        have = info.config.filter_subject
        if have != self.subject:
            raise ValueError(
                f"durable {self.durable!r} already consumes {have!r}, not {self.subject!r}; "
                "use another name or delete it with A2ABus.delete_durable()"
            )

    async def start(self) -> None:
        """Create or check the consumer and start the loop (in the background if degraded)."""
        if self.client.is_connected:
            await self.ensure_consumer()
            await self._bind()
        self._task = asyncio.create_task(self._run(), name=f"a2a-durable-{self.durable}")
        self._ticker = asyncio.create_task(self._keep_alive(), name=f"a2a-durable-{self.durable}-progress")

    async def _bind(self) -> None:
        self._psub = await self.client.js.pull_subscribe_bind(durable=self.durable, stream=streams.A2A_TASKS)

    async def _run(self) -> None:
        failures = 0
        idle = True
        while not self._stopping:
            if self.client.state is ConnectionState.CLOSED:
                log.info("durable %s on %s: client closed; stopping", self.durable, self.subject)
                return
            try:
                if self._psub is None:
                    await self.client.wait_connected(IDLE_WAIT)
                    await self.ensure_consumer()
                    await self._bind()
                assert self._psub is not None
                self._fetching = True
                try:
                    if idle:  # long-poll for one: returns as soon as a message arrives
                        msgs = await self._psub.fetch(1, timeout=IDLE_WAIT)
                    else:  # take what is there now, without lingering for a full batch
                        msgs = await self._psub.fetch(self.batch, timeout=BUSY_WAIT)
                finally:
                    self._fetching = False
                failures = 0
            except TimeoutError:
                idle = True
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop outlives outages; it logs and retries
                failures += 1
                log.warning("durable %s on %s: fetch failed (%s); retrying", self.durable, self.subject, exc)
                if isinstance(exc, nats.js.errors.NotFoundError | NatsUnavailableError):
                    self._psub = None
                await asyncio.sleep(min(_RETRY_CAP, 0.1 * 2**failures))
                continue
            idle = False
            for i, msg in enumerate(msgs):
                if self._stopping:
                    await self._release(msgs[i:])
                    return
                await self._process(msg)

    async def _process(self, msg: Msg) -> None:
        try:
            envelope = env_mod.decode(msg.data, msg.subject, msg.headers)
        except InvalidPayloadError as exc:
            metrics.SKIPPED.labels("durable").inc()
            log.warning("durable %s: terminating bad message on %s: %s", self.durable, msg.subject, exc)
            await _quietly(msg.term(), "term")
            return
        delivered = msg.metadata.num_delivered or 1
        if delivered > 1:
            metrics.REDELIVERIES.inc()
        self._current = msg
        started = time.perf_counter()
        try:
            await run_handler(self._handler, envelope, self.client)
        except Exception:
            metrics.HANDLER_ERRORS.labels("durable").inc()
            if delivered >= self.max_deliver:
                metrics.GAVE_UP.inc()
                log.exception(
                    "durable %s: handler failed on %s (task %s), attempt %d of %d; giving up (terminated)",
                    self.durable, msg.subject, envelope.id, delivered, self.max_deliver,
                )
                await _quietly(msg.term(), "term")
            else:
                log.exception(
                    "durable %s: handler failed on %s (task %s), attempt %d of %d; will redeliver",
                    self.durable, msg.subject, envelope.id, delivered, self.max_deliver,
                )
                await _quietly(msg.nak(delay=nak_delay(delivered)), "nak")
            return
        finally:
            self._current = None
            metrics.HANDLER_SECONDS.observe(time.perf_counter() - started)
        metrics.RECEIVED_COUNTS["durable"] += 1
        self.handled += 1
        await _quietly(msg.ack(), "ack")

    async def _keep_alive(self) -> None:
        """Mark a message that is still being handled as in progress (one task per consumer)."""
        # Ticks at a quarter of ack_wait: whatever the phase of the tick relative to the
        # handler's start, a running message is marked well before its ack_wait runs out.
        period = max(0.05, self.ack_wait / 4)
        while True:
            await asyncio.sleep(period)
            msg = self._current
            if msg is not None:
                await _quietly(msg.in_progress(), "in_progress")

    async def _release(self, msgs: list[Msg]) -> None:
        """Hand fetched but unhandled messages back for immediate redelivery."""
        for msg in msgs:
            await _quietly(msg.nak(), "nak")

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop after the message in hand (cancel it after ``timeout``); the consumer stays."""
        if self._stopping:
            return
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            if self._fetching:
                task.cancel()
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                log.warning("durable %s: handler still busy after %g s; cancelling it", self.durable, timeout)
                task.cancel()
            except asyncio.CancelledError:
                if not task.done():
                    raise
            await asyncio.gather(task, return_exceptions=True)
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                await psub.unsubscribe()
                await self.client.flush(2)  # acks reach the server before we return
            except Exception as exc:  # noqa: BLE001 - stopping must not raise
                log.debug("durable %s: unsubscribe/flush failed: %s", self.durable, exc)

    async def unsubscribe(self) -> None:
        """Same as ``stop()`` (the name the core subscriptions use)."""
        await self.stop()


async def _quietly(coro: Any, what: str) -> None:
    try:
        await coro
    except (nats.errors.Error, nats.js.errors.Error, NatsUnavailableError) as exc:
        # The server redelivers after ack_wait; nothing is lost, but say so.
        log.warning("%s failed (%s); the server will redeliver after ack_wait", what, exc)

"""The NATS backend: trades in the ``TRADE_EVENTS`` stream, one push consumer per symbol.

- **Publish** (hop 1): ``js.publish_async`` inside a bounded in-flight window of
  un-acknowledged publications; a full window makes the caller wait. Each ack frees
  its slot from the future's callback (no task or timer per trade); a watchdog task
  retries publications whose ack is missing after ``ack_timeout``. A failed or missing
  ack is retried with the same ``Nats-Msg-Id`` (the stream drops a duplicate), then
  counted and logged as failed; the slot stays taken until then.
- **Feeds** (hop 2): per symbol, a push consumer made by ``NatsClient.subscribe_stream``
  (no acks, no flow control) delivering new messages with their stream sequence, with
  explicit pending limits; closing a feed (its last listener left) deletes its consumer
  at once. A jump in the consumer sequence (slow-consumer drops) recreates it right after
  the last delivered stream sequence, and ``resume_feeds`` does so after every
  reconnection, so the feed has no holes. A re-creation that fails (say the server's
  consumer limit is reached) drops the dead subscription, keeps where the feed stopped
  and calls ``on_feed_lost``: the manager reopens it with back-off (``open_feed`` resumes
  from there).
- **History**: ``nats_history`` reads the stream with the stream-range reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.fanout import metrics, nats_history
from liquidcrypto.fanout.backend import OnBroadcast, OnTrade
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.streams import TRADE_EVENTS
from liquidcrypto.nats.subscription import StreamSubscription, Subscription
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

# What nats-py may queue per feed subscription while the event loop is behind, set
# deliberately below nats-py's defaults (512k messages / 128 MiB per subscription):
# 65,536 trades is a minute of a symbol at 1,000 trades/s, and 16 MiB = 65,536 trades of 256 bytes,
# so the count binds first for ordinary trades. Past either, nats-py drops, counts a
# slow-consumer event, and the feed is recreated after its last delivered trade: the limits
# trade memory for re-creations, never for lost trades. Worst case per instance:
# WS_MAX_FEEDS x 16 MiB, reached only if every feed backs up at once. Reading the socket
# promptly (these queues) is what keeps nats-server's own per-connection limit
# (``max_pending``, 64 MiB by default) from cutting the whole connection.
FEED_PENDING_MSGS = 65_536
FEED_PENDING_BYTES = 16 * 1024 * 1024
FEED_INACTIVE_THRESHOLD = 60.0
FEED_DROP_CHECK_INTERVAL = 1.0
_YIELD_EVERY = 256
_DISPATCH_YIELD_EVERY = 16
_PUBLISHED = metrics.PUBLISHED.labels("nats")


@dataclass(eq=False)
class _InFlight:
    future: asyncio.Future[PubAck]
    subject: str
    payload: bytes
    msg_id: str
    started: float


class NatsBackend:
    """Trades over NATS JetStream.

    Args:
        client: a connected (or degraded) ``NatsClient``; not closed here.
        window: most publications waiting for their ack at once.
        ack_timeout: seconds to wait for an ack before retrying.
        retries: re-publications of an un-acknowledged trade before it counts as failed.
    """

    name = "nats"
    supports_history = True

    def __init__(self, client: NatsClient, *, window: int = 1024, ack_timeout: float = 5.0, retries: int = 2):
        if window < 1:
            raise ValueError(f"publish window must be at least 1, not {window}")
        self.client = client
        self.window = window
        self.ack_timeout = ack_timeout
        self.retries = retries
        self._slots = asyncio.Semaphore(window)
        self._inflight: dict[str, _InFlight] = {}  # by message id, oldest first
        self._retrying = 0
        self._has_inflight = asyncio.Event()
        self._refeeding = asyncio.Lock()  # one feed re-creation (gap or reconnection) at a time
        self._drained = asyncio.Event()
        self._drained.set()
        self._feeds: dict[str, StreamSubscription] = {}
        self._feed_last: dict[str, int] = {}  # last stream sequence each feed delivered
        self._feed_gen: dict[str, int] = {}  # bumped at each (re)subscription of a feed
        # Feeds whose re-creation failed: where to resume when they are opened again.
        self._lost: dict[str, int] = {}
        # Told the symbol of a feed lost that way (the manager reopens it with back-off).
        self.on_feed_lost: Callable[[str], None] = lambda symbol: None
        self._tasks = TaskSet("ws-backend")
        self._broadcast_sub: Subscription | None = None
        self._ids = itertools.count(1)
        self._msg_id_base = f"{os.getpid()}-{id(self):x}-"
        self._published = 0
        self.acked = 0
        self.failed = 0
        self.window_waits = 0
        self._failed_at_flush = 0
        self._on_trade: OnTrade | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self, on_trade: OnTrade, on_broadcast: OnBroadcast) -> None:
        self._on_trade = on_trade

        async def on_broadcast_msg(msg: Msg) -> None:
            on_broadcast(msg.data)

        self._broadcast_sub = await self.client.subscribe_msgs(
            subjects.WS_BROADCAST,
            on_broadcast_msg,
            pending_msgs_limit=FEED_PENDING_MSGS,
            pending_bytes_limit=FEED_PENDING_BYTES,
        )
        self._tasks.spawn(self._ack_watchdog(), "ack-watchdog")
        self._tasks.spawn(self._watch_drops(), "ws-feed-drop-watch")
        metrics.SLOW_CONSUMER.set_function(lambda: self.client.slow_consumer_events)
        metrics.PUBLISH_INFLIGHT.set_function(lambda: len(self._inflight) + self._retrying)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush(timeout=2.0)
        await self._tasks.cancel()
        for symbol in list(self._feeds):
            await self.close_feed(symbol)
        if self._broadcast_sub is not None:
            await self._broadcast_sub.unsubscribe()

    # -- hop 1: publish with a bounded ack window --------------------------------

    async def publish(self, symbol: str, payload: bytes) -> None:
        """Send one trade; wait only when ``window`` publications are un-acknowledged.

        Raises:
            NatsUnavailableError: NATS is not connected.
        """
        subject = subjects.trade(symbol)
        if not self.client.is_connected:
            # Fail fast: nats-py would buffer it while reconnecting, with no ack to come.
            raise NatsUnavailableError(f"NATS is not connected; trade for {symbol!r} not sent")
        if self._slots.locked():
            self.window_waits += 1
            metrics.PUBLISH_WINDOW_FULL.inc()
            t0 = time.perf_counter()
            await self._slots.acquire()
            metrics.PUBLISH_WAIT.observe(time.perf_counter() - t0)
        else:
            await self._slots.acquire()
        msg_id = f"{self._msg_id_base}{next(self._ids)}"
        try:
            future = await self.client.js_publish_async_raw(subject, payload, {hdr.MSG_ID: msg_id})
        except BaseException:
            self._slots.release()
            raise
        item = _InFlight(future, subject, payload, msg_id, time.monotonic())
        self._inflight[msg_id] = item
        self._drained.clear()
        self._has_inflight.set()
        future.add_done_callback(functools.partial(self._on_ack, item))
        self._published += 1
        if self._published % _YIELD_EVERY == 0:
            # nats-py's publish never yields; let subscribers in this process run.
            await asyncio.sleep(0)

    def _on_ack(self, item: _InFlight, future: asyncio.Future[PubAck]) -> None:
        """The ack (or error) of one publication: free its slot, or retry it."""
        if self._inflight.pop(item.msg_id, None) is None:
            return  # timed out already: the watchdog retries it
        error = asyncio.CancelledError() if future.cancelled() else future.exception()
        if error is None:
            self.acked += 1
            _PUBLISHED.inc()
            self._release()
        else:
            self._spawn_retry(item, error)

    def _release(self) -> None:
        self._slots.release()
        if not self._inflight and not self._retrying:
            self._drained.set()

    def _spawn_retry(self, item: _InFlight, error: BaseException) -> None:
        """Retry ``item`` in a task; its window slot stays taken until that is over."""
        self._retrying += 1

        async def retry() -> None:
            try:
                await self._retry(item, error)
            finally:
                self._retrying -= 1
                self._release()

        self._tasks.spawn(retry(), f"ws-publish-retry:{item.msg_id}")

    async def _ack_watchdog(self) -> None:
        """Retry publications whose ack did not come within ``ack_timeout`` (oldest first)."""
        while True:
            if not self._inflight:
                self._has_inflight.clear()
                await self._has_inflight.wait()
                continue
            oldest = next(iter(self._inflight.values()))
            wait = oldest.started + self.ack_timeout - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            del self._inflight[oldest.msg_id]
            oldest.future.cancel()  # frees nats-py's pending slot; a late ack is ignored
            self._spawn_retry(oldest, TimeoutError(f"no JetStream ack within {self.ack_timeout:g} s"))

    async def _retry(self, item: _InFlight, first: BaseException) -> None:
        error: BaseException = first
        for attempt in range(1, self.retries + 1):
            if not self.client.is_connected:
                break
            try:
                ack = await self.client.js_publish_raw(
                    item.subject, item.payload, {hdr.MSG_ID: item.msg_id}, timeout=self.ack_timeout
                )
                log.info("trade on %s stored at seq %s after retry %d (%s)", item.subject, ack.seq, attempt, first)
                self.acked += 1
                _PUBLISHED.inc()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                error = exc
        self.failed += 1
        metrics.PUBLISH_FAILED.labels("nats").inc()
        if self.failed == 1 or self.failed % 1000 == 0:
            log.error("trade on %s not stored (%d failed in all): %r", item.subject, self.failed, error)

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every trade published so far is acknowledged (or failed).

        Raises:
            NatsUnavailableError: some trades failed since the previous flush, or the
                acks did not come within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            raise NatsUnavailableError(
                f"{len(self._inflight)} trades still un-acknowledged after {timeout:g} s"
            ) from None
        failed, self._failed_at_flush = self.failed - self._failed_at_flush, self.failed
        if failed:
            raise NatsUnavailableError(f"{failed} trades could not be stored in {TRADE_EVENTS}")

    async def broadcast(self, payload: bytes) -> None:
        """Store ``payload`` on ``ws.broadcast``; every instance's subscription gets it.

        Raises:
            PayloadTooLargeError: it is over the server's ``max_payload``.
            NatsUnavailableError: it was not stored (``sent`` says whether it may still be:
                nothing is handed to nats-py while disconnected, so an outage means not sent).
        """
        await self.client.js_publish_raw(subjects.WS_BROADCAST, payload, timeout=self.ack_timeout)

    # -- hop 2: one ordered consumer per symbol ----------------------------------

    async def open_feed(self, symbol: str) -> None:
        """Start delivering new trades of ``symbol`` to ``on_trade``.

        Raises:
            NatsUnavailableError: NATS is not connected (retry on reconnect).
        """
        if symbol in self._feeds:
            return
        if symbol in self._lost:
            # A feed lost when its re-creation failed resumes where it stopped: no gap.
            await self._subscribe_feed(symbol, self._lost[symbol] + 1)
            del self._lost[symbol]
        else:
            try:
                state = (await self.client.js.stream_info(TRADE_EVENTS)).state
            except (nats.errors.Error, TimeoutError) as exc:
                raise NatsUnavailableError(f"cannot open the trade feed of {symbol!r}: {exc!r}") from exc
            # Start right after what is stored now (like "new", but from a known sequence).
            await self._subscribe_feed(symbol, int(state.last_seq or 0) + 1)
        metrics.FEEDS.inc()

    async def _subscribe_feed(self, symbol: str, start: int) -> None:
        """Push consumer from ``start``: in order, no acks, no flow control, gap-checked.

        Not nats-py's ordered consumer: its flow-control replies wait for a 250 ms poll
        whenever the callback is behind, which stalls a busy instance for whole polls.
        Here a busy instance just queues up to the pending limits; past them nats-py
        drops (a counted slow-consumer event), the consumer sequence jumps, and the feed
        is recreated right after the last trade it delivered, so nothing is lost.
        """
        on_trade = self._on_trade
        assert on_trade is not None, "start() first"
        self._feed_last[symbol] = start - 1
        generation = self._feed_gen[symbol] = self._feed_gen.get(symbol, 0) + 1
        last = self._feed_last
        expected = 1  # next consumer sequence of this subscription
        count = 0
        stale = False

        async def callback(msg: Msg) -> None:
            nonlocal expected, count, stale
            if stale:
                return
            meta = msg.metadata
            if meta.sequence.consumer != expected:
                stale = True
                log.warning(
                    "feed of %s skipped from consumer seq %d to %d; recreating after stream seq %d",
                    symbol,
                    expected,
                    meta.sequence.consumer,
                    last[symbol],
                )
                self._tasks.spawn(self._recreate_feed(symbol, generation), f"feed-recreate:{symbol}")
                return
            expected += 1
            seq = meta.sequence.stream
            last[symbol] = seq
            on_trade(symbol, seq, msg.data)
            count += 1
            if count % _DISPATCH_YIELD_EVERY == 0:
                # Let client writers and handlers drain their queues during a burst.
                await asyncio.sleep(0)

        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            mem_storage=True,
            num_replicas=1,
            # The server removes the consumer of an instance that vanished without unsubscribing.
            inactive_threshold=FEED_INACTIVE_THRESHOLD,
        )
        try:
            sub = await self.client.subscribe_stream(
                TRADE_EVENTS,
                subjects.trade(symbol),
                callback,
                config=config,
                pending_msgs_limit=FEED_PENDING_MSGS,
                pending_bytes_limit=FEED_PENDING_BYTES,
            )
        except NatsUnavailableError as exc:
            raise NatsUnavailableError(f"cannot open the trade feed of {symbol!r}: {exc}") from exc
        self._feeds[symbol] = sub
        log.debug("feed of %s open from seq %d", symbol, start)

    async def _watch_drops(self) -> None:
        """After slow-consumer drops, recreate feeds that lost their newest trades.

        A drop in the middle of a burst shows as a jump in the consumer sequence of the
        next message; a drop of the last messages before a quiet spell shows nowhere, so
        when the client counted new slow-consumer events, each idle feed is compared with
        what its consumer says it delivered.
        """
        seen = self.client.slow_consumer_events
        while True:
            await asyncio.sleep(FEED_DROP_CHECK_INTERVAL)
            now = self.client.slow_consumer_events
            if now == seen or not self.client.is_connected:
                continue
            seen = now
            for symbol, sub in list(self._feeds.items()):
                if sub.pending_msgs:
                    continue  # still draining; a gap will show in the sequence
                try:
                    info = await sub.consumer_info()
                except (nats.errors.Error, TimeoutError, NatsUnavailableError) as exc:
                    log.debug("consumer info of the feed of %s: %r", symbol, exc)
                    continue
                delivered = int(info.delivered.stream_seq or 0) if info.delivered else 0
                if delivered > self._feed_last.get(symbol, 0) and not sub.pending_msgs:
                    log.warning("feed of %s lost trades up to seq %d; recreating", symbol, delivered)
                    await self._recreate_feed(symbol, self._feed_gen.get(symbol, 0))

    async def _recreate_feed(self, symbol: str, generation: int) -> None:
        async with self._refeeding:  # a reconnection's resume_feeds may be recreating it too
            old = self._feeds.get(symbol)
            if old is None or self._feed_gen.get(symbol) != generation:
                return  # closed or already recreated
            await old.unsubscribe()
            try:
                await self._subscribe_feed(symbol, self._feed_last.get(symbol, 0) + 1)
            except NatsUnavailableError as exc:
                log.warning("recreating the feed of %s failed: %s", symbol, exc)
                self._lose(symbol)

    async def resume_feeds(self) -> None:
        """After a reconnection: recreate every feed right after the last trade it delivered.

        nats-py's ordered consumer would notice a lost consumer only after two missed
        heartbeats; this makes recovery immediate and gap-free.
        """
        async with self._refeeding:
            for symbol, sub in list(self._feeds.items()):
                await sub.unsubscribe()
                try:
                    await self._subscribe_feed(symbol, self._feed_last.get(symbol, 0) + 1)
                except NatsUnavailableError as exc:
                    log.warning("resuming the feed of %s failed: %s", symbol, exc)
                    self._lose(symbol)

    def _lose(self, symbol: str) -> None:
        """Forget the dead subscription of a feed whose re-creation failed, keep where it
        stopped, and tell the manager, which reopens it (``open_feed``) with back-off."""
        self._feeds.pop(symbol, None)
        self._lost[symbol] = self._feed_last.pop(symbol, 0)
        metrics.FEEDS.dec()
        self.on_feed_lost(symbol)

    async def close_feed(self, symbol: str) -> None:
        sub = self._feeds.pop(symbol, None)
        self._feed_last.pop(symbol, None)
        self._lost.pop(symbol, None)
        if sub is None:
            return
        metrics.FEEDS.dec()
        await sub.unsubscribe()  # deletes its consumer
        log.debug("feed closed: %s", symbol)

    # -- history ---------------------------------------------------------------

    async def history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Stored trades of ``symbol`` after ``since_seq``, or its ``last`` N (see ``nats_history``)."""
        return await nats_history.read_history(self.client, symbol, since_seq=since_seq, last=last, limit=limit)

    async def open_history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int, known_seq: int = 0
    ) -> nats_history.HistoryCursor:
        """The same history, read page by page, without what the client has up to ``known_seq``
        (``/ws`` replays; see ``fanout.replay``)."""
        return await nats_history.HistoryCursor.open(
            self.client, symbol, since_seq=since_seq, last=last, limit=limit, known_seq=known_seq
        )

    def stats(self) -> dict[str, int]:
        return {
            "published": self._published,
            "acked": self.acked,
            "failed": self.failed,
            "inflight": len(self._inflight) + self._retrying,
            "retrying": self._retrying,
            "window": self.window,
            "window_waits": self.window_waits,
            "feeds": len(self._feeds),
            "slow_consumer_events": self.client.slow_consumer_events,
            "server_cuts": self.client.server_cuts,
        }

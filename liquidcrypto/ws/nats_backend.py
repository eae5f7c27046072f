"""The NATS backend: trades in the ``TRADE_EVENTS`` stream, one ordered consumer per symbol.

- **Publish** (hop 1): ``js.publish_async`` inside a bounded in-flight window of
  un-acknowledged publications; a full window makes the caller wait. One owned task
  collects the acks in order; a failed or missing ack is retried with the same
  ``Nats-Msg-Id`` (the stream drops a duplicate), then counted and logged as failed.
- **Feeds** (hop 2): per symbol, an ordered push consumer delivering new messages with
  their stream sequence, with explicit pending limits. nats-py recreates it from the
  last delivered sequence after a gap or a silent server, and ``resume_feeds`` does so
  at once after every reconnection, so the feed has no holes.
- **History**: an ephemeral ordered consumer reads ``trades.{symbol}`` from a start
  sequence up to the last stored message; ``last: N`` finds its start sequence by a
  binary search over consumer ``num_pending`` counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import NotFoundError

from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient, Subscription
from liquidcrypto.nats.streams import TRADE_EVENTS
from liquidcrypto.ws import metrics
from liquidcrypto.ws.backend import OnBroadcast, OnTrade

log = logging.getLogger(__name__)

FEED_PENDING_MSGS = 65_536
FEED_PENDING_BYTES = 64 * 1024 * 1024
HISTORY_IDLE_TIMEOUT = 5.0
_YIELD_EVERY = 256
_DISPATCH_YIELD_EVERY = 16


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
        self._inflight: deque[_InFlight] = deque()
        self._has_inflight = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._acker: asyncio.Task[None] | None = None
        self._feeds: dict[str, Any] = {}
        self._feed_last: dict[str, int] = {}  # last stream sequence each feed delivered
        self._broadcast_sub: Subscription | None = None
        self._ids = itertools.count(1)
        self._id_prefix = f"{os.getpid()}-{id(self):x}-"
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
        await self._flush_subscriptions()
        self._acker = asyncio.ensure_future(self._collect_acks())
        self._acker.set_name("ws-nats-acks")
        metrics.SLOW_CONSUMER.set_function(lambda: self.client.slow_consumer_events)

    async def _flush_subscriptions(self) -> None:
        """Round trip to the server so a subscription just made is in place on return."""
        if self.client.is_connected:
            try:
                await self.client.nc.flush(timeout=5)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("flush after subscribing: %r", exc)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush(timeout=2.0)
        if self._acker is not None:
            self._acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker
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
        js = self.client.js
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
        msg_id = f"{self._id_prefix}{next(self._ids)}"
        try:
            future = await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            self._slots.release()
            raise NatsUnavailableError(f"NATS unavailable; trade for {symbol!r} not sent") from exc
        except BaseException:
            self._slots.release()
            raise
        self._inflight.append(_InFlight(future, subject, payload, msg_id, time.monotonic()))
        self._drained.clear()
        self._has_inflight.set()
        metrics.PUBLISH_INFLIGHT.set(len(self._inflight))
        self._published += 1
        if self._published % _YIELD_EVERY == 0:
            # nats-py's publish never yields; let subscribers in this process run.
            await asyncio.sleep(0)

    async def _collect_acks(self) -> None:
        while True:
            if not self._inflight:
                self._drained.set()
                self._has_inflight.clear()
                await self._has_inflight.wait()
                continue
            item = self._inflight[0]
            try:
                remaining = max(0.0, item.started + self.ack_timeout - time.monotonic())
                await asyncio.wait_for(item.future, timeout=remaining)
                self.acked += 1
                metrics.PUBLISHED.labels("nats").inc()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is retried, then counted
                await self._retry(item, exc)
            finally:
                self._inflight.popleft()
                self._slots.release()
                metrics.PUBLISH_INFLIGHT.set(len(self._inflight))

    async def _retry(self, item: _InFlight, first: BaseException) -> None:
        error: BaseException = first
        for attempt in range(1, self.retries + 1):
            if not self.client.is_connected:
                break
            try:
                ack = await self.client.js.publish(
                    item.subject, item.payload, timeout=self.ack_timeout, headers={"Nats-Msg-Id": item.msg_id}
                )
                log.info("trade on %s stored at seq %s after retry %d (%s)", item.subject, ack.seq, attempt, first)
                self.acked += 1
                metrics.PUBLISHED.labels("nats").inc()
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
            NatsUnavailableError: it was not stored.
        """
        try:
            await self.client.js.publish(subjects.WS_BROADCAST, payload, timeout=self.ack_timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            raise NatsUnavailableError(f"broadcast not stored: {exc!r}") from exc

    # -- hop 2: one ordered consumer per symbol ----------------------------------

    async def open_feed(self, symbol: str) -> None:
        """Start delivering new trades of ``symbol`` to ``on_trade``.

        Raises:
            NatsUnavailableError: NATS is not connected (retry on reconnect).
        """
        if symbol in self._feeds:
            return
        try:
            state = (await self.client.js._jsm.stream_info(TRADE_EVENTS)).state
        except (nats.errors.Error, TimeoutError) as exc:
            raise NatsUnavailableError(f"cannot open the trade feed of {symbol!r}: {exc!r}") from exc
        # Start right after what is stored now (like "new", but from a known sequence).
        await self._subscribe_feed(symbol, int(state.last_seq or 0) + 1)
        metrics.FEEDS.inc()

    async def _subscribe_feed(self, symbol: str, start: int) -> None:
        on_trade = self._on_trade
        assert on_trade is not None, "start() first"
        self._feed_last[symbol] = start - 1
        last = self._feed_last
        count = 0

        async def callback(msg: Msg) -> None:
            nonlocal count
            seq = msg.metadata.sequence.stream
            last[symbol] = seq
            on_trade(symbol, seq, msg.data)
            count += 1
            if count % _DISPATCH_YIELD_EVERY == 0:
                # Let client writers and handlers drain their queues during a burst.
                await asyncio.sleep(0)

        try:
            sub = await self.client.js.subscribe(
                subjects.trade(symbol),
                cb=callback,
                stream=TRADE_EVENTS,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
                pending_msgs_limit=FEED_PENDING_MSGS,
                pending_bytes_limit=FEED_PENDING_BYTES,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise NatsUnavailableError(f"cannot open the trade feed of {symbol!r}: {exc!r}") from exc
        self._feeds[symbol] = sub
        await self._flush_subscriptions()
        log.debug("feed of %s open from seq %d", symbol, start)

    async def resume_feeds(self) -> None:
        """After a reconnection: recreate every feed right after the last trade it delivered.

        nats-py's ordered consumer would notice a lost consumer only after two missed
        heartbeats; this makes recovery immediate and gap-free.
        """
        for symbol, sub in list(self._feeds.items()):
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("dropping the old feed of %s: %r", symbol, exc)
            try:
                await self._subscribe_feed(symbol, self._feed_last.get(symbol, 0) + 1)
            except NatsUnavailableError as exc:
                log.warning("resuming the feed of %s failed: %s", symbol, exc)

    async def close_feed(self, symbol: str) -> None:
        sub = self._feeds.pop(symbol, None)
        self._feed_last.pop(symbol, None)
        if sub is None:
            return
        metrics.FEEDS.dec()
        try:
            await sub.unsubscribe()
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("unsubscribing feed %s: %r", symbol, exc)
        log.debug("feed closed: %s", symbol)

    # -- history ---------------------------------------------------------------

    async def history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Stored trades of ``symbol`` after ``since_seq``, or its ``last`` N, at most ``limit``.

        Returns:
            ``(items, complete)``: ``(seq, payload)`` in order, and whether nothing the
            client asked for was left out (expired from the 5-minute stream, or beyond
            ``limit``).
        """
        subject = subjects.trade(symbol)
        jsm = self.client.js._jsm
        try:
            end = int((await jsm.get_last_msg(TRADE_EVENTS, subject)).seq or 0)
        except NotFoundError:
            return [], since_seq is None or since_seq == 0
        first = (await jsm.stream_info(TRADE_EVENTS)).state.first_seq
        complete = True
        start = first
        if since_seq is not None:
            start = since_seq + 1
            if start < first:
                complete, start = since_seq == 0, first
            if start > end:
                return [], complete
            if await self._count(subject, start) > limit:
                complete, last = False, limit
        if last is not None:
            want = min(last, limit)
            if want == 0:
                return [], complete
            start = await self._start_for_last(subject, first, end, want)
        items, finished = await self._read(subject, start, end)
        return items, complete and finished

    async def _count(self, subject: str, start: int) -> int:
        """Messages on ``subject`` with sequence >= ``start`` (an ephemeral consumer's pending)."""
        jsm = self.client.js._jsm
        info = await jsm.add_consumer(
            TRADE_EVENTS,
            ConsumerConfig(
                filter_subject=subject,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start,
                ack_policy=AckPolicy.NONE,
                mem_storage=True,
                inactive_threshold=5.0,
            ),
        )
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await jsm.delete_consumer(TRADE_EVENTS, info.name)
        return int(info.num_pending or 0)

    async def _start_for_last(self, subject: str, first: int, end: int, want: int) -> int:
        """The highest start sequence from which at least ``want`` messages remain."""
        lo, hi = first, end
        if await self._count(subject, lo) <= want:
            return lo
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if await self._count(subject, mid) >= want:
                lo = mid
            else:
                hi = mid - 1
        return lo

    async def _read(self, subject: str, start: int, end: int) -> tuple[list[tuple[int, bytes]], bool]:
        items: list[tuple[int, bytes]] = []
        done = False
        progress = asyncio.Event()

        async def callback(msg: Msg) -> None:
            nonlocal done
            seq = msg.metadata.sequence.stream
            if seq <= end and not done:
                items.append((seq, msg.data))
            done = done or seq >= end
            progress.set()

        sub = await self.client.js.subscribe(
            subject,
            cb=callback,
            stream=TRADE_EVENTS,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
        )
        try:
            while not done:
                progress.clear()
                try:
                    await asyncio.wait_for(progress.wait(), HISTORY_IDLE_TIMEOUT)
                except TimeoutError:
                    # Expired meanwhile, or NATS is gone: send what we have, say it is partial.
                    log.warning("history of %s stalled at %d messages (up to seq %d)", subject, len(items), end)
                    break
        finally:
            with contextlib.suppress(nats.errors.Error, TimeoutError):
                await sub.unsubscribe()
        return items, done

    def stats(self) -> dict[str, int]:
        return {
            "published": self._published,
            "acked": self.acked,
            "failed": self.failed,
            "inflight": len(self._inflight),
            "window": self.window,
            "window_waits": self.window_waits,
            "feeds": len(self._feeds),
            "slow_consumer_events": self.client.slow_consumer_events,
        }

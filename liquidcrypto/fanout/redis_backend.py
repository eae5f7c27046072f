"""The Redis backend (``WS_BACKEND=redis``): the same manager API over Redis pub/sub.

Redis pub/sub keeps nothing: there is **no history and no resume** with this backend
(a ``since_seq``/``last`` request gets a ``history`` frame with ``complete: false``).
Each trade gets a per-symbol sequence from ``INCR`` in the same Lua script that
publishes it, so subscribers see a sequence in every frame and can *detect* loss: when
Redis drops a subscriber for its output-buffer limit, redis-py reconnects and
resubscribes silently, and the only trace is a gap in the sequence — counted in
``liquidcrypto_ws_redis_gaps_total`` and logged. Use ``hiredis`` (a dependency) so the
subscriber keeps up in the first place.

Channel ``trades.{symbol}`` carries ``b"<seq>\\n<json>"``; ``ws.broadcast`` carries JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from liquidcrypto.errors import RedisUnavailableError
from liquidcrypto.fanout import metrics
from liquidcrypto.fanout.backend import OnBroadcast, OnTrade
from liquidcrypto.nats import subjects
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

SEQ_KEY_PREFIX = "liquidcrypto:ws:seq:"
_PUBLISH = """
local seq = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', ARGV[1], seq .. '\\n' .. ARGV[2])
return seq
"""
_TRADE_PREFIX = subjects.TRADES + "."
SUBSCRIBE_CONFIRM_TIMEOUT = 5.0  # seconds open_feed waits for Redis to confirm a subscription


class RedisBackend:
    """Trades over Redis pub/sub with per-symbol sequences and gap counting.

    Args:
        url: ``redis://host:port/db``.
        window: most publications in flight at once (connections in the pool).
        on_recovered: awaited (in a task of its own) when the subscriber reaches Redis
            again after failing: the manager opens the feeds it could not open meanwhile.
    """

    name = "redis"
    supports_history = False

    def __init__(
        self, url: str, *, window: int = 64, on_recovered: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        self.url = url
        self.window = window
        self._on_recovered = on_recovered
        self._tasks = TaskSet("ws-redis")
        self._recovering: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._last_seq: dict[str, int] = {}
        self._feeds: set[str] = set()
        self._on_trade: OnTrade | None = None
        self._on_broadcast: OnBroadcast | None = None
        self._broadcast_subscribed = False
        self._confirming: dict[str, asyncio.Future[None]] = {}
        self.published = 0
        self.failed = 0
        self.gaps = 0
        self.received = 0

    async def start(self, on_trade: OnTrade, on_broadcast: OnBroadcast) -> None:
        self._on_trade, self._on_broadcast = on_trade, on_broadcast
        pool = aioredis.BlockingConnectionPool.from_url(self.url, max_connections=self.window + 2, timeout=None)
        self._redis = aioredis.Redis(connection_pool=pool)
        self._script = self._redis.register_script(_PUBLISH)
        self._pubsub = self._redis.pubsub()
        try:
            await self._subscribe(subjects.WS_BROADCAST)
        except (RedisError, OSError) as exc:
            log.warning("Redis at %s not available (%r); retrying in the background", _redact(self.url), exc)
        self._start_reader()

    def _start_reader(self) -> None:
        if self._reader is None:
            self._reader = self._tasks.spawn(self._read_loop(), "reader")

    async def stop(self) -> None:
        await self._tasks.cancel()
        if self._pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()
        if self._redis is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()
                await self._redis.connection_pool.aclose()

    async def publish(self, symbol: str, payload: bytes) -> None:
        """Publish with its next per-symbol sequence (the pool bounds the in-flight calls).

        Raises:
            RedisUnavailableError: Redis is not reachable.
        """
        channel = subjects.trade(symbol)
        try:
            await self._script(keys=[SEQ_KEY_PREFIX + channel], args=[channel, payload])
        except (RedisError, OSError) as exc:
            self.failed += 1
            metrics.PUBLISH_FAILED.labels("redis").inc()
            raise RedisUnavailableError(f"Redis unavailable; trade for {symbol!r} not published: {exc!r}") from exc
        self.published += 1
        metrics.PUBLISHED.labels("redis").inc()

    async def flush(self, timeout: float = 10.0) -> None:
        """Nothing to wait for: every ``publish`` returns after Redis answered."""

    async def broadcast(self, payload: bytes) -> None:
        assert self._redis is not None, "start() first"
        try:
            await self._redis.publish(subjects.WS_BROADCAST, payload)
        except (RedisError, OSError) as exc:
            raise RedisUnavailableError(f"Redis unavailable; broadcast not sent: {exc!r}") from exc

    async def open_feed(self, symbol: str) -> None:
        """Subscribe to the symbol's channel; returns once Redis confirmed it, so a trade
        published next from any instance arrives."""
        channel = subjects.trade(symbol)
        if symbol in self._feeds:
            return
        self._last_seq.pop(symbol, None)
        try:
            await self._subscribe(channel)
        except (RedisError, OSError) as exc:
            raise RedisUnavailableError(f"cannot subscribe to {channel!r} on Redis: {exc!r}") from exc
        self._feeds.add(symbol)
        metrics.FEEDS.inc()

    async def _subscribe(self, channel: str) -> None:
        """SUBSCRIBE, then wait until the reader sees Redis confirm it (a warning after
        ``SUBSCRIBE_CONFIRM_TIMEOUT``): Redis may otherwise run a PUBLISH from another
        connection first."""
        confirmed = self._confirming[channel] = asyncio.get_running_loop().create_future()
        try:
            await self._pubsub.subscribe(channel)
            if channel == subjects.WS_BROADCAST:
                self._broadcast_subscribed = True
            self._start_reader()  # the pub/sub connection exists now; the reader reads the confirmation
            await asyncio.wait_for(confirmed, SUBSCRIBE_CONFIRM_TIMEOUT)
        except TimeoutError:
            log.warning("Redis did not confirm the subscription to %s within %g s", channel, SUBSCRIBE_CONFIRM_TIMEOUT)
        finally:
            self._confirming.pop(channel, None)

    def _confirmed(self, channel: bytes | str) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        waiter = self._confirming.get(name)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def close_feed(self, symbol: str) -> None:
        if symbol not in self._feeds:
            return
        self._feeds.discard(symbol)
        metrics.FEEDS.dec()
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.unsubscribe(subjects.trade(symbol))

    async def history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int
    ) -> tuple[list[tuple[int, bytes]], bool]:
        """Redis pub/sub stores nothing: always ``([], False)``."""
        return [], False

    async def _read_loop(self) -> None:
        failures = 0
        count = 0
        while True:
            try:
                if not self._broadcast_subscribed:  # Redis was down when we started
                    await self._pubsub.subscribe(subjects.WS_BROADCAST)
                    self._broadcast_subscribed = True
                msg = await self._pubsub.get_message(timeout=1.0)
                if failures:
                    failures = 0
                    self._recovered()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                failures += 1
                log.warning("Redis subscriber error (%r); retrying", exc)
                await asyncio.sleep(min(2.0, 0.1 * 2**failures))
                continue
            if msg is None:
                continue
            if msg["type"] != "message":
                if msg["type"] == "subscribe":
                    self._confirmed(msg["channel"])
                continue
            try:
                self._dispatch(msg["channel"], msg["data"])
            except Exception:
                log.exception("dispatching a Redis message from %r failed", msg.get("channel"))
            count += 1
            if count % 16 == 0:
                # Buffered messages come without suspending: let writers and handlers run.
                await asyncio.sleep(0)

    def _recovered(self) -> None:
        # A task: opening a feed waits for this loop to read Redis's confirmation.
        log.info("Redis subscriber at %s works again", _redact(self.url))
        if self._on_recovered is not None and (self._recovering is None or self._recovering.done()):
            self._recovering = self._tasks.spawn(self._run_recovered(self._on_recovered), "recovered")

    @staticmethod
    async def _run_recovered(callback: Callable[[], Awaitable[None]]) -> None:
        try:
            await callback()
        except Exception:
            log.exception("reopening feeds after Redis came back failed")

    def _dispatch(self, channel: bytes | str, data: bytes) -> None:
        name = channel.decode() if isinstance(channel, bytes) else channel
        if name == subjects.WS_BROADCAST:
            assert self._on_broadcast is not None
            self._on_broadcast(data)
            return
        if not name.startswith(_TRADE_PREFIX):
            return
        symbol = name[len(_TRADE_PREFIX) :]
        head, _, payload = data.partition(b"\n")
        try:
            seq = int(head)
        except ValueError:
            metrics.FEED_BAD.inc()
            log.warning("skipping a message on %s without a sequence", name)
            return
        last = self._last_seq.get(symbol)
        if last is not None and seq > last + 1:
            missing = seq - last - 1
            self.gaps += missing
            metrics.REDIS_GAPS.inc(missing)
            log.warning("Redis lost %d trades on %s (seq %d -> %d)", missing, name, last, seq)
        self._last_seq[symbol] = seq
        self.received += 1
        assert self._on_trade is not None
        self._on_trade(symbol, seq, payload)

    def stats(self) -> dict[str, int]:
        return {
            "published": self.published,
            "failed": self.failed,
            "feeds": len(self._feeds),
            "gaps": self.gaps,
            "received": self.received,
        }


def _redact(url: str) -> str:
    _, sep, tail = url.rpartition("@")
    return f"redis://***@{tail}" if sep else url

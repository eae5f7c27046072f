"""``NatsWebSocketManager``: trade fan-out from a backend to this instance's clients.

Each instance holds **one backend subscription per symbol** that any of its listeners
want (a ``/ws`` client or a ``subscribe_to_trade_events`` handler): the first listener
opens the feed, the last one closes it. A trade arrives once per instance, its frame is
built once, and it is offered to every listener's own bounded queue without awaiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from liquidcrypto import codec
from liquidcrypto.config import Settings
from liquidcrypto.errors import BackendUnavailableError, InvalidPayloadError, LiquidNatsError
from liquidcrypto.fanout import limits, metrics, protocol
from liquidcrypto.fanout.backend import Backend
from liquidcrypto.fanout.handlers import HandlerListener
from liquidcrypto.fanout.replay import ReplayLimits, ReplayRequest, Replays, list_history
from liquidcrypto.fanout.session import ClientSession, QueuePolicy, SymbolState
from liquidcrypto.nats import subjects
from liquidcrypto.nats.client import NatsClient, get_client
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

Unsubscribe = Callable[[], Awaitable[None]]
FEED_RETRY_FIRST = 0.25
FEED_RETRY_MAX = 10.0
_instances = itertools.count(1)


@dataclass(eq=False)
class _Feed:
    symbol: str
    prefix: str
    sessions: set[ClientSession] = field(default_factory=set)
    handlers: set[HandlerListener] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    open: bool = False

    @property
    def empty(self) -> bool:
        return not self.sessions and not self.handlers


def _symbol_list(symbols: str | Iterable[str]) -> list[str]:
    items = [symbols] if isinstance(symbols, str) else list(symbols)
    return list(dict.fromkeys(subjects.token(s, "symbol") for s in items))


class NatsWebSocketManager:
    """Cross-instance trade distribution (the spec's ``NatsWebSocketManager``).

    Args:
        client: the NATS client to use (default: the module's default client, at
            ``init()``). Ignored with the Redis backend.
        settings: configuration (default: the client's, or ``Settings.from_env()``).
        backend: ``"nats"`` or ``"redis"`` (default ``settings.ws_backend``).
        transport: a ready ``Backend`` object to use instead (benchmarks, tests).

    Use ``async with NatsWebSocketManager(client) as manager:`` or ``init()``/``close()``.
    """

    def __init__(
        self,
        client: NatsClient | None = None,
        *,
        settings: Settings | None = None,
        backend: str | None = None,
        transport: Backend | None = None,
    ) -> None:
        self.settings = settings or (client.settings if client is not None else Settings.from_env())
        self.backend_name = transport.name if transport is not None else (backend or self.settings.ws_backend).lower()
        if transport is None and self.backend_name not in ("nats", "redis"):
            raise ValueError(f"invalid WebSocket backend {self.backend_name!r}: expected 'nats' or 'redis'")
        self.instance_id = f"{socket.gethostname()}-{os.getpid()}-{next(_instances)}"
        self.queue_policy = QueuePolicy(
            queue_size=self.settings.ws_queue_size,
            conflate_at=self.settings.ws_conflate_at,
            disconnect_after=self.settings.ws_disconnect_after,
            write_delay=self.settings.ws_write_delay,
        )
        self.replay_limits = ReplayLimits(
            max_running=self.settings.ws_max_replays,
            max_waiting=self.settings.ws_replay_queue,
            page_size=self.settings.ws_replay_page,
            history_max=self.settings.ws_history_max,
        )
        self._client = client
        self._transport = transport
        self._backend: Backend | None = None
        self._replays: Replays | None = None
        self._feeds: dict[str, _Feed] = {}
        self.sessions: set[ClientSession] = set()
        self._handler_tasks = TaskSet("trade-handler")
        self.limits = limits.ClientLimits(self.settings)
        self._feed_retry = asyncio.Event()  # some feed waits to be (re)opened
        self._retry_tasks = TaskSet("ws-feed-retry")
        self._closed = False
        self.broadcasts_received = 0
        self.bad_messages = 0
        self.handler_dropped = 0
        # Counters of clients that have left, so /stats keeps them.
        self._past = {"sent": 0, "conflated": 0, "dropped": 0, "duplicates": 0, "gaps": 0, "slow_disconnects": 0}

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> NatsWebSocketManager:
        await self.init()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def init(self) -> None:
        """Start the backend (NATS: the broadcast subscription and the ack collector)."""
        if self._closed:
            raise LiquidNatsError("WebSocket manager is closed")
        if self._backend is not None:
            return
        backend: Backend
        if self._transport is not None:
            backend = self._transport
        elif self.backend_name == "nats":
            from liquidcrypto.fanout.nats_backend import NatsBackend

            client = self._client or get_client()
            self._client = client
            backend = NatsBackend(client, window=self.settings.ws_publish_window)
            backend.on_feed_lost = self._feed_lost
            client.on_connect(self._reopen_feeds)
        else:
            from liquidcrypto.fanout.redis_backend import RedisBackend

            backend = RedisBackend(self.settings.redis_url, on_recovered=self._open_waiting_feeds)
        await backend.start(self._on_trade, self._on_broadcast)
        self._backend = backend
        self._retry_tasks.spawn(self._retry_waiting_feeds(), "ws-feed-retry")
        # Paged history where the backend can page it (NATS), else read at once.
        open_history = getattr(backend, "open_history", None) or list_history(backend.history)
        self._replays = Replays(self.replay_limits, open_history)
        log.info("WebSocket manager %s started with the %s backend", self.instance_id, self.backend_name)

    async def close(self) -> None:
        """Close every client, stop handlers and feeds; idempotent."""
        if self._closed:
            return
        self._closed = True
        for session in list(self.sessions):
            session.kick(1001, "server shutting down")
        await self._handler_tasks.cancel()
        await self._retry_tasks.cancel()
        if self._client is not None:
            self._client.remove_on_connect(self._reopen_feeds)
        if self._backend is not None:
            await self._backend.stop()
        self._feeds.clear()

    @property
    def backend(self) -> Backend:
        """The started backend.

        Raises:
            LiquidNatsError: ``init()`` was not called, or the manager is closed.
        """
        if self._closed:
            raise LiquidNatsError("WebSocket manager is closed")
        if self._backend is None:
            raise LiquidNatsError("WebSocket manager not initialised; call await manager.init()")
        return self._backend

    # -- the spec's API --------------------------------------------------------

    async def publish_trade_event(self, symbol: str, data: Any) -> None:
        """Publish a trade on ``trades.{symbol}`` (stored 5 minutes in ``TRADE_EVENTS``).

        With NATS it returns once the trade is sent and the in-flight window has room;
        ``flush()`` waits for the acks. A full window makes this wait (back-pressure).

        Raises:
            InvalidSubjectError: ``symbol`` cannot be a subject token (a ``ValueError``).
            InvalidPayloadError: ``data`` is not JSON-able.
            BackendUnavailableError: the backend cannot take it now.
        """
        subjects.token(symbol, "symbol")
        await self.backend.publish(symbol, codec.encode(data))

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every published trade is acknowledged.

        Raises:
            BackendUnavailableError: some trades failed since the last flush, or timeout.
        """
        await self.backend.flush(timeout)

    async def broadcast(self, data: Any) -> None:
        """Send ``data`` to every client of every instance as ``{"type":"broadcast","data":...}``."""
        await self.backend.broadcast(codec.encode(data))

    async def subscribe_to_trade_events(
        self, symbols: str | Iterable[str], handler: Callable[[Any], Any], *, with_meta: bool = False
    ) -> Unsubscribe:
        """Call ``handler(data)`` (sync or async) for each trade of ``symbols``.

        The handler runs in its own task behind a bounded queue (``WS_QUEUE_SIZE``): a
        slow handler loses its oldest trades (counted, logged), never slows the others.

        Args:
            with_meta: pass a ``TradeEvent(symbol, data, seq)`` instead of the data.

        Returns:
            an async callable that unsubscribes (idempotent).

        Raises:
            InvalidSubjectError: a symbol is invalid (nothing is subscribed).
            BackendUnavailableError: the backend cannot subscribe now.
        """
        names = _symbol_list(symbols)
        listener = HandlerListener(handler, with_meta, self.settings.ws_queue_size)
        listener.on_drop = self._count_handler_drop
        task = self._handler_tasks.spawn(listener.run(), ",".join(names))
        listener.task = task
        done = False

        async def unsubscribe() -> None:
            nonlocal done
            if done:
                return
            done = True
            for name in names:
                await self._remove(name, handler=listener)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        try:
            for name in names:
                await self._add(name, handler=listener)
        except BaseException:
            await unsubscribe()
            raise
        return unsubscribe

    def _count_handler_drop(self) -> None:
        self.handler_dropped += 1

    # -- feeds -------------------------------------------------------------------

    async def _add(
        self, symbol: str, *, session: ClientSession | None = None, handler: HandlerListener | None = None
    ) -> None:
        feed = self._feeds.get(symbol)
        if feed is None:
            feed = self._feeds[symbol] = _Feed(symbol, protocol.trade_frame_head(symbol))
        async with feed.lock:
            # Listen first: if the feed cannot open now (NATS down), it reopens on reconnect.
            if session is not None:
                feed.sessions.add(session)
            if handler is not None:
                feed.handlers.add(handler)
            if not feed.open:
                try:
                    await self.backend.open_feed(symbol)
                except BackendUnavailableError:
                    self._feed_retry.set()  # retried with back-off while someone listens
                    raise
                feed.open = True

    async def _remove(
        self, symbol: str, *, session: ClientSession | None = None, handler: HandlerListener | None = None
    ) -> None:
        feed = self._feeds.get(symbol)
        if feed is None:
            return
        async with feed.lock:
            if session is not None:
                feed.sessions.discard(session)
            if handler is not None:
                feed.handlers.discard(handler)
            if feed.empty and not self._closed:  # closing stops the backend and all its feeds
                # Also when not open: a feed lost after a failed resumption keeps where it
                # stopped on the backend until it is closed.
                feed.open = False
                await self.backend.close_feed(symbol)
            if feed.empty and self._feeds.get(symbol) is feed:
                del self._feeds[symbol]

    async def _reopen_feeds(self, client: NatsClient) -> None:
        """After a (re)connection: resume open feeds where they stopped, open the others.

        The client runs this in its one re-establishment round (never twice at once; a
        newer connection cancels it, and a cancelled resume leaves each feed either on its
        old consumer or on a new one, which the next round replaces). Resuming holds the
        lock of every feed, so a listener joining or leaving meanwhile cannot open or
        close a feed under it and leave a second consumer feeding the same symbol.
        """
        resume = getattr(self._backend, "resume_feeds", None)
        if resume is not None:
            async with self._all_feeds_locked():
                await resume()
        await self._open_waiting_feeds()

    @contextlib.asynccontextmanager
    async def _all_feeds_locked(self) -> AsyncIterator[None]:
        """Hold the lock of every feed there is once they are all held.

        Nobody else holds two feed locks at once, so taking them one by one cannot deadlock.
        """
        async with contextlib.AsyncExitStack() as stack:
            held: set[_Feed] = set()
            while True:
                missing = [feed for feed in self._feeds.values() if feed not in held]
                if not missing:
                    break
                for feed in missing:
                    await stack.enter_async_context(feed.lock)
                    held.add(feed)
            yield

    async def _open_waiting_feeds(self) -> None:
        await self._try_waiting_feeds()

    async def _try_waiting_feeds(self) -> bool:
        """Open the feeds that listeners wait for but that could not open (backend down,
        consumer limit reached, a resumption that failed); whether none waits any more."""
        done = True
        for feed in list(self._feeds.values()):
            async with feed.lock:
                if not feed.open and not feed.empty:
                    try:
                        await self.backend.open_feed(feed.symbol)
                        feed.open = True
                    except BackendUnavailableError as exc:
                        done = False
                        log.warning("reopening the feed of %s failed: %s", feed.symbol, exc)
        if not done:
            self._feed_retry.set()
        return done

    def _feed_lost(self, symbol: str) -> None:
        """The backend lost the feed of ``symbol`` (its re-creation failed): reopen it later."""
        feed = self._feeds.get(symbol)
        if feed is not None:
            feed.open = False
        self._feed_retry.set()

    async def _retry_waiting_feeds(self) -> None:
        """Retry the waiting feeds with back-off (0.25 s doubling to 10 s) while any waits.

        A reconnection reopens them too; this covers a backend that is up but refused
        (e.g. the server's consumer limit), which no reconnection would ever retry.
        """
        while True:
            await self._feed_retry.wait()
            delay = FEED_RETRY_FIRST
            while True:
                self._feed_retry.clear()
                await asyncio.sleep(delay)
                connected = self._client is None or self._client.is_connected
                if connected and await self._try_waiting_feeds():
                    break
                delay = min(delay * 2, FEED_RETRY_MAX)

    def _on_trade(self, symbol: str, seq: int, payload: bytes) -> None:
        feed = self._feeds.get(symbol)
        metrics.FEED_MESSAGES.inc()
        if feed is None:
            return
        try:
            data = codec.decode(payload)
        except InvalidPayloadError as exc:
            self.bad_messages += 1
            metrics.FEED_BAD.inc()
            log.warning("skipping trade %s seq %d: %s", symbol, seq, exc)
            return
        if feed.sessions:
            frame = protocol.trade_frame(feed.prefix, payload.decode(), seq)
            for session in feed.sessions:
                session.offer_trade(symbol, seq, frame)
        for listener in feed.handlers:
            listener.offer_trade(symbol, seq, data)

    def _on_broadcast(self, payload: bytes) -> None:
        try:
            codec.decode(payload)
        except InvalidPayloadError as exc:
            log.warning("skipping broadcast: %s", exc)
            return
        self.broadcasts_received += 1
        frame = '{"type":"broadcast","data":' + payload.decode() + "}"
        for session in self.sessions:
            session.offer(frame)

    # -- /ws sessions ----------------------------------------------------------

    @property
    def client_count(self) -> int:
        return len(self.sessions)

    def register(self, session: ClientSession) -> None:
        self.sessions.add(session)
        metrics.CLIENTS.set(len(self.sessions))

    async def unregister(self, session: ClientSession) -> None:
        """Forget a client and release its feeds."""
        if session in self.sessions:
            self.sessions.discard(session)
            for k, v in session.stats().items():
                if k in self._past:
                    self._past[k] += v
            self._past["slow_disconnects"] += session.close_code == 1013
        metrics.CLIENTS.set(len(self.sessions))
        self.limits.forget(session)
        for symbol in list(session.symbols):
            await self._remove(symbol, session=session)
        session.symbols.clear()

    async def client_subscribe(self, session: ClientSession, request: protocol.Subscribe) -> None:
        """Subscribe a client; with ``since_seq``/``last``, replay history first.

        Limits (each answered with an error frame whose ``code`` is a ``limits.ErrorCode``;
        the session goes on): the subscribe rate and the symbols per client refuse the
        whole frame; the allow-list and the feeds per instance refuse the symbols concerned.
        """
        symbols = self.limits.admit(session, request)
        if symbols is None:
            return
        request = protocol.Subscribe(
            symbols=tuple(symbols), since_seq=request.since_seq, last=request.last, policy=request.policy
        )
        # Which symbols get history: all with "last" or an int "since_seq"; with a
        # per-symbol "since_seq" dict only the symbols it names (the others go live).
        since_of: dict[str, int | None] = {}
        for symbol in request.symbols:
            if isinstance(request.since_seq, dict):
                if symbol in request.since_seq:
                    since_of[symbol] = request.since_seq[symbol]
            elif request.since_seq is not None or request.last is not None:
                since_of[symbol] = request.since_seq
        replay = self.backend.supports_history
        full: list[str] = []
        for symbol in request.symbols:
            state = session.symbols.get(symbol)
            if state is None:
                if symbol not in self._feeds and len(self._feeds) >= self.settings.ws_max_feeds:
                    full.append(symbol)  # checked and added with no await between: a hard cap
                    since_of.pop(symbol, None)
                    continue
                state = session.symbols[symbol] = SymbolState()
            state.conflate = request.conflate
            if replay and symbol in since_of and not session.replay_pending(symbol):
                session.begin_replay(symbol)
            try:
                await self._add(symbol, session=session)
            except BackendUnavailableError as exc:
                # Details only in the log: an error frame never carries internal exception text.
                log.warning("trades of %s unavailable for %s: %s", symbol, session.name, exc)
                message = f"trades of {symbol} are unavailable now; try again later"
                session.offer(limits.error_frame(limits.ErrorCode.UNAVAILABLE, message))
        if full:
            session.offer(
                limits.error_frame(
                    limits.ErrorCode.FEED_LIMIT,
                    f"this instance follows its limit of {self.settings.ws_max_feeds} symbols; "
                    f"not subscribed: {', '.join(full)}",
                )
            )
        session.offer(protocol.frame("subscribed", symbols=[s for s in request.symbols if s not in full]))
        requests: list[ReplayRequest] = []
        for symbol, since in since_of.items():
            if not replay:
                session.offer(
                    protocol.frame(
                        "history",
                        symbol=symbol,
                        count=0,
                        complete=False,
                        reason=f"the {self.backend_name} backend keeps no history",
                    )
                )
                continue
            feed = self._feeds.get(symbol)
            prefix = feed.prefix if feed is not None else protocol.trade_frame_head(symbol)
            requests.append(ReplayRequest(symbol=symbol, since_seq=since, last=request.last, prefix=prefix))
        if requests and self._replays is not None:
            self._replays.start(session, requests)
            # Back-pressure on the reader: no further frame of this client is read until
            # its replays are done (see fanout.replay).
            await session.wait_replays()

    async def client_unsubscribe(self, session: ClientSession, symbols: Iterable[str]) -> None:
        done = []
        for symbol in symbols:
            if session.symbols.pop(symbol, None) is not None:
                await self._remove(symbol, session=session)
                done.append(symbol)
        session.offer(protocol.frame("unsubscribed", symbols=done))

    def _lossy_clients(self, most: int = 20) -> list[dict[str, Any]]:
        """The connected clients that lost the most trades (conflated or dropped), at most ``most``."""
        lossy = [s for s in self.sessions if s.conflated or s.dropped]
        lossy.sort(key=lambda s: s.conflated + s.dropped, reverse=True)
        return [{"client": s.name, **s.stats()} for s in lossy[:most]]

    def stats(self) -> dict[str, Any]:
        """Counters of this instance (served at ``/api/v1/ws/stats``)."""
        totals = dict(self._past, queued=0)
        for session in self.sessions:
            for k, v in session.stats().items():
                totals[k] += v
        return {
            "instance": self.instance_id,
            "backend": self.backend_name,
            "clients": len(self.sessions),
            "feeds": sorted(s for s, f in self._feeds.items() if f.open),
            "broadcasts_received": self.broadcasts_received,
            "handler_dropped": self.handler_dropped,
            "clients_total": totals,
            "lossy_clients": self._lossy_clients(),
            "transport": self._backend.stats() if self._backend is not None else {},
            "replays": self._replays.stats() if self._replays is not None else {},
        }

"""``NatsWebSocketManager`` API on a real nats-server, in process: publish with a bounded
ack window, handlers, one feed per symbol, broadcast, history reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from liquidcrypto import NatsWebSocketManager, TradeEvent
from liquidcrypto.config import Settings
from liquidcrypto.errors import LiquidNatsError, NatsUnavailableError
from liquidcrypto.fanout import protocol
from liquidcrypto.fanout.nats_backend import NatsBackend
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.streams import TRADE_EVENTS
from tests.helpers import eventually, frozen, recording_session

MakeManager = Callable[..., Awaitable[NatsWebSocketManager]]


@pytest.fixture
async def make_manager(make_client: Callable[..., Awaitable[NatsClient]]) -> AsyncIterator[MakeManager]:
    made: list[NatsWebSocketManager] = []

    async def make(**settings: Any) -> NatsWebSocketManager:
        client = await make_client(settings=replace(Settings(), **settings))
        m = NatsWebSocketManager(client)
        await m.init()
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            await m.close()


async def test_spec_example_publish_and_subscribe(make_manager: MakeManager) -> None:
    ws_manager = await make_manager()
    got: list[Any] = []
    unsub = await ws_manager.subscribe_to_trade_events(["BTCUSDT", "ETHUSDT"], got.append)
    await ws_manager.publish_trade_event("BTCUSDT", {"price": 95000, "volume": 1.5})
    await ws_manager.publish_trade_event("ETHUSDT", {"price": 3500, "volume": 2})
    await ws_manager.flush()
    await eventually(lambda: len(got) == 2, what="two trades")
    # Each symbol is its own ordered feed; across symbols there is no order.
    assert sorted(got, key=lambda d: d["price"]) == [{"price": 3500, "volume": 2}, {"price": 95000, "volume": 1.5}]
    await unsub()
    await ws_manager.publish_trade_event("BTCUSDT", {"price": 1})
    await ws_manager.flush()
    # An async handler subscribed later still sees the new trade while the old one does not.
    seen: list[TradeEvent] = []

    async def meta_handler(event: TradeEvent) -> None:
        seen.append(event)

    unsub2 = await ws_manager.subscribe_to_trade_events("BTCUSDT", meta_handler, with_meta=True)
    await ws_manager.publish_trade_event("BTCUSDT", {"price": 2})
    await ws_manager.flush()
    await eventually(lambda: seen, what="meta trade")
    await unsub2()
    assert len(got) == 2
    assert seen[0].symbol == "BTCUSDT" and seen[0].data == {"price": 2} and seen[0].seq >= 4


async def test_cross_instance_delivery_and_one_feed_per_symbol(make_manager: MakeManager, client: NatsClient) -> None:
    a, b = await make_manager(), await make_manager()
    got_a: list[list[Any]] = [[], [], []]
    unsubs = [await a.subscribe_to_trade_events("SOL", got_a[i].append) for i in range(3)]
    got_b: list[Any] = []
    unsub_b = await b.subscribe_to_trade_events("SOL", got_b.append)
    # Three handlers on instance a share one feed: two consumers on the server in all.
    consumers = await client.js.consumers_info(TRADE_EVENTS)
    assert sum(c.config.filter_subject == "trades.SOL" for c in consumers) == 2
    assert a.stats()["feeds"] == ["SOL"] and b.stats()["feeds"] == ["SOL"]
    for i in range(50):
        await b.publish_trade_event("SOL", {"i": i})
    await b.flush()
    await eventually(lambda: all(len(g) == 50 for g in [*got_a, got_b]), what="50 trades everywhere")
    assert all(g == [{"i": i} for i in range(50)] for g in [*got_a, got_b])
    for u in unsubs[:2]:
        await u()
    assert a.stats()["feeds"] == ["SOL"]
    await unsubs[2]()
    assert a.stats()["feeds"] == []
    await unsub_b()
    # A closed feed deletes its consumer (nats-py's unsubscribe alone would leave it).
    consumers = await client.js.consumers_info(TRADE_EVENTS)
    assert not any(c.config.filter_subject == "trades.SOL" for c in consumers)


async def test_use_before_init_or_after_close_is_refused(client: NatsClient) -> None:
    m = NatsWebSocketManager(client)
    with pytest.raises(LiquidNatsError, match="init"):
        await m.publish_trade_event("BTCUSDT", {"price": 1})
    async with m:
        await m.publish_trade_event("BTCUSDT", {"price": 1})
    with pytest.raises(LiquidNatsError, match="closed"):
        await m.publish_trade_event("BTCUSDT", {"price": 1})
    with pytest.raises(LiquidNatsError, match="closed"):
        await m.init()


async def test_invalid_symbol_raises_before_anything_is_sent(make_manager: MakeManager) -> None:
    m = await make_manager()
    for bad in ["", "BTC.USD", "BTC USD", "*", ">"]:
        with pytest.raises(ValueError, match="symbol"):
            await m.publish_trade_event(bad, {"price": 1})
        with pytest.raises(ValueError, match="symbol"):
            await m.subscribe_to_trade_events(["OK", bad], print)
    assert m.stats()["transport"]["published"] == 0 and m.stats()["feeds"] == []


async def test_publisher_waits_when_the_ack_window_is_full(make_manager: MakeManager, nats_server: NatsServer) -> None:
    m = await make_manager(ws_publish_window=4)
    got: list[Any] = []
    unsub = await m.subscribe_to_trade_events("ADA", got.append)
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    published = 0

    async def publish_ten() -> None:
        nonlocal published
        for i in range(10):
            await m.publish_trade_event("ADA", {"i": i})
            published += 1

    with frozen(pid):  # no acks while the server is frozen
        task = asyncio.ensure_future(publish_ten())
        await eventually(lambda: published == 4 or task.done(), what="window filled")
        if task.done():
            task.result()  # raises what stopped the publisher
        await asyncio.wait({task}, timeout=0.5)
        # The fifth call waits instead of buffering: exactly the window is in flight.
        assert not task.done() and published == 4
        assert m.stats()["transport"]["inflight"] == 4
    await asyncio.wait_for(task, 10)
    await m.flush()
    stats = m.stats()["transport"]
    assert stats["acked"] == 10 and stats["failed"] == 0 and stats["window_waits"] >= 1
    await eventually(lambda: len(got) == 10, what="all ten delivered")
    assert got == [{"i": i} for i in range(10)]
    await unsub()


async def test_missing_acks_are_retried_with_the_same_id_and_stored_once(
    client: NatsClient, nats_server: NatsServer
) -> None:
    backend = NatsBackend(client, window=8, ack_timeout=0.5, retries=10)
    await backend.start(lambda symbol, seq, payload: None, lambda payload: None)
    assert nats_server.proc is not None
    pid = nats_server.proc.pid
    with frozen(pid):  # no acks: the watchdog retries after ack_timeout
        for i in range(5):
            await backend.publish("RTY", orjson.dumps({"i": i}))
        try:
            await eventually(lambda: backend.stats()["retrying"] == 5, what="all five retried")
        except AssertionError:
            raise AssertionError(str(backend.stats())) from None
        assert backend.stats()["inflight"] == 5
    await backend.flush(timeout=15)
    stats = backend.stats()
    await backend.stop()
    assert stats["acked"] == 5 and stats["failed"] == 0 and stats["inflight"] == 0
    info = await client.js.stream_info(TRADE_EVENTS, subjects_filter="trades.RTY")
    assert info.state.messages == 5  # the first publish and its retries share one Nats-Msg-Id


async def test_publish_without_nats_raises_unavailable(nats_server: NatsServer) -> None:
    client = NatsClient(nats_server.url, settings=Settings())
    await client.connect(wait=15)
    m = NatsWebSocketManager(client)
    await m.init()
    try:
        nats_server.stop()
        await eventually(lambda: not client.is_connected, what="disconnected")
        with pytest.raises(NatsUnavailableError):
            for _ in range(5000):
                await m.publish_trade_event("XRP", {"price": 1})
            await m.flush(timeout=3)
    finally:
        await m.close()
        await client.close()


async def test_slow_handler_does_not_delay_a_fast_one(make_manager: MakeManager) -> None:
    m = await make_manager(ws_queue_size=64)
    gate = asyncio.Event()
    slow_got: list[Any] = []
    fast_got: list[Any] = []

    async def slow(data: Any) -> None:
        await gate.wait()
        slow_got.append(data)

    async def fast(data: Any) -> None:  # a plain handler runs in a thread: up to ms per hop under load
        fast_got.append(data)

    u1 = await m.subscribe_to_trade_events("DOT", slow)
    u2 = await m.subscribe_to_trade_events("DOT", fast)
    for i in range(200):
        await m.publish_trade_event("DOT", {"i": i})
    await m.flush()
    await eventually(lambda: len(fast_got) == 200, what="fast handler got all")
    gate.set()
    await eventually(lambda: slow_got and slow_got[-1] == {"i": 199}, what="slow handler resumed")
    # The slow one lost its oldest trades (bounded queue) but got the newest.
    assert len(slow_got) <= 65
    await u1()
    await u2()


async def test_broadcast_reaches_every_instance(make_manager: MakeManager) -> None:
    a, b = await make_manager(), await make_manager()
    await a.broadcast({"notice": "maintenance"})
    await eventually(
        lambda: a.broadcasts_received >= 1 and b.broadcasts_received >= 1,
        what="broadcast received on both instances",
    )
    assert (a.broadcasts_received, b.broadcasts_received) == (1, 1)


async def test_history_since_and_last(make_manager: MakeManager) -> None:
    m = await make_manager()
    for i in range(30):
        await m.publish_trade_event("HIS" if i % 3 else "OTHER", {"i": i})
    await m.flush()
    backend = m.backend
    items, complete = await backend.history("HIS", since_seq=None, last=5, limit=100)
    assert complete and [orjson_i(p) for _, p in items] == [23, 25, 26, 28, 29]
    since = items[1][0]  # the seq of i=25
    items, complete = await backend.history("HIS", since_seq=since, last=None, limit=100)
    assert complete and [orjson_i(p) for _, p in items] == [26, 28, 29]
    items, complete = await backend.history("HIS", since_seq=0, last=None, limit=4)
    assert not complete and [orjson_i(p) for _, p in items] == [25, 26, 28, 29]
    items, complete = await backend.history("NONE", since_seq=0, last=None, limit=4)
    assert items == [] and complete


def orjson_i(payload: bytes) -> int:
    value: int = orjson.loads(payload)["i"]
    return value


async def test_feeds_asked_for_while_nats_is_down_open_when_it_comes_back(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "late")  # port chosen, not started yet
    client = NatsClient(srv.url, settings=Settings())
    await client.connect()  # degraded
    m = NatsWebSocketManager(client)
    await m.init()
    try:
        async with recording_session(m) as (session, sent):
            await m.client_subscribe(session, protocol.Subscribe(symbols=("LATE",)))
            await eventually(lambda: any(f["type"] == "error" for f in sent), what="error frame while down")
            assert "unavailable" in next(f for f in sent if f["type"] == "error")["message"]
            srv.start()
            await eventually(lambda: m.stats()["feeds"] == ["LATE"], timeout=20, what="feed opened on connect")
            await m.publish_trade_event("LATE", {"price": 1})
            await eventually(lambda: any(f["type"] == "trade" for f in sent), what="trade after recovery")
            assert [f["data"] for f in sent if f["type"] == "trade"] == [{"price": 1}]
    finally:
        await m.close()
        await client.close()
        srv.stop()


async def test_feed_resumes_without_gap_after_a_nats_restart(
    make_manager: MakeManager, nats_server: NatsServer
) -> None:
    m = await make_manager()
    got: list[TradeEvent] = []
    unsub = await m.subscribe_to_trade_events("RST", got.append, with_meta=True)
    for i in range(10):
        await m.publish_trade_event("RST", {"i": i})
    await m.flush()
    await eventually(lambda: len(got) == 10, what="first ten")
    nats_server.restart()
    client = m._client
    assert client is not None
    await eventually(lambda: client.is_connected, timeout=20, what="reconnected")
    for i in range(10, 20):
        await m.publish_trade_event("RST", {"i": i})
    await m.flush()
    await eventually(lambda: len(got) == 20, timeout=30, what="trades after the restart")
    assert [e.data["i"] for e in got] == list(range(20))
    await unsub()


async def test_feed_recreates_itself_after_slow_consumer_drops_without_loss(
    make_manager: MakeManager, make_client: Callable[..., Awaitable[NatsClient]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from liquidcrypto.fanout import nats_backend

    monkeypatch.setattr(nats_backend, "FEED_PENDING_MSGS", 64)  # tiny pending limit: drops on bursts
    m = await make_manager()
    got: list[TradeEvent] = []
    unsub = await m.subscribe_to_trade_events("SLOWC", got.append, with_meta=True)
    publisher = NatsWebSocketManager(await make_client())
    await publisher.init()
    try:
        for i in range(300):
            await publisher.publish_trade_event("SLOWC", {"i": i})
        await publisher.flush()
        await eventually(lambda: len(got) == 300, timeout=30, what="all 300 despite drops")
    finally:
        await publisher.close()
    client = m._client
    assert client is not None and client.slow_consumer_events > 0  # drops did happen...
    assert [e.data["i"] for e in got] == list(range(300))  # ...and nothing was lost or repeated
    await unsub()


async def test_a_broadcast_during_an_outage_is_not_stored_behind_the_callers_back(
    nats_server: NatsServer, client: NatsClient
) -> None:
    """Issue 10, finding 3 for the fan-out: a failed broadcast is not buffered and stored later."""
    backend = NatsBackend(client, ack_timeout=0.5)
    before = (await client.js.stream_info(TRADE_EVENTS)).state.messages
    nats_server.stop()
    await eventually(lambda: not client.is_connected, what="disconnect noticed")
    with pytest.raises(NatsUnavailableError) as info:
        await backend.broadcast(b'{"notice": "lost"}')
    assert info.value.sent is False
    nats_server.start()
    await client.wait_connected(15)
    await client.flush()
    assert (await client.js.stream_info(TRADE_EVENTS)).state.messages == before


async def test_a_gap_recreation_racing_a_reconnection_leaves_one_feed(client: NatsClient) -> None:
    """A feed re-created for a gap while a reconnection resumes every feed ends with one consumer."""
    backend = NatsBackend(client)
    got: list[int] = []

    async def on_broadcast(payload: bytes) -> None:
        return None

    await backend.start(lambda symbol, seq, raw: got.append(seq), on_broadcast)
    try:
        await backend.open_feed("RACE")
        generation = backend._feed_gen["RACE"]
        await asyncio.gather(backend.resume_feeds(), backend._recreate_feed("RACE", generation))
        consumers = await client.js.consumers_info(TRADE_EVENTS)
        assert [c.config.filter_subject for c in consumers].count("trades.RACE") == 1
        await client.js_publish("trades.RACE", {"p": 1})
        await eventually(lambda: len(got) == 1, what="the trade delivered")
        await client.flush()
        assert len(got) == 1
    finally:
        await backend.stop()

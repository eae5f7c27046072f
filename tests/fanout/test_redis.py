"""``WS_BACKEND=redis``: the same manager API and ``/ws`` protocol over real Redis pub/sub,
with per-symbol sequences and counted gaps (no history)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from liquidcrypto import NatsWebSocketManager, TradeEvent
from liquidcrypto.config import Settings
from liquidcrypto.errors import RedisUnavailableError
from liquidcrypto.fanout import protocol
from liquidcrypto.nats.embedded import free_port
from tests.fanout.support import WsClient, app_instances
from tests.helpers import eventually, recording_session, redis_server

MakeManager = Callable[[], Awaitable[NatsWebSocketManager]]


@pytest.fixture
async def make_manager(redis_url: str) -> AsyncIterator[MakeManager]:
    made: list[NatsWebSocketManager] = []

    async def make() -> NatsWebSocketManager:
        m = NatsWebSocketManager(settings=replace(Settings(), ws_backend="redis", redis_url=redis_url))
        await m.init()
        made.append(m)
        return m

    try:
        yield make
    finally:
        for m in made:
            await m.close()


async def test_same_api_across_instances_with_sequences(make_manager: MakeManager) -> None:
    a, b = await make_manager(), await make_manager()
    got_a: list[Any] = []
    got_b: list[TradeEvent] = []
    unsub_a = await a.subscribe_to_trade_events(["BTCUSDT", "ETHUSDT"], got_a.append)
    unsub_b = await b.subscribe_to_trade_events("BTCUSDT", got_b.append, with_meta=True)
    for i in range(50):
        await b.publish_trade_event("BTCUSDT", {"price": 95000 + i})
    await a.publish_trade_event("ETHUSDT", {"price": 3500})
    await a.flush()
    await eventually(lambda: len(got_a) == 51 and len(got_b) == 50, what="trades on both instances")
    assert [d for d in got_a if d["price"] > 90000] == [{"price": 95000 + i} for i in range(50)]
    assert [e.seq for e in got_b] == list(range(1, 51))
    assert a.stats()["feeds"] == ["BTCUSDT", "ETHUSDT"] and a.stats()["transport"]["gaps"] == 0
    await unsub_a()
    assert a.stats()["feeds"] == []
    await unsub_b()
    with pytest.raises(ValueError, match="symbol"):
        await a.publish_trade_event("BTC.USD", {})


async def test_a_trade_published_right_after_subscribing_arrives(make_manager: MakeManager) -> None:
    a, b = await make_manager(), await make_manager()
    got: list[Any] = []
    for n in range(100):
        await a.subscribe_to_trade_events(f"SUB{n}", got.append)  # returns once Redis confirmed
        await b.publish_trade_event(f"SUB{n}", {"n": n})
    await eventually(lambda: len(got) == 100, what="100 trades")
    assert sorted(d["n"] for d in got) == list(range(100))


async def test_redis_down_at_start_then_trades_and_broadcasts_flow_once_it_is_up(tmp_path: Path) -> None:
    port = free_port()
    m = NatsWebSocketManager(settings=replace(Settings(), ws_backend="redis", redis_url=f"redis://127.0.0.1:{port}"))
    await m.init()  # returns: Redis is not there yet
    got: list[Any] = []
    try:
        async with recording_session(m, "waiting") as (session, frames):
            with pytest.raises(RedisUnavailableError):
                await m.subscribe_to_trade_events("LATE", got.append)
            await m.client_subscribe(session, protocol.Subscribe(symbols=("WAIT",)))
            await eventually(lambda: any(f["type"] == "error" for f in frames), what="error frame while down")
            with redis_server(tmp_path, port):

                async def subscribed() -> bool:
                    try:
                        await m.subscribe_to_trade_events("LATE", got.append)
                    except RedisUnavailableError:
                        return False
                    return True

                await eventually(subscribed, what="a subscription once Redis is up")
                await m.publish_trade_event("LATE", {"a": 1})
                await eventually(lambda: got == [{"a": 1}], what="the trade")
                # The client that asked while Redis was down gets trades without asking again.
                await eventually(lambda: "WAIT" in m.stats()["feeds"], timeout=15, what="the waiting feed opened")
                await m.publish_trade_event("WAIT", {"w": 1})
                await eventually(lambda: any(f["type"] == "trade" for f in frames), what="a trade for the waiting one")
                assert [f["data"] for f in frames if f["type"] == "trade"] == [{"w": 1}]

                async def broadcast_arrived() -> bool:  # the reader re-subscribes with back-off
                    if m.broadcasts_received:
                        return True
                    await m.broadcast({"hello": 1})
                    return False

                await eventually(broadcast_arrived, timeout=15, interval=0.1, what="a broadcast")
    finally:
        await m.close()


async def test_broadcast(make_manager: MakeManager) -> None:
    a, b = await make_manager(), await make_manager()
    await a.broadcast({"notice": "hello"})
    await eventually(lambda: a.broadcasts_received == 1 and b.broadcasts_received == 1, what="broadcast")


async def test_silent_resubscribe_after_redis_drops_the_subscriber_is_counted_as_a_gap(
    make_manager: MakeManager, redis_url: str
) -> None:
    pub, sub = await make_manager(), await make_manager()
    got: list[TradeEvent] = []
    unsub = await sub.subscribe_to_trade_events("GAP", got.append, with_meta=True)
    admin = aioredis.from_url(redis_url)
    stop = asyncio.Event()
    sent = 0

    async def publish() -> None:
        nonlocal sent
        while not stop.is_set():
            await pub.publish_trade_event("GAP", {"i": sent})
            sent += 1

    task = asyncio.ensure_future(publish())
    try:
        await eventually(lambda: len(got) >= 100, what="first trades")
        # What Redis does to a subscriber over its output-buffer limit: drop the connection.
        killed = await admin.client_kill_filter(_type="pubsub")
        assert killed >= 1
        await eventually(lambda: sub.stats()["transport"]["gaps"] > 0, timeout=15, what="gap detected")
        mark = len(got)
        await eventually(lambda: len(got) > mark + 50, what="delivery resumed after resubscribe")
    finally:
        stop.set()
        await task
        await unsub()
        await admin.aclose()
    gaps = sub.stats()["transport"]["gaps"]
    seqs = [e.seq for e in got]
    assert seqs == sorted(seqs)
    # Every trade published is delivered, counted as a gap, or counted as dropped by a lagging handler.
    assert len(got) + gaps + sub.stats()["handler_dropped"] == seqs[-1] - seqs[0] + 1


async def test_ws_clients_on_two_redis_instances_without_nats(redis_url: str, tmp_path: Path) -> None:
    env = {"WS_BACKEND": "redis", "REDIS_URL": redis_url, "NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    with app_instances(2, env, tmp_path) as apps:
        a = await WsClient.connect(apps[0].ws)
        b = await WsClient.connect(apps[1].ws)
        assert a.frames[0]["backend"] == "redis" and a.frames[0]["history"] is False
        await a.subscribe(["XR1"])
        await b.subscribe(["XR1"], last=10)
        hist = await b.recv_type("history")
        assert hist["complete"] is False and "no history" in hist["reason"]
        m = NatsWebSocketManager(settings=replace(Settings(), ws_backend="redis", redis_url=redis_url))
        await m.init()
        try:
            for i in range(30):
                await m.publish_trade_event("XR1", {"i": i})
            await m.broadcast({"hello": 1})
            got_a, got_b = await a.trades(30), await b.trades(30)
            assert [t["data"] for t in got_a] == [{"i": i} for i in range(30)]
            assert [t["seq"] for t in got_a] == [t["seq"] for t in got_b]
            assert (await a.recv_type("broadcast"))["data"] == {"hello": 1}
            await a.send("nonsense")
            assert "not valid JSON" in (await a.recv_type("error"))["message"]
        finally:
            await m.close()
            await a.close()
            await b.close()

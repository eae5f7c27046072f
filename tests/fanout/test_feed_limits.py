"""Issue 11, findings 1 and 7: a hostile client cannot exhaust the server's consumers, and a
feed whose resumption failed comes back. Real nats-server (with an account consumer limit,
as a production account has), real uvicorn app, real WebSocket clients."""

from __future__ import annotations

import asyncio
import random
import string
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from liquidcrypto import NatsWebSocketManager, TradeEvent
from liquidcrypto.config import Settings
from liquidcrypto.fanout import protocol
from liquidcrypto.fanout.limits import SymbolFilter
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.streams import TRADE_EVENTS
from tests.fanout.support import WsClient, app_instances
from tests.helpers import eventually, recording_session


def account_limits(max_consumers: int) -> str:
    """nats-server config: the default user's account may hold ``max_consumers`` consumers."""
    return (
        "accounts {\n"
        "  APP {\n"
        f"    jetstream: {{max_mem: 512M, max_file: 1G, max_streams: -1, max_consumers: {max_consumers}}}\n"
        '    users: [{user: "app", password: "app"}]\n'
        "  }\n"
        "}\n"
        "no_auth_user: app\n"
    )


@pytest.fixture
def limited_nats(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path / "nats", extra_config=account_limits(60))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def consumer_count(client: NatsClient) -> int:
    return int((await client.js.stream_info(TRADE_EVENTS)).state.consumer_count)


def random_symbols(n: int) -> list[str]:
    return ["".join(random.choices(string.ascii_uppercase, k=10)) for _ in range(n)]


async def until_pong(ws: WsClient, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Send a ping and read every frame up to its pong (the session still answers)."""
    await ws.send({"action": "ping"})
    start = len(ws.frames)
    await ws.recv_type("pong", timeout)
    return ws.frames[start:]


async def until_pong_after(ws: WsClient, frame: dict[str, Any]) -> list[dict[str, Any]]:
    """Send ``frame`` then a ping; the frames received up to the pong."""
    start = len(ws.frames)
    await ws.send(frame)
    await until_pong(ws)
    return ws.frames[start:]


async def test_subscribe_churn_keeps_consumers_bounded_and_btcusdt_available(
    limited_nats: NatsServer, tmp_path: Path
) -> None:
    env = {
        "NATS_URL": limited_nats.url,
        "WS_MAX_FEEDS": "40",
        "WS_SUBSCRIBE_RATE": "50",
        "WS_SUBSCRIBE_BURST": "100",
    }
    client = NatsClient(limited_nats.url, settings=Settings())
    await client.connect(wait=15)
    counts: list[int] = []
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            counts.append(await consumer_count(client))
            await asyncio.sleep(0.01)

    try:
        with app_instances(1, env, tmp_path) as (app,):
            hostile = await WsClient.connect(app.ws)
            sampler = asyncio.create_task(sample())
            for _ in range(20):  # as fast as it goes: no waiting for replies
                symbols = random_symbols(100)
                await hostile.send({"action": "subscribe", "symbols": symbols})
                await hostile.send({"action": "unsubscribe", "symbols": symbols})
            await until_pong(hostile)
            stop.set()
            await sampler
            errors = [f for f in hostile.frames if f["type"] == "error"]
            codes = {f.get("code") for f in errors}
            assert {"feed_limit", "rate_limited"} <= codes, codes
            assert max(counts) <= 40, f"up to {max(counts)} consumers during the churn"

            async def released() -> bool:
                return await consumer_count(client) == 0

            await eventually(released, what="every consumer of the churn deleted")

            legit = await WsClient.connect(app.ws)
            await legit.subscribe(["BTCUSDT"])
            t0 = time.monotonic()
            await client.js_publish("trades.BTCUSDT", {"price": 95000})
            trade = (await legit.trades(1, timeout=1.0))[0]
            assert trade["symbol"] == "BTCUSDT" and time.monotonic() - t0 < 1.0
            await hostile.close()
            await legit.close()
    finally:
        stop.set()
        await client.close()


async def test_symbols_outside_the_allow_list_are_refused_without_a_consumer(
    limited_nats: NatsServer, tmp_path: Path
) -> None:
    env = {"NATS_URL": limited_nats.url, "WS_SYMBOLS": "BTCUSDT, ETH*", "WS_MAX_SYMBOLS": "3"}
    client = NatsClient(limited_nats.url, settings=Settings())
    await client.connect(wait=15)
    try:
        with app_instances(1, env, tmp_path) as (app,):
            ws = await WsClient.connect(app.ws)
            reply = await ws.subscribe(["RANDOM1", "BTCUSDT", "ETHUSDT"])
            assert reply["symbols"] == ["BTCUSDT", "ETHUSDT"]
            error = next(f for f in ws.frames if f["type"] == "error")
            assert error["code"] == "symbol_not_allowed" and "RANDOM1" in error["message"]
            assert await consumer_count(client) == 2
            await client.js_publish("trades.ETHUSDT", {"price": 3000})
            assert (await ws.trades(1, timeout=2.0))[0]["symbol"] == "ETHUSDT"
            # Two more would make four symbols for this client: the frame is refused, the session goes on.
            frames = await until_pong_after(ws, {"action": "subscribe", "symbols": ["ETHBTC", "ETHEUR"]})
            over = [f for f in frames if f["type"] == "error"]
            assert [f["code"] for f in over] == ["symbol_limit"] and "limit of 3" in over[0]["message"]
            assert not any(f["type"] == "subscribed" for f in frames)
            assert await consumer_count(client) == 2
            await ws.close()
    finally:
        await client.close()


async def test_a_feed_whose_resumption_failed_comes_back(tmp_path: Path) -> None:
    """Finding 7: the consumer limit is reached when the feed resumes after a reconnection;
    once a consumer is freed the feed reopens (from where it stopped) and trades flow."""
    srv = NatsServer(tmp_path / "nats", extra_config=account_limits(4))
    srv.start()
    client = NatsClient(srv.url, settings=Settings())
    await client.connect(wait=15)
    other = NatsClient(srv.url, settings=Settings())
    await other.connect(wait=15)
    m = NatsWebSocketManager(client)
    await m.init()
    try:
        got: list[TradeEvent] = []
        unsub = await m.subscribe_to_trade_events("RESUME", got.append, with_meta=True)
        await client.js_publish("trades.RESUME", {"i": 0})
        await eventually(lambda: len(got) == 1, what="first trade")
        # Durable consumers survive the restart; with the lower limit they fill the account.
        for i in range(3):
            await other.js.add_consumer(TRADE_EVENTS, durable_name=f"block{i}", filter_subject=f"trades.B{i}")
        srv.stop()
        srv.extra_config = account_limits(3)
        srv.start()
        await eventually(lambda: "RESUME" not in m.stats()["feeds"], timeout=20, what="the failed feed marked closed")
        await other.wait_connected(20)
        await other.js_publish("trades.RESUME", {"i": 1})
        await other.js.delete_consumer(TRADE_EVENTS, "block0")  # room again
        await eventually(lambda: "RESUME" in m.stats()["feeds"], timeout=15, what="the feed reopened")
        await other.js_publish("trades.RESUME", {"i": 2})
        await eventually(lambda: len(got) == 3, timeout=10, what="trades after the feed came back")
        assert [e.data["i"] for e in got] == [0, 1, 2]
        await unsub()
    finally:
        await m.close()
        await other.close()
        await client.close()
        srv.stop()


async def test_a_feed_refused_by_the_consumer_limit_opens_once_there_is_room(tmp_path: Path) -> None:
    """Before, a feed that could not open waited for the next reconnection, which never came:
    the client was told "unavailable" and got nothing, even after consumers were freed."""
    srv = NatsServer(tmp_path / "nats", extra_config=account_limits(2))
    srv.start()
    client = NatsClient(srv.url, settings=Settings())
    await client.connect(wait=15)
    m = NatsWebSocketManager(client)
    await m.init()
    try:
        for i in range(2):
            await client.js.add_consumer(TRADE_EVENTS, durable_name=f"block{i}", filter_subject=f"trades.B{i}")
        async with recording_session(m) as (session, sent):
            await m.client_subscribe(session, protocol.Subscribe(symbols=("BTCUSDT",)))
            await eventually(lambda: any(f["type"] == "subscribed" for f in sent), what="subscribed")
            errors = [f for f in sent if f["type"] == "error"]
            assert [f["code"] for f in errors] == ["unavailable"]
            await client.js.delete_consumer(TRADE_EVENTS, "block0")
            await eventually(lambda: m.stats()["feeds"] == ["BTCUSDT"], timeout=10, what="the feed opened")
            await client.js_publish("trades.BTCUSDT", {"price": 95000})
            await eventually(lambda: any(f["type"] == "trade" for f in sent), what="a trade")
    finally:
        await m.close()
        await client.close()
        srv.stop()


def test_the_allow_list_takes_exact_symbols_and_globs() -> None:
    allowed = SymbolFilter("BTCUSDT, ETH*,*USD[CT]")
    candidates = ("BTCUSDT", "ETHBTC", "SOLUSDC", "SOLUSDT", "SOLUSD", "btcusdt", "XBTCUSD")
    assert [s for s in candidates if allowed.allows(s)] == ["BTCUSDT", "ETHBTC", "SOLUSDC", "SOLUSDT"]
    assert SymbolFilter(None).allows("ANYTHING") and SymbolFilter(" ").allows("ANYTHING")
    with pytest.raises(ValueError, match="BTCUSDT,,ETH"):
        SymbolFilter("BTCUSDT,,ETH*")


def test_limits_must_be_positive() -> None:
    for name in ("WS_MAX_FEEDS", "WS_SUBSCRIBE_RATE", "WS_SUBSCRIBE_BURST"):
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: "0"})
    settings = Settings.from_env({"WS_MAX_FEEDS": "5", "WS_SUBSCRIBE_RATE": "2.5", "WS_SYMBOLS": "BTCUSDT"})
    assert (settings.ws_max_feeds, settings.ws_subscribe_rate, settings.ws_symbols) == (5, 2.5, "BTCUSDT")

"""End-to-end: two app instances (real uvicorn processes) on one real nats-server, real
WebSocket clients (the ``websockets`` library)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from liquidcrypto import NatsWebSocketManager, TradeEvent
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.fanout.support import AppInstance, WsClient, app_instances
from tests.fanout.test_auth import make_jwt
from tests.helpers import eventually


@pytest.fixture(scope="module")
def two_apps(module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[AppInstance]]:
    env = {"NATS_URL": module_nats.url, "WS_BACKEND": "nats", "WS_MAX_SYMBOLS": "5"}
    with app_instances(2, env, tmp_path_factory.mktemp("apps")) as apps:
        yield apps


async def publisher(url: str) -> tuple[NatsClient, NatsWebSocketManager]:
    client = NatsClient(url, settings=Settings())
    await client.connect(wait=15)
    manager = NatsWebSocketManager(client)
    await manager.init()
    return client, manager


async def test_trade_published_anywhere_reaches_clients_of_both_instances(
    module_nats: NatsServer, two_apps: list[AppInstance]
) -> None:
    a = await WsClient.connect(two_apps[0].ws)
    b = await WsClient.connect(two_apps[1].ws)
    await a.subscribe(["XA1"])
    await b.subscribe(["XA1"])
    client, manager = await publisher(module_nats.url)
    try:
        for i in range(20):
            await manager.publish_trade_event("XA1", {"price": 95000 + i, "volume": 1.5})
        await manager.flush()
        got_a, got_b = await a.trades(20), await b.trades(20)
    finally:
        await manager.close()
        await client.close()
        await a.close()
        await b.close()
    assert [t["data"] for t in got_a] == [{"price": 95000 + i, "volume": 1.5} for i in range(20)]
    assert [t["seq"] for t in got_a] == [t["seq"] for t in got_b]
    assert all(t["symbol"] == "XA1" and t["type"] == "trade" for t in got_a + got_b)
    seqs = [t["seq"] for t in got_a]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20


async def test_subscribe_unsubscribe_and_one_feed_per_symbol_per_instance(
    module_nats: NatsServer, two_apps: list[AppInstance]
) -> None:
    app = two_apps[0]
    clients = [await WsClient.connect(app.ws) for _ in range(3)]
    client, manager = await publisher(module_nats.url)
    try:
        for c in clients:
            await c.subscribe(["XS1", "XS2"])
        assert {"XS1", "XS2"} <= set(app.stats()["feeds"])
        consumers = await client.js.consumers_info("TRADE_EVENTS")
        # Three clients, one consumer per symbol on this instance.
        assert sum(c.config.filter_subject == "trades.XS1" for c in consumers) == 1
        await clients[0].send({"action": "unsubscribe", "symbols": ["XS1"]})
        assert (await clients[0].recv_type("unsubscribed"))["symbols"] == ["XS1"]
        await manager.publish_trade_event("XS1", {"n": 1})
        await manager.publish_trade_event("XS2", {"n": 2})
        await manager.flush()
        first = (await clients[0].trades(1))[0]
        assert first["symbol"] == "XS2"  # XS1 is no longer sent to it
        for c in clients[1:]:
            got = await c.trades(2)
            assert sorted(t["symbol"] for t in got) == ["XS1", "XS2"]
        for c in clients[1:]:
            await c.send({"action": "unsubscribe", "symbols": ["XS1"]})
            await c.recv_type("unsubscribed")
        assert "XS1" not in app.stats()["feeds"] and "XS2" in app.stats()["feeds"]
        for c in clients:
            await c.close()
        await eventually(lambda: "XS2" not in app.stats()["feeds"], what="feed closed with its last client")
    finally:
        await manager.close()
        await client.close()


async def test_history_then_live_without_gap_or_duplicate_and_resume_on_the_other_instance(
    module_nats: NatsServer, two_apps: list[AppInstance]
) -> None:
    client, manager = await publisher(module_nats.url)
    got_seq: list[int] = []
    unsub = await manager.subscribe_to_trade_events("XH1", lambda e: got_seq.append(e.seq), with_meta=True)
    stop = asyncio.Event()
    count = 0

    async def publish_forever() -> None:
        nonlocal count
        # Bounded, so the resume below stays within WS_HISTORY_MAX however slow the machine is.
        while not stop.is_set() and count < 2000:
            await manager.publish_trade_event("XH1", {"i": count})
            await manager.publish_trade_event("XH1-NOISE", {"i": count})
            count += 1
            if count % 10 == 0:
                await asyncio.sleep(0.002)

    pub = asyncio.ensure_future(publish_forever())
    try:
        await eventually(lambda: count >= 300, what="300 trades stored")
        # Ask for everything since i=0 while trades keep coming: history hands over to live.
        a = await WsClient.connect(two_apps[0].ws)
        await a.subscribe(["XH1"], since_seq=0)
        got = await a.trades(600, timeout=20)
        hist = next(f for f in a.frames if f["type"] == "history")
        assert hist["complete"] is True and hist["count"] >= 300
        ids = [t["data"]["i"] for t in got]
        assert ids == list(range(600)), "gap or duplicate at the history/live hand-over"
        assert not any("missed" in f for f in a.frames)
        seqs = [t["seq"] for t in got]
        assert seqs == sorted(set(seqs))
        # Leave; trades go on; resume from the last sequence seen, on the other instance.
        await a.close()
        stop.set()
        await pub
        for _ in range(400):
            await manager.publish_trade_event("XH1", {"i": count})
            count += 1
        await manager.flush()
        # This one asks for batched messages: the replayed backlog comes in a few of them.
        b = await WsClient.connect(two_apps[1].ws + "?batch=1")
        await b.subscribe(["XH1"], since_seq=seqs[-1])
        more = await b.trades(count - 600, timeout=20)
        assert [t["data"]["i"] for t in more] == list(range(600, count))
        assert (await b.recv_type("history"))["complete"] is True
        assert b.messages < len(b.frames) / 10
        # "last": N gives the N most recent, then live.
        c = await WsClient.connect(two_apps[1].ws)
        await c.subscribe(["XH1"], last=5)
        assert [t["data"]["i"] for t in await c.trades(5)] == list(range(count - 5, count))
        assert (await c.recv_type("history"))["count"] == 5
        for i in range(count, count + 5):
            await manager.publish_trade_event("XH1", {"i": i})
        assert [t["data"]["i"] for t in await c.trades(5)] == list(range(count, count + 5))
        await b.close()
        await c.close()
    finally:
        stop.set()
        await pub
        await unsub()
        await manager.close()
        await client.close()


async def test_broadcast_and_ping(module_nats: NatsServer, two_apps: list[AppInstance]) -> None:
    a = await WsClient.connect(two_apps[0].ws)
    b = await WsClient.connect(two_apps[1].ws)
    client, manager = await publisher(module_nats.url)
    try:
        await manager.broadcast({"notice": "maintenance at 22:00"})
        for c in (a, b):
            assert (await c.recv_type("broadcast"))["data"] == {"notice": "maintenance at 22:00"}
        await a.send({"action": "ping"})
        assert (await a.recv())["type"] == "pong"
    finally:
        await manager.close()
        await client.close()
        await a.close()
        await b.close()


async def test_bad_frames_get_errors_and_abuse_closes_1008_without_affecting_others(
    module_nats: NatsServer, two_apps: list[AppInstance]
) -> None:
    app = two_apps[0]
    good = await WsClient.connect(app.ws)
    await good.subscribe(["XB1"])
    bad = await WsClient.connect(app.ws)
    cases = [
        ("this is not json", "not valid JSON"),
        ('{"action":"fly"}', "unknown action"),
        ('{"action":"subscribe","symbols":["BTC.USD"]}', "BTC.USD"),
        ('{"action":"subscribe","symbols":["A","B","C","D","E","F"]}', "limit of 5"),
        ('{"action":"subscribe","symbols":["A"],"last":-3}', "last"),
        ("x" * 70_000, "exceeds the limit"),
    ]
    for raw, expected in cases:
        await bad.send(raw)
        err = await bad.recv_type("error")
        assert expected in err["message"]
    # The symbol limit also counts earlier subscriptions.
    await bad.subscribe(["A1", "A2", "A3"])
    await bad.send({"action": "subscribe", "symbols": ["A4", "A5", "A6"]})
    assert "exceed the limit of 5" in (await bad.recv_type("error"))["message"]
    for _ in range(4):
        await bad.send("{broken")
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(20):
            await bad.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    client, manager = await publisher(module_nats.url)
    try:
        await manager.publish_trade_event("XB1", {"ok": True})
        await manager.flush()
        assert (await good.trades(1))[0]["data"] == {"ok": True}
    finally:
        await manager.close()
        await client.close()
        await good.close()


def stalled_socket(port: int) -> socket.socket:
    """A connected TCP socket with a tiny receive buffer, for a client that stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def stalled_client(app: AppInstance, symbol: str) -> WsClient:
    c = await WsClient.connect(app.ws, sock=stalled_socket(app.port), max_queue=1, compression=None)
    await c.subscribe([symbol])
    return c


PAD = "x" * 2000
N_STALL = 3000


async def publish_padded(manager: NatsWebSocketManager, symbol: str, n: int) -> None:
    for i in range(n):
        await manager.publish_trade_event(symbol, {"i": i, "pad": PAD})
    await manager.flush()


async def test_stalled_client_loses_oldest_counted_while_a_fast_client_gets_everything(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    env = {"NATS_URL": module_nats.url, "WS_QUEUE_SIZE": "64", "WS_CONFLATE_AT": "0", "WS_DISCONNECT_AFTER": "0"}
    with app_instances(1, env, tmp_path) as (app,):
        fast = await WsClient.connect(app.ws)
        await fast.subscribe(["XST"])
        slow = await stalled_client(app, "XST")
        client, manager = await publisher(module_nats.url)
        try:
            pub = asyncio.ensure_future(publish_padded(manager, "XST", N_STALL))
            got = await fast.trades(N_STALL, timeout=60)
            await pub
            assert [t["data"]["i"] for t in got] == list(range(N_STALL))
            assert not any("missed" in f for f in fast.frames)
            dropped = app.stats()["clients_total"]["dropped"]
            assert dropped > 0, app.stats()["clients_total"]
            # The stalled client reads again: every trade is either delivered or reported missed.
            received, missed = 0, 0
            while received + missed < N_STALL:
                frame = await slow.recv(timeout=10)
                missed += frame.get("missed", 0)
                received += frame["type"] == "trade"
            assert received + missed == N_STALL and missed == dropped
            ids = [f["data"]["i"] for f in slow.frames if f["type"] == "trade"]
            assert ids == sorted(ids) and ids[-1] == N_STALL - 1
        finally:
            await manager.close()
            await client.close()
            await fast.close()
            await slow.close()


async def test_disconnect_policy_closes_the_stalled_client_with_1013(module_nats: NatsServer, tmp_path: Path) -> None:
    env = {"NATS_URL": module_nats.url, "WS_QUEUE_SIZE": "64", "WS_CONFLATE_AT": "0", "WS_DISCONNECT_AFTER": "200"}
    with app_instances(1, env, tmp_path) as (app,):
        fast = await WsClient.connect(app.ws)
        await fast.subscribe(["XSD"])
        slow = await stalled_client(app, "XSD")
        client, manager = await publisher(module_nats.url)
        try:
            pub = asyncio.ensure_future(publish_padded(manager, "XSD", N_STALL))
            got = await fast.trades(N_STALL, timeout=60)
            await pub
            assert [t["data"]["i"] for t in got] == list(range(N_STALL))
            await eventually(lambda: app.stats()["clients"] == 1, what="slow client closed")
            assert app.stats()["clients_total"]["slow_disconnects"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await slow.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert "too slow" in closed.value.rcvd.reason
        finally:
            await manager.close()
            await client.close()
            await fast.close()
            await slow.close()


async def test_token_auth_and_client_limit(module_nats: NatsServer, tmp_path: Path) -> None:
    env = {"NATS_URL": module_nats.url, "WS_TOKEN": "s3cret", "WS_JWT_SECRET": "jwt-key", "WS_MAX_CLIENTS": "2"}
    with app_instances(1, env, tmp_path) as (app,):
        with pytest.raises(InvalidStatus) as rejected:
            await WsClient.connect(app.ws)
        assert rejected.value.response.status_code == 403
        with pytest.raises(InvalidStatus):
            await WsClient.connect(app.ws + "?token=wrong")
        a = await WsClient.connect(app.ws + "?token=s3cret")
        with pytest.raises(InvalidStatus):  # a JWT signed with another key
            await WsClient.connect(app.ws + "?token=" + make_jwt({"sub": "u"}, "other-key"))
        jwt = make_jwt({"sub": "u", "exp": time.time() + 60}, "jwt-key")
        b = await WsClient.connect(app.ws, additional_headers={"Authorization": f"Bearer {jwt}"})
        conn = await websockets.connect(app.ws + "?token=s3cret")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert "server full" in closed.value.rcvd.reason
        # The two admitted clients are unaffected.
        await a.send({"action": "ping"})
        assert (await a.recv())["type"] == "pong"
        await b.close()
        await a.close()


def test_dashboard_page_is_served(two_apps: list[AppInstance]) -> None:
    r = httpx.get(two_apps[0].http + "/", timeout=5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "new WebSocket(" in r.text and '"subscribe"' in r.text and "since_seq" in r.text


async def test_metrics_show_every_hop(module_nats: NatsServer, two_apps: list[AppInstance]) -> None:
    app = two_apps[1]
    c = await WsClient.connect(app.ws)
    await c.subscribe(["XM1"])
    client, manager = await publisher(module_nats.url)
    try:
        for i in range(5):
            await manager.publish_trade_event("XM1", {"i": i})
        await manager.flush()
        await c.trades(5)
    finally:
        await manager.close()
        await client.close()

    def sample(text: str, name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + " ") or ln.startswith(name + "{")]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    text = httpx.get(app.http + "/metrics", timeout=5).text
    assert sample(text, "liquidcrypto_ws_clients") >= 1
    assert sample(text, "liquidcrypto_ws_feeds") >= 1
    assert sample(text, "liquidcrypto_ws_feed_messages_total") >= 5
    assert sample(text, "liquidcrypto_ws_client_frames_sent_total") >= 5
    for name in (
        "liquidcrypto_ws_client_dropped_total",
        "liquidcrypto_ws_client_conflated_total",
        "liquidcrypto_ws_nats_slow_consumer_events",
        "liquidcrypto_ws_publish_window_full_total",
    ):
        assert name in text
    await c.close()


def test_public_names() -> None:
    import liquidcrypto

    for name in ("NatsWebSocketManager", "TradeEvent"):
        assert name in liquidcrypto.__all__ and hasattr(liquidcrypto, name)
    for method in ("init", "publish_trade_event", "subscribe_to_trade_events", "broadcast", "flush", "close"):
        assert callable(getattr(liquidcrypto.NatsWebSocketManager, method))


async def test_per_symbol_since_seq_resumes_each_symbol_and_leaves_the_others_live(
    module_nats: NatsServer, two_apps: list[AppInstance]
) -> None:
    client, manager = await publisher(module_nats.url)
    try:
        events: list[TradeEvent] = []
        unsub = await manager.subscribe_to_trade_events(["XP1", "XP2"], events.append, with_meta=True)
        for i in range(10):
            await manager.publish_trade_event("XP1", {"i": i})
            await manager.publish_trade_event("XP2", {"i": i})
        await manager.flush()
        await eventually(lambda: len(events) == 20, what="20 stored")
        xp1 = [e.seq for e in events if e.symbol == "XP1"]
        c = await WsClient.connect(two_apps[0].ws)
        await c.subscribe(["XP1", "XP2"], since_seq={"XP1": xp1[6]})
        replayed = await c.trades(3)
        assert [(t["symbol"], t["data"]["i"]) for t in replayed] == [("XP1", 7), ("XP1", 8), ("XP1", 9)]
        hist = await c.recv_type("history")
        assert hist["symbol"] == "XP1" and hist["complete"] is True
        await manager.publish_trade_event("XP2", {"i": 10})
        live = await c.trades(1)
        assert (live[0]["symbol"], live[0]["data"]["i"]) == ("XP2", 10)  # XP2: live only, no replay
        assert not any(f["type"] == "history" and f["symbol"] == "XP2" for f in c.frames)
        await c.close()
        await unsub()
    finally:
        await manager.close()
        await client.close()

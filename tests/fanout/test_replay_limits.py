"""History replay limits (issue 11, item 2): a client flooding ``subscribe`` frames with
``"last": 10000`` and never reading must not degrade the instance for its other clients.

Real nats-server, real uvicorn app process, real WebSocket clients (``websockets``, and a raw
socket for the client that never reads).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from liquidcrypto import NatsWebSocketManager
from liquidcrypto.config import Settings
from liquidcrypto.fanout import protocol
from liquidcrypto.fanout.replay import ReplayLimits, ReplayRequest, Replays, list_history
from liquidcrypto.fanout.session import ClientSession, QueuePolicy, SymbolState
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.streams import TRADE_EVENTS
from tests.fanout.support import AppInstance, WsClient, app_instances
from tests.helpers import eventually, recording_session

STORED = 10_000
FLOOD_FRAMES = 200
LIVE_RATE = 50  # trades per second for the honest client
LIVE_SECONDS = 8.0
MAX_REPLAYS = 8
PAD = "x" * 48  # a live trade of ~120 bytes, like a real one
# Stored trades of ~600 bytes: 10,000 of them (6 MB) do not fit in the socket buffers of a
# client that does not read (loopback send buffers grow to 4 MB), so its replay must pause.
STORED_PAD = "x" * 520
CPU_SHARE = 0.25  # of one core, for the app during the flood (~0.03 without it)


@pytest.fixture(scope="module")
def app(module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppInstance]:
    env = {"NATS_URL": module_nats.url, "WS_BACKEND": "nats", "WS_MAX_REPLAYS": str(MAX_REPLAYS)}
    with app_instances(1, env, tmp_path_factory.mktemp("replay-app")) as apps:
        yield apps[0]


async def publisher(url: str) -> tuple[NatsClient, NatsWebSocketManager]:
    client = NatsClient(url, settings=Settings())
    await client.connect(wait=15)
    manager = NatsWebSocketManager(client)
    await manager.init()
    return client, manager


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    assert match, text
    return int(match.group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def monitor(srv: NatsServer, path: str) -> Any:
    return httpx.get(srv.monitor_url + path, timeout=5).json()


def app_reconnects(app: AppInstance) -> float:
    text = httpx.get(app.http + "/metrics", timeout=5).text
    match = re.search(r"^liquidcrypto_nats_reconnects_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class NonReadingClient:
    """A raw WebSocket client that sends frames and never reads: after the handshake nothing
    is read from its socket, whose receive buffer is tiny (the ``websockets`` client reads
    ahead in the background however little one asks it to buffer)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    async def connect(cls, url: str) -> NonReadingClient:
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:  # the handshake answer (and maybe the start of the welcome frame)
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1024), 10)
            assert chunk, "closed during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head[:200]
        return cls(sock)

    async def send(self, text: str) -> None:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + masked
        await asyncio.get_running_loop().sock_sendall(self.sock, frame)

    async def close(self) -> None:
        self.sock.close()


async def store_trades(manager: NatsWebSocketManager, symbol: str, n: int) -> None:
    for i in range(n):
        await manager.publish_trade_event(
            symbol, {"i": i, "price": 95000.0 + i % 100, "volume": 1.5, "pad": STORED_PAD}
        )
    await manager.flush(30)


async def test_replay_flood_from_a_non_reading_client_leaves_the_instance_healthy(
    module_nats: NatsServer, app: AppInstance
) -> None:
    client, manager = await publisher(module_nats.url)
    assert app.proc is not None
    pid = app.proc.pid
    honest = flooder = None
    try:
        await store_trades(manager, "BTCUSDT", STORED)
        honest = await WsClient.connect(app.ws)
        await honest.subscribe(["BTCUSDT"])
        baseline_consumers = len(await client.js.consumers_info(TRADE_EVENTS))
        reconnects_before = app_reconnects(app)
        slow_before = monitor(module_nats, "/varz")["slow_consumers"]
        rss_before = rss_mb(pid)

        flooder = await NonReadingClient.connect(app.ws)
        frame = '{"action":"subscribe","symbols":["BTCUSDT"],"last":10000}'
        for _ in range(FLOOD_FRAMES):
            await asyncio.wait_for(flooder.send(frame), 10)

        stop = asyncio.Event()
        peak = {"rss": rss_before, "consumers": baseline_consumers}

        async def watch() -> None:
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], rss_mb(pid))
                with contextlib.suppress(Exception):  # a slow answer under load is not the point here
                    peak["consumers"] = max(peak["consumers"], len(await client.js.consumers_info(TRADE_EVENTS)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)

        latencies: list[float] = []
        ids: list[int] = []

        async def read_live() -> None:
            while True:
                frame = await honest.recv(30)
                if frame["type"] == "trade" and "sent" in frame["data"]:
                    latencies.append(time.time() - frame["data"]["sent"])
                    ids.append(frame["data"]["live"])

        watcher = asyncio.ensure_future(watch())
        reader = asyncio.ensure_future(read_live())
        total = int(LIVE_RATE * LIVE_SECONDS)
        try:
            start = time.monotonic()
            cpu_before = cpu_seconds(pid)
            for i in range(total):
                await manager.publish_trade_event("BTCUSDT", {"live": i, "sent": time.time(), "pad": PAD})
                await asyncio.sleep(max(0.0, start + (i + 1) / LIVE_RATE - time.monotonic()))
            await manager.flush()
            cpu_share = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - start)
            await eventually(lambda: len(ids) >= total, timeout=15, what="every live trade at the honest client")
        finally:
            stop.set()
            reader.cancel()
            await watcher

        # Every check, so that a failure shows the whole picture.
        problems: list[str] = []
        if ids != list(range(total)):
            problems.append(f"the honest client got {len(ids)} of {total} live trades, or out of order")
        latencies.sort()
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("inf")
        if p99 >= 0.1:
            p50, p90 = (latencies[int(len(latencies) * q)] for q in (0.5, 0.9))
            problems.append(
                f"p99 latency of live trades {p99 * 1000:.0f} ms during the flood "
                f"(p50 {p50 * 1000:.0f}, p90 {p90 * 1000:.0f}, max {latencies[-1] * 1000:.0f} ms)"
            )
        if cpu_share > CPU_SHARE:
            problems.append(f"the app used {cpu_share:.0%} of a core during the flood (work spawned by its frames)")
        if monitor(module_nats, "/varz")["slow_consumers"] != slow_before:
            problems.append("nats-server saw a slow consumer")
        closed = monitor(module_nats, "/connz?state=closed&limit=1000").get("connections") or []
        slow_closed = [c.get("reason") for c in closed if "slow" in str(c.get("reason", "")).lower()]
        if slow_closed:
            problems.append(f"nats-server cut connections as slow consumers: {slow_closed}")
        if app_reconnects(app) != reconnects_before:
            problems.append("the service's NATS connection was cut")
        if peak["consumers"] > baseline_consumers + MAX_REPLAYS:
            problems.append(
                f"{peak['consumers']} consumers on {TRADE_EVENTS} (baseline {baseline_consumers}, cap {MAX_REPLAYS})"
            )
        replays = app.stats().get("replays", {})
        if replays.get("refused"):
            problems.append(f"replays refused although the flooder's frames should wait unread: {replays}")
        if peak["rss"] - rss_before >= 60:
            problems.append(f"RSS grew from {rss_before:.0f} to {peak['rss']:.0f} MB")
        assert not problems, problems

        # The flooder leaves: its paused replay's consumers go too.
        await flooder.close()
        flooder = None

        async def consumers_back() -> bool:
            return len(await client.js.consumers_info(TRADE_EVENTS)) <= baseline_consumers

        await eventually(consumers_back, timeout=10, what="the replay consumers of the client that left deleted")
    finally:
        if flooder is not None:
            await flooder.close()
        if honest is not None:
            await honest.close()
        await manager.close()
        await client.close()


# -- the replay rules, in process (a real nats-server, the manager, recorded client sessions) --


async def make_manager(client: NatsClient, **settings: Any) -> NatsWebSocketManager:
    manager = NatsWebSocketManager(client, settings=Settings(**settings))
    await manager.init()
    return manager


def trades_of(frames: list[dict[str, Any]], symbol: str) -> list[int]:
    return [f["data"]["i"] for f in frames if f["type"] == "trade" and f["symbol"] == symbol]


async def test_history_is_read_in_pages_without_gap_and_its_consumers_are_deleted(client: NatsClient) -> None:
    m = await make_manager(client, ws_replay_page=64, ws_history_max=500)
    try:
        for i in range(900):
            await m.publish_trade_event("PG" if i % 3 else "PG-NOISE", {"i": i})
        await m.flush()
        stored = [i for i in range(900) if i % 3]
        cases: list[tuple[dict[str, Any], list[int], bool]] = [
            ({"last": 400}, stored[-400:], True),
            ({"since_seq": 0}, stored[-500:], False),  # more than WS_HISTORY_MAX: the newest 500
            ({"last": 1}, stored[-1:], True),
        ]
        for extra, expected, complete in cases:
            async with recording_session(m) as (session, sent):
                await asyncio.wait_for(m.client_subscribe(session, protocol.Subscribe(symbols=("PG",), **extra)), 20)
                history = await eventually(lambda: next((f for f in sent if f["type"] == "history"), None))
                assert trades_of(sent, "PG") == expected, extra
                assert (history["count"], history["complete"]) == (len(expected), complete), extra
        # A since_seq in the middle (stream sequence = i + 1: the stream is fresh).
        async with recording_session(m) as (session, sent):
            await m.client_subscribe(session, protocol.Subscribe(symbols=("PG",), since_seq=600))
            await eventually(lambda: any(f["type"] == "history" for f in sent), what="history frame")
            assert trades_of(sent, "PG") == [i for i in stored if i + 1 > 600]
        assert await client.js.consumers_info(TRADE_EVENTS) == []  # no page reader, no probe left
    finally:
        await m.close()


async def test_a_client_that_stops_reading_holds_no_consumer_and_resumes_where_it_paused(client: NatsClient) -> None:
    m = await make_manager(client, ws_replay_page=50, ws_queue_size=100, ws_conflate_at=50)
    gate = asyncio.Event()
    sent: list[dict[str, Any]] = []

    async def send(text: str) -> None:
        await gate.wait()
        sent.extend(orjson.loads(line) for line in text.split("\n"))

    try:
        for i in range(400):
            await m.publish_trade_event("PS", {"i": i})
        await m.flush()
        session = ClientSession(send, m.queue_policy, name="stalled")
        m.register(session)
        writer = asyncio.ensure_future(session.run_writer())
        sub = asyncio.ensure_future(m.client_subscribe(session, protocol.Subscribe(symbols=("PS",), last=400)))
        try:
            # The queue fills up to its soft limit, then the replay waits for room.
            await eventually(lambda: session.queued >= 49, what="queue filled by the replay")
            assert not sub.done(), "the reader must wait while the replay is pending"
            await eventually(
                lambda: m.stats()["replays"] == {"running": 0, "waiting": 0, "refused": 0},
                what="the stalled replay gave its read slot back",
            )

            async def only_the_feed() -> bool:
                infos = await client.js.consumers_info(TRADE_EVENTS)
                return [c.config.filter_subject for c in infos] == ["trades.PS"]

            await eventually(only_the_feed, what="no consumer held by the paused replay")
            assert session.queued <= 50
            gate.set()
            await asyncio.wait_for(sub, 20)
            await eventually(lambda: any(f["type"] == "history" for f in sent), what="history frame")
            assert trades_of(sent, "PS") == list(range(400))
        finally:
            gate.set()
            writer.cancel()
            await m.unregister(session)
            await session.cancel_tasks()
    finally:
        await m.close()


async def test_a_second_replay_of_a_pending_symbol_is_refused(client: NatsClient) -> None:
    m = await make_manager(client)
    gate = asyncio.Event()  # the client reads once it opens
    frames: list[dict[str, Any]] = []

    async def send(text: str) -> None:
        await gate.wait()
        frames.append(orjson.loads(text))

    try:
        for i in range(300):
            await m.publish_trade_event("PD", {"i": i})
        await m.flush()
        session = ClientSession(send, m.queue_policy, name="dup")
        m.register(session)
        session.spawn(session.run_writer(), "writer")
        first = asyncio.ensure_future(m.client_subscribe(session, protocol.Subscribe(symbols=("PD",), last=300)))
        await eventually(lambda: session.replay_pending("PD") and session.room == 0, what="first replay stalled")
        # Not through the endpoint (its reader waits for the first), but two frames handled at once.
        second = asyncio.ensure_future(m.client_subscribe(session, protocol.Subscribe(symbols=("PD",), last=300)))
        await eventually(lambda: m.stats()["replays"]["refused"] == 1, what="the second replay refused")
        assert session.replay_pending("PD") and not first.done()
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 20)
        await eventually(lambda: any(f["type"] == "history" for f in frames), what="history of the first")
        errors = [f for f in frames if f["type"] == "error"]
        assert len(errors) == 1 and errors[0]["code"] == "replay_pending" and errors[0]["symbol"] == "PD"
        assert [f["count"] for f in frames if f["type"] == "history"] == [300]
        assert trades_of(frames, "PD") == list(range(300))
        await m.unregister(session)
        await session.cancel_tasks()
    finally:
        gate.set()
        await m.close()


class GatedCursor:
    """One page of one trade, read once ``gate`` opens (holds a read slot until then)."""

    def __init__(self, gate: asyncio.Event) -> None:
        self.gate = gate
        self.complete = True
        self.done = False

    async def next_page(self, size: int) -> list[tuple[int, bytes]]:
        await self.gate.wait()
        self.done = True
        return [(1, b'{"i":1}')]

    async def pause(self) -> None:
        pass

    async def close(self) -> None:
        self.done = True


async def test_replays_past_the_cap_wait_in_turn_and_past_the_queue_are_refused_busy() -> None:
    gate = asyncio.Event()

    async def open_history(
        symbol: str, *, since_seq: int | None, last: int | None, limit: int, known_seq: int = 0
    ) -> GatedCursor:
        return GatedCursor(gate)

    replays = Replays(ReplayLimits(max_running=2, max_waiting=1), open_history)
    clients: list[tuple[ClientSession, list[dict[str, Any]]]] = []
    for n in range(4):
        frames: list[dict[str, Any]] = []

        async def send(text: str, frames: list[dict[str, Any]] = frames) -> None:
            frames.append(orjson.loads(text))

        session = ClientSession(send, QueuePolicy(), name=f"c{n}")
        session.symbols["X"] = SymbolState()
        session.begin_replay("X")
        session.spawn(session.run_writer(), "writer")
        clients.append((session, frames))
    request = ReplayRequest(symbol="X", since_seq=None, last=1, prefix=protocol.trade_frame_head("X"))
    try:
        for session, _ in clients[:3]:
            replays.start(session, [request])
        await eventually(lambda: (replays.running, replays.waiting) == (2, 1), what="two running, one waiting")
        busy, busy_frames = clients[3]
        replays.start(busy, [request])
        error = await eventually(lambda: next((f for f in busy_frames if f["type"] == "error"), None))
        assert error["code"] == "busy" and error["symbol"] == "X" and "retry" in error["message"]
        await asyncio.wait_for(busy.wait_replays(), 5)  # refused: the reader goes on
        assert not busy.symbols["X"].replaying  # and the symbol is live
        gate.set()
        for session, frames in clients[:3]:
            await asyncio.wait_for(session.wait_replays(), 5)
            history = await eventually(lambda frames=frames: next((f for f in frames if f["type"] == "history"), None))
            assert history["count"] == 1 and [f["seq"] for f in frames if f["type"] == "trade"] == [1]
        assert replays.stats() == {"running": 0, "waiting": 0, "refused": 1}
    finally:
        for session, _ in clients:
            await session.cancel_tasks()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WS_MAX_REPLAYS": "0"}, "WS_MAX_REPLAYS=0 must be at least 1"),
        ({"WS_REPLAY_PAGE": "0"}, "WS_REPLAY_PAGE=0 must be at least 1"),
        ({"WS_REPLAY_QUEUE": "-1"}, "WS_REPLAY_QUEUE=-1 must be at least 0"),
        ({"WS_MAX_REPLAYS": "many"}, "WS_MAX_REPLAYS='many'"),
    ],
)
def test_replay_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env(env)
    s = Settings.from_env({"WS_MAX_REPLAYS": "3", "WS_REPLAY_QUEUE": "0", "WS_REPLAY_PAGE": "100"})
    assert (s.ws_max_replays, s.ws_replay_queue, s.ws_replay_page) == (3, 0, 100)


async def test_a_client_leaving_mid_replay_takes_the_replay_consumer_with_it(
    client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from liquidcrypto.fanout import replay

    monkeypatch.setattr(replay, "HOLD_FOR", 60.0)  # the replay keeps its consumer while the client stalls
    m = await make_manager(client, ws_queue_size=100, ws_conflate_at=50)
    gate = asyncio.Event()

    async def send(text: str) -> None:
        await gate.wait()

    try:
        for i in range(400):
            await m.publish_trade_event("PL", {"i": i})
        await m.flush()
        session = ClientSession(send, m.queue_policy, name="leaver")
        m.register(session)
        session.spawn(session.run_writer(), "writer")
        sub = asyncio.ensure_future(m.client_subscribe(session, protocol.Subscribe(symbols=("PL",), last=400)))
        await eventually(lambda: session.queued >= 49 and m.stats()["replays"]["running"] == 1, what="replay stalled")

        async def replay_consumers() -> int:
            infos = await client.js.consumers_info(TRADE_EVENTS)
            return sum(c.config.deliver_subject is not None and c.config.filter_subject == "trades.PL" for c in infos)

        assert await replay_consumers() == 2  # the feed and the replay's reader
        # The client leaves, as the endpoint does it.
        await m.unregister(session)
        await session.cancel_tasks()
        sub.cancel()
        assert await client.js.consumers_info(TRADE_EVENTS) == []
        assert m.stats()["replays"]["running"] == 0
    finally:
        gate.set()
        await m.close()


async def test_asking_again_for_a_history_already_sent_reads_nothing(client: NatsClient) -> None:
    m = await make_manager(client, ws_replay_page=64)
    try:
        for i in range(300):
            await m.publish_trade_event("PA", {"i": i})
        await m.flush()
        async with recording_session(m) as (session, sent):
            for last in (200, 250, 250):
                await asyncio.wait_for(m.client_subscribe(session, protocol.Subscribe(symbols=("PA",), last=last)), 20)
            await eventually(lambda: sum(f["type"] == "history" for f in sent) == 3, what="three history frames")
            # Frames of a symbol never go back in sequence, so once the client has the newest
            # trade, another history has nothing to send (it used to be read and skipped).
            assert [f["count"] for f in sent if f["type"] == "history"] == [200, 0, 0]
            assert trades_of(sent, "PA") == list(range(100, 300))
            assert session.duplicates == 0
            await m.publish_trade_event("PA", {"i": 300})
            await m.client_subscribe(session, protocol.Subscribe(symbols=("PA",), since_seq=0))
            await eventually(lambda: trades_of(sent, "PA")[-1:] == [300], what="the live trade")
            assert trades_of(sent, "PA") == list(range(100, 301))
    finally:
        await m.close()


async def test_a_backend_without_paging_is_replayed_from_its_list() -> None:
    async def history(symbol: str, *, since_seq: int | None, last: int | None, limit: int) -> tuple[Any, bool]:
        return [(seq, b"{}") for seq in range(1, 11)], True

    cursor = await list_history(history)("X", since_seq=None, last=10, limit=100, known_seq=4)
    pages = []
    while not cursor.done:
        pages.append([seq for seq, _ in await cursor.next_page(4)])
    assert pages == [[5, 6, 7, 8], [9, 10]] and cursor.complete

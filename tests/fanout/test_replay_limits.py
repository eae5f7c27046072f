"""History replay limits (issue 11, item 2): a client flooding ``subscribe`` frames with
``"last": 10000`` and never reading must not degrade the instance for its other clients.

Real nats-server, real uvicorn app process, real WebSocket clients (``websockets``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from liquidcrypto import NatsWebSocketManager
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.streams import TRADE_EVENTS
from tests.fanout.support import AppInstance, WsClient, app_instances
from tests.helpers import eventually

STORED = 10_000
FLOOD_FRAMES = 200
LIVE_RATE = 50  # trades per second for the honest client
LIVE_SECONDS = 8.0
MAX_REPLAYS = 8
PAD = "x" * 48  # a trade of ~120 bytes, like a real one


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path_factory.mktemp("replay-nats"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


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


def monitor(srv: NatsServer, path: str) -> Any:
    return httpx.get(srv.monitor_url + path, timeout=5).json()


def app_reconnects(app: AppInstance) -> float:
    text = httpx.get(app.http + "/metrics", timeout=5).text
    match = re.search(r"^liquidcrypto_nats_reconnects_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def non_reading_client(url: str) -> Any:
    """A WebSocket client that never reads: a tiny receive buffer, and ``websockets`` stops
    reading the socket once one message is buffered (``max_queue=1``) and nobody calls recv."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    host, port = url.removeprefix("ws://").split("/")[0].split(":")
    sock.connect((host, int(port)))
    sock.setblocking(False)
    return await websockets.connect(url, sock=sock, max_queue=1, ping_interval=None, open_timeout=10)


async def store_trades(manager: NatsWebSocketManager, symbol: str, n: int) -> None:
    for i in range(n):
        await manager.publish_trade_event(symbol, {"i": i, "price": 95000.0 + i % 100, "volume": 1.5, "pad": PAD})
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

        flooder = await non_reading_client(app.ws)
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
            for i in range(total):
                await manager.publish_trade_event("BTCUSDT", {"live": i, "sent": time.time(), "pad": PAD})
                await asyncio.sleep(max(0.0, start + (i + 1) / LIVE_RATE - time.monotonic()))
            await manager.flush()
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
            problems.append(f"p99 latency of live trades {p99 * 1000:.0f} ms during the flood")
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

"""End-to-end: two app instances (real uvicorn processes) on one real nats-server, real
WebSocket clients (the ``websockets`` library)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.websocket_nats import NatsWebSocketManager
from tests.helpers import eventually
from tests.test_websocket_support import AppInstance, WsClient, app_instances


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    srv = NatsServer(tmp_path_factory.mktemp("ws-nats"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


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

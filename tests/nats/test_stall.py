"""A stalled server (SIGSTOP) and a dead read loop (issue 12, item 1): no zombie
connection, a stall noticed in seconds, and a health endpoint that never says 200 while
NATS or JetStream does not answer. Real nats-server processes, a real ``serve`` process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from liquidcrypto import NatsWebSocketManager
from liquidcrypto.config import Settings
from liquidcrypto.nats import hooks
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsCluster, NatsServer, free_port
from tests.fanout.support import WsClient
from tests.helpers import cli, eventually, frozen, http_get_json, wait_http


async def test_a_dead_read_loop_is_replaced_at_once(
    nats_server: NatsServer, make_client: Callable[..., Awaitable[NatsClient]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The old zombie: without forget_abandoned_pongs, the late PONG of a timed-out health
    # check stops nats-py's read loop while its state stays "connected". Pings every 60 s:
    # only the watchdog can notice it in time.
    monkeypatch.setattr(hooks, "forget_abandoned_pongs", lambda nc: 0)
    client = await make_client(ping_interval=60)
    publisher = await make_client()
    got: asyncio.Queue[Any] = asyncio.Queue()
    await client.subscribe("zombie.x", got.put)
    nc = client.nc
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid):
        assert (await client.health())["connected"] is False  # its round trip timed out
    await eventually(lambda: nc._reading_task is not None and nc._reading_task.done(), what="the read loop dead")
    started = time.monotonic()

    async def delivered() -> bool:
        await publisher.publish("zombie.x", "ping")
        try:
            return bool(await asyncio.wait_for(got.get(), 0.2) == "ping")
        except TimeoutError:
            return False

    await eventually(delivered, timeout=5, what="a message through a replaced read loop")
    assert time.monotonic() - started < 5
    assert client.reconnects + client.fresh_connects >= 1
    assert (await client.health())["connected"] is True


async def test_a_stalled_server_is_noticed_within_seconds(
    nats_server: NatsServer, make_client: Callable[..., Awaitable[NatsClient]]
) -> None:
    client = await make_client()  # default settings: NATS_PING_INTERVAL x NATS_MAX_OUTSTANDING_PINGS
    s = client.settings
    assert s.nats_ping_interval * (s.nats_max_outstanding_pings + 1) <= 6
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid):
        started = time.monotonic()
        await eventually(lambda: not client.is_connected, timeout=8, interval=0.05, what="the stall noticed")
        noticed = time.monotonic() - started
    assert noticed <= 7
    await client.wait_connected(10)
    got: asyncio.Queue[Any] = asyncio.Queue()
    await client.subscribe("stall.x", got.put)
    await client.publish("stall.x", 1)
    assert await asyncio.wait_for(got.get(), 5) == 1
    ack = await client.js_publish("agents.a.tasks.t", {"after": "stall"}, msg_id="after-stall")
    assert ack.stream == "A2A_TASKS"


Poll = tuple[float, int, dict[str, Any]]


async def _poll(url: str, seen: list[Poll], stop: asyncio.Event) -> None:
    """Poll the health endpoint as a load balancer would (3 s timeout, every 0.2 s);
    each answer is recorded with the time it came."""
    async with httpx.AsyncClient(timeout=3) as http:
        while not stop.is_set():
            try:
                resp = await http.get(url)
                seen.append((time.monotonic(), resp.status_code, resp.json()))
            except httpx.HTTPError:
                seen.append((time.monotonic(), 0, {}))
            await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_serve_through_a_five_second_freeze(tmp_path: Path, nats_server: NatsServer) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/nats/health"
    async with NatsClient(nats_server.url, settings=Settings()) as probe:
        await probe.wait_connected(15)
        manager = NatsWebSocketManager(probe)
        await manager.init()
        with cli(["serve"], {"NATS_URL": nats_server.url, "PORT": str(port)}, tmp_path) as svc:
            status, _ = await wait_http(url, svc)
            await eventually(lambda: _status_is(url, 200), timeout=20, what="healthy before the freeze")
            ws = await WsClient.connect(f"ws://127.0.0.1:{port}/ws")
            await ws.subscribe(["FRZ"])
            await manager.publish_trade_event("FRZ", {"n": 0})
            assert (await ws.trades(1, timeout=5))[0]["data"] == {"n": 0}

            seen: list[Poll] = []
            stop = asyncio.Event()
            assert nats_server.proc is not None
            with frozen(nats_server.proc.pid):
                poller = asyncio.ensure_future(_poll(url, seen, stop))
                await asyncio.sleep(5)  # the fault's duration, not a synchronisation
                thawed_at = time.monotonic()
            stop.set()
            await poller
            # Every answer given while the server was frozen (a poll sent just before the
            # thaw may see it answer again).
            during = [(status, body) for came, status, body in seen if came < thawed_at]
            assert len(during) >= 2, f"health polls answered while frozen: {seen}"
            for status, body in during:
                assert status == 503, f"health said {status} {body} while nats-server was frozen"
                assert body["connected"] is False or body["jetstream"]["enabled"] is False
            assert not any(status == 200 and not body["jetstream"]["enabled"] for _, status, body in seen)

            await eventually(lambda: _status_is(url, 200), timeout=5, interval=0.1, what="200 after SIGCONT")
            await manager.publish_trade_event("FRZ", {"n": 1})
            trade = (await ws.trades(1, timeout=5))[0]
            assert trade["data"] == {"n": 1}
            got: asyncio.Queue[Any] = asyncio.Queue()
            await probe.subscribe("freeze.after", got.put)
            await probe.publish("freeze.after", "core")
            assert await asyncio.wait_for(got.get(), 5) == "core"
            ack = await probe.js_publish("agents.a.tasks.t", {"after": "freeze"}, msg_id="after-freeze", timeout=5)
            assert ack.stream == "A2A_TASKS"
            await ws.close()
            assert svc.proc.poll() is None
            assert "InvalidStateError" not in svc.output and "Traceback" not in svc.output, svc.output[-3000:]
        await manager.close()


async def _status_is(url: str, expected: int) -> bool:
    try:
        return (await http_get_json(url, timeout=3))[0] == expected
    except httpx.HTTPError:
        return False


@pytest.mark.cluster
async def test_health_is_503_while_jetstream_does_not_answer(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    # The service stays on one node; the two others die: core NATS answers, JetStream has
    # no quorum. A load balancer must not route to it as if all were well.
    survivor, *others = nats_cluster.nodes
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/nats/health"
    env = {"NATS_URL": survivor.url, "PORT": str(port), "NATS_JS_REPLICAS": "3"}
    with cli(["serve"], env, tmp_path) as svc:
        await wait_http(url, svc)
        await eventually(lambda: _status_is(url, 200), timeout=30, what="healthy with the full cluster")
        for node in others:
            node.kill()

        async def unavailable() -> bool:
            status, body = await http_get_json(url, timeout=5)
            return status == 503 and body["connected"] is True and body["jetstream"]["enabled"] is False

        await eventually(unavailable, timeout=20, interval=0.2, what="503 with jetstream disabled")
        for _ in range(3):
            status, body = await http_get_json(url, timeout=5)
            assert status == 503, body
        for node in others:
            await asyncio.to_thread(node.start)
        await eventually(lambda: _status_is(url, 200), timeout=40, interval=0.2, what="200 once JetStream is back")

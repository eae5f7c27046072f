"""Issue 11, finding 2 (the metric part): when nats-server cuts the service's connection as a
slow consumer, the slow-consumer count says so. The server sends no ``-ERR`` for it (only
its log does: "Slow Consumer Detected: MaxPending of ... Exceeded"); the client sees the
socket closed, then reconnects to the same server, which stayed up."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually


def flood(url: str, subject: str, count: int, size: int) -> None:
    """Publish from another thread (its own loop and connection) while the test's loop is blocked."""

    async def go() -> None:
        pub = await nats.connect(url)
        for _ in range(count):
            await pub.publish(subject, b"x" * size)
        await pub.flush()
        await pub.close()

    asyncio.run(go())


async def test_a_server_side_slow_consumer_cut_is_counted(tmp_path: Path) -> None:
    srv = NatsServer(tmp_path / "nats", extra_config="max_pending: 1MB")
    srv.start()
    client = NatsClient(srv.url, settings=Settings())
    await client.connect(wait=15)
    got: list[bytes] = []

    async def on_msg(msg: Msg) -> None:
        got.append(msg.data)

    try:
        await client.subscribe_msgs("flood.x", on_msg)
        await client.flush()
        assert client.slow_consumer_events == 0
        publisher = threading.Thread(target=flood, args=(srv.url, "flood.x", 4000, 4096))
        publisher.start()
        time.sleep(3)  # this loop does not read its socket: 16 MB for it overflow the server's 1 MB max_pending
        publisher.join()
        await eventually(lambda: client.reconnects >= 1 and client.is_connected, timeout=20, what="reconnected")
        assert "Slow Consumer Detected" in srv.log_file.read_text()
        cuts = client.slow_consumer_events
        assert cuts >= 1 and client.server_cuts == cuts
        # A restart (a new server id) is an outage, not a slow consumer.
        reconnects = client.reconnects
        srv.restart()
        await eventually(lambda: client.reconnects > reconnects and client.is_connected, timeout=20, what="back")
        assert client.slow_consumer_events == cuts and client.server_cuts == cuts
    finally:
        await client.close()
        srv.stop()

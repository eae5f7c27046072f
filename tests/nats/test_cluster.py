"""A 3-node nats-server cluster: replicated streams and fail-over of the client."""

from __future__ import annotations

import asyncio

import pytest

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsCluster
from tests.helpers import eventually

pytestmark = pytest.mark.cluster


async def test_replicated_streams_and_failover(nats_cluster: NatsCluster) -> None:
    settings = Settings(nats_url=nats_cluster.url, js_replicas=3)
    async with NatsClient(settings=settings) as c:
        await c.wait_connected(20)
        for name in ("A2A_TASKS", "ORCHESTRATOR_TASKS", "TRADE_EVENTS"):
            info = await c.js.stream_info(name)
            assert info.config.num_replicas == 3
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
        ack = await c.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="before-failover")

        # Kill the node this client is connected to: it must fail over by itself.
        connected_port = c.nc.connected_url.port  # type: ignore[union-attr]
        victim = next(n for n in nats_cluster.nodes if n.port == connected_port)
        victim.kill()
        await eventually(
            lambda: c.is_connected and c.nc.connected_url.port != connected_port,  # type: ignore[union-attr]
            timeout=30,
            what="fail-over to another node",
        )

        async def stored_again() -> bool:
            try:
                await c.js_publish("agents.a.tasks.t", {"n": 2}, msg_id="after-failover", timeout=2)
                return True
            except Exception:  # noqa: BLE001 - a new stream leader may still be elected
                return False

        await eventually(stored_again, timeout=30, what="JetStream publish after fail-over")
        info = await c.js.stream_info("A2A_TASKS")
        assert info.state.last_seq >= ack.seq + 1

        async def healthy() -> bool:
            # The stream list is answered by the meta leader, which may just be re-elected.
            health = await c.health()
            return health["connected"] is True and health["jetstream"]["streams"] == 3

        await eventually(healthy, timeout=30, what="health with three streams after fail-over")

        received: asyncio.Queue[object] = asyncio.Queue()
        await c.subscribe("fanout.x", received.put)
        other = NatsClient(
            settings=Settings(nats_url=",".join(n.url for n in nats_cluster.nodes if n.port != connected_port))
        )
        await other.connect(wait=20)
        try:
            # The subscription reaches the other nodes over the routes asynchronously:
            # publish until one arrives.
            async def crossed() -> bool:
                await other.publish("fanout.x", {"via": "another node"})
                try:
                    return await asyncio.wait_for(received.get(), 0.5) == {"via": "another node"}
                except TimeoutError:
                    return False

            await eventually(crossed, timeout=10, what="a message published on another node")
        finally:
            await other.close()

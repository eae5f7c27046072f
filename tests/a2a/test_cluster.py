"""The A2A bus on a real 3-node cluster with replicas=3: a node dies, and durable
tasks, task histories and the registry carry on."""

from __future__ import annotations

from typing import Any

import pytest

from liquidcrypto import A2ABus
from liquidcrypto.a2a.lifecycle import TASK_STATES_BUCKET
from liquidcrypto.config import Settings
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsCluster
from tests.helpers import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


async def _retry(what: str, call: Any) -> Any:
    """Run ``call()`` until it succeeds: leaders are re-elected after a node dies."""
    result: list[Any] = []

    async def attempt() -> bool:
        try:
            result.append(await call())
            return True
        except Exception:  # noqa: BLE001 - JetStream unavailable during an election
            return False

    await eventually(attempt, timeout=30, interval=0.2, what=what)
    return result[0]


async def test_bus_survives_losing_a_node(nats_cluster: NatsCluster) -> None:
    settings = Settings(nats_url=nats_cluster.url, js_replicas=3)
    client = await NatsClient(settings=settings).connect(wait=30)
    bus = A2ABus(client)
    seen: list[int] = []
    try:
        await _retry(
            "durable subscription",
            lambda: bus.subscribe_to_tasks("ha.tasks.*", lambda t: seen.append(t.data), durable="ha"),
        )
        await bus.update_task_state("ha-task", "submitted")
        await bus.register_agent({"id": "ha-agent"}, heartbeat=False)
        info = await (await client.js.key_value(TASK_STATES_BUCKET)).status()
        assert info.stream_info.config.num_replicas == 3
        for i in range(3):
            await bus.publish_task("ha", "job", i)
        await eventually(lambda: seen == [0, 1, 2], timeout=20, what="before the failure")

        connected = client.nc.connected_url
        assert connected is not None
        victim = next(n for n in nats_cluster.nodes if n.port == connected.port)
        victim.kill()

        for i in range(3, 6):
            await _retry(
                f"publish {i}", lambda i=i: bus.publish_task("ha", "job", {"id": f"ha-{i}", "payload": i}, timeout=2)
            )
        await eventually(lambda: seen == list(range(6)), timeout=40, what="durable delivery after failover")
        change = await _retry("state change", lambda: bus.update_task_state("ha-task", "working"))
        assert change.seq == 2
        agents = await _retry("list agents", bus.list_agents)
        assert [a.id for a in agents] == ["ha-agent"]
    finally:
        await bus.close()
        await client.close()

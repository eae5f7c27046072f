"""A process started during a stream-leader election (issue 12, item 3): it comes up,
waits for JetStream within its call's timeout, and its first call succeeds. A real
3-node cluster with R3 streams; the leader is SIGKILLed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from liquidcrypto.config import Settings
from liquidcrypto.nats.client import ConnectionState, NatsClient, close_nats, get_client, init_nats
from liquidcrypto.nats.embedded import NatsCluster
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue.queue import WorkQueue, collect_results
from tests.helpers import eventually

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SESSION = "clu"
COUNT = 400


async def _results_stored(client: NatsClient) -> int:
    info = await client.js.stream_info(infra.TASKS_STREAM, subjects_filter=f"orchestrator.results.{SESSION}.>")
    return len(info.state.subjects or {})


async def test_a_collector_started_during_a_leader_election_collects_everything_once(
    nats_cluster: NatsCluster,
) -> None:
    settings = Settings(nats_url=nats_cluster.url, js_replicas=3)
    async with NatsClient(settings=settings) as producer:
        await producer.wait_connected(30)
        async with WorkQueue(producer) as wq:
            for i in range(COUNT):
                await wq.enqueue_orchestrator_task({"sessionId": SESSION, "subPrdId": f"t{i}"})

            def handler(task: Any) -> dict[str, Any]:
                return {"success": True, "output": task.sub_prd_id}

            await wq.start_orchestrator_worker(handler, concurrency=8)
            await eventually(lambda: _count_is(producer, COUNT), timeout=60, what="every result stored")
        info = await producer.js.stream_info(infra.TASKS_STREAM)
        assert info.cluster is not None and info.cluster.leader
        leader = info.cluster.leader
    victim = next(n for n in nats_cluster.nodes if n.server_name == leader)
    # The dead node first in the list, as a static configuration would have it.
    urls = ",".join([victim.url, *(n.url for n in nats_cluster.nodes if n is not victim)])
    victim.kill()

    # The collector process starts right after the kill: connect, then collect.
    await init_nats(urls, dont_randomize=True)
    try:
        results = await collect_results(SESSION, COUNT, 90)
        assert results.complete, results.missing
        assert len(results) == COUNT
        assert sorted(r.sub_prd_id for r in results) == sorted(f"t{i}" for i in range(COUNT))
        # Collected once: they left the stream, and a second collection finds none.
        assert await _results_stored(get_client()) == 0
        again = await collect_results(SESSION, 1, 1)
        assert not again.complete and len(again) == 0
    finally:
        await close_nats()


async def _count_is(client: NatsClient, n: int) -> bool:
    try:
        return await _results_stored(client) == n
    except Exception:  # noqa: BLE001 - e.g. a request timing out under load
        return False


async def test_a_request_waits_for_the_connection_within_its_timeout(nats_cluster: NatsCluster) -> None:
    # Started while no node answers: a request with a timeout rides out the outage.
    for node in nats_cluster.nodes:
        node.stop()
    client = NatsClient(settings=Settings(nats_url=nats_cluster.url, js_replicas=3))
    await client.connect()
    try:
        assert client.state is ConnectionState.DEGRADED
        restart = asyncio.ensure_future(asyncio.to_thread(nats_cluster.start))
        ack = await client.js_publish("agents.a.tasks.t", {"n": 1}, msg_id="waited", timeout=60)
        assert ack.stream == "A2A_TASKS" and not ack.duplicate
        await restart
    finally:
        await client.close()

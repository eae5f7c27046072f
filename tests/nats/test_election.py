"""A process started during a stream-leader election or an outage (issue 12, item 3): it
comes up, waits for the connection and JetStream within its call's timeout, and its first
call succeeds. A real 3-node cluster with R3 streams whose leader is SIGKILLed, and a
single server started late."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from liquidcrypto import A2ABus, Envelope
from liquidcrypto.config import Settings
from liquidcrypto.errors import RequestTimeoutError
from liquidcrypto.nats.client import ConnectionState, NatsClient, close_nats, get_client, init_nats
from liquidcrypto.nats.embedded import NatsCluster, NatsServer
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue.queue import WorkQueue, collect_results
from tests.helpers import eventually

SESSION = "clu"
COUNT = 400


async def _results_stored(client: NatsClient) -> int:
    info = await client.js.stream_info(infra.TASKS_STREAM, subjects_filter=f"orchestrator.results.{SESSION}.>")
    return len(info.state.subjects or {})


@pytest.mark.cluster
@pytest.mark.slow
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
        # Collected once: they leave the stream (a replicated work-queue stream removes
        # acknowledged messages as the acks are applied), and a second collection finds none.
        await eventually(lambda: _count_is(get_client(), 0), timeout=20, what="the collected results removed")
        again = await collect_results(SESSION, 1, 5)
        assert not again.complete and len(again) == 0
    finally:
        await close_nats()


async def _count_is(client: NatsClient, n: int) -> bool:
    try:
        return await _results_stored(client) == n
    except Exception:  # noqa: BLE001 - e.g. a request timing out under load
        return False


@pytest.mark.cluster
async def test_a_js_publish_waits_for_the_connection_within_its_timeout(nats_cluster: NatsCluster) -> None:
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


async def test_request_agent_and_request_wait_for_the_connection_within_their_timeout(
    nats_server: NatsServer,
) -> None:
    nats_server.stop()
    client = NatsClient(nats_server.url, settings=Settings())
    await client.connect()
    bus = A2ABus(client)
    agent_client = NatsClient(nats_server.url, settings=Settings())
    agent = A2ABus(agent_client)
    try:
        assert client.state is ConnectionState.DEGRADED
        asked = asyncio.ensure_future(bus.request_agent("late", "double", 21, timeout=60))
        core = asyncio.ensure_future(client.request("late.echo", {"n": 1}, timeout=15))
        await asyncio.to_thread(nats_server.start)
        await agent_client.connect(wait=15)

        def double(task: Envelope) -> int:
            return int(task.data) * 2

        await agent.subscribe_to_tasks("late.tasks.double", double)
        assert await asyncio.wait_for(asked, 60) == 42
        # The core request was sent once connected: nobody listens on its subject, so it
        # fails as a request with no reply, not as "not connected".
        with pytest.raises(RequestTimeoutError):
            await core
    finally:
        await agent.close()
        await agent_client.close()
        await bus.close()
        await client.close()

"""A2A durable tasks are handled once, in order, across a nats-server crash (issue 12,
item 2), on a real nats-server that is SIGKILLed mid-stream and restarted on the same
port and storage."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from liquidcrypto import A2ABus, Envelope
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually

N = 300


async def _settled(client: NatsClient, durable: str) -> bool:
    """Nothing left to deliver and nothing delivered unacknowledged."""
    try:
        info = await client.js.consumer_info(streams.A2A_TASKS, durable, timeout=1)
    except Exception:  # noqa: BLE001 - JetStream may still be recovering
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def _publish_all(bus: A2ABus, agent: str, ids: list[str]) -> None:
    for i, task_id in enumerate(ids):
        await bus.publish_task(agent, "job", {"id": task_id, "payload": i})


def _report(handled: list[tuple[str, int]]) -> str:
    twice = sorted({t for t, n in Counter(t for t, _ in handled).items() if n > 1})
    return f"{len(handled)} runs, {len(twice)} twice: " + ", ".join(
        f"{t} (deliveries {[d for tid, d in handled if tid == t]})" for t in twice[:10]
    )


async def test_a_server_sigkill_mid_stream_runs_every_durable_task_once_in_order(
    nats_server: NatsServer, client: NatsClient, bus: A2ABus
) -> None:
    """300 tasks queued for an agent's durable subscription; nats-server is SIGKILLed from
    inside the 100th handler (the acks of the tasks just before it still in flight or
    not yet on disk) and restarted on the same port and storage. Every task is handled
    exactly once and in stream order."""
    import liquidcrypto.a2a.durable as dmod
    orig = dmod.DurableSubscription._process
    deliveries: dict[str, list[int]] = {}

    async def spy(self: Any, msg: Any) -> None:
        deliveries.setdefault(msg.headers.get("Nats-Msg-Id", "?") if msg.headers else "?", []).append(
            (msg.metadata.num_delivered, msg.metadata.sequence.consumer)
        )
        await orig(self, msg)

    dmod.DurableSubscription._process = spy  # type: ignore[method-assign]
    agent, durable = "crashy", "crashy-agent"
    ids = [f"once-{i:03d}" for i in range(N)]
    handled: list[tuple[str, int]] = []  # (task id, delivery count) per handler run
    killed = asyncio.Event()

    async def handle(task: Envelope) -> None:
        handled.append((task.id, 0))
        await asyncio.sleep(0.002)  # slow enough that the acks trail the handlers
        if len(handled) == 100 and not killed.is_set():
            nats_server.kill()  # SIGKILL: what the server had not written is lost
            killed.set()

    pattern = f"{agent}.tasks.*"
    # The consumer exists before the tasks are sent (it starts where it was created).
    first = await bus.subscribe_to_tasks(pattern, lambda t: None, durable=durable, ack_wait=2.0)
    await first.unsubscribe()
    await _publish_all(bus, agent, ids)
    await bus.subscribe_to_tasks(pattern, handle, durable=durable, ack_wait=2.0)
    await asyncio.wait_for(killed.wait(), 30)
    await asyncio.to_thread(nats_server.start)
    await client.wait_connected(20)
    await eventually(lambda: {t for t, _ in handled} >= set(ids), timeout=60, what="every task handled")
    await eventually(lambda: _settled(client, durable), timeout=60, what="every task acknowledged")
    runs = [t for t, _ in handled]
    dmod.DurableSubscription._process = orig  # type: ignore[method-assign]
    print({k: v for k, v in deliveries.items() if len(v) > 1})
    assert len(runs) == len(set(runs)), _report(handled)
    assert runs == ids, "out of stream order"


async def _unused(*_: Any) -> None:
    return None

"""Durable task subscriptions on a real nats-server: offline catch-up, redelivery on
failure and on a dead process, termination of bad messages, shared durables, restarts."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from liquidcrypto import A2ABus, DurableSubscription, Envelope
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually


async def consumer(client: NatsClient, name: str) -> Any:
    return await client.js.consumer_info(streams.A2A_TASKS, name)


async def test_durable_catch_up_after_restart_nothing_lost_nothing_twice(make_client: Any, bus: A2ABus) -> None:
    seen: list[int] = []
    first = A2ABus(await make_client())
    sub = await first.subscribe_to_tasks("worker.tasks.*", lambda t: seen.append(t.data), durable="worker")
    assert isinstance(sub, DurableSubscription)
    for i in range(5):
        await bus.publish_task("worker", "job", i)
    await eventually(lambda: len(seen) == 5, what="first five")
    await first.client.close()  # the agent's process goes away
    for i in range(5, 12):  # sent while nobody listens
        await bus.publish_task("worker", "job", i)
    second = A2ABus(await make_client())  # the agent comes back
    await second.subscribe_to_tasks("worker.tasks.*", lambda t: seen.append(t.data), durable="worker")
    await eventually(lambda: len(seen) >= 12, what="catch-up")
    await bus.publish_task("worker", "job", 12)
    await eventually(lambda: len(seen) >= 13, what="live after catch-up")
    assert seen == list(range(13))
    await eventually(lambda: _acked(second.client, "worker"), what="all acked")
    await second.close()


async def _acked(client: NatsClient, name: str) -> bool:
    info = await consumer(client, name)
    return bool(info.num_ack_pending == 0 and info.num_pending == 0)


async def test_failed_handler_is_redelivered_then_acked(bus: A2ABus, client: NatsClient) -> None:
    attempts: Counter[str] = Counter()
    done: list[str] = []

    def flaky(task: Envelope) -> None:
        attempts[task.id] += 1
        if attempts[task.id] < 3:
            raise RuntimeError("not yet")
        done.append(task.id)

    await bus.subscribe_to_tasks("flaky.tasks.*", flaky, durable="flaky")
    await bus.publish_task("flaky", "job", {"id": "f-1", "payload": 1})
    await bus.publish_task("flaky", "job", {"id": "f-2", "payload": 2})
    await eventually(lambda: done == ["f-1", "f-2"], what="both after retries")
    assert attempts == {"f-1": 3, "f-2": 3}
    await eventually(lambda: _acked(client, "flaky"), what="acked")


async def test_gives_up_after_max_deliver_and_moves_on(bus: A2ABus, client: NatsClient) -> None:
    attempts: Counter[Any] = Counter()

    def always_fails(task: Envelope) -> None:
        attempts[task.data] += 1
        if task.data == "poison":
            raise RuntimeError("poison")

    await bus.subscribe_to_tasks("p.tasks.*", always_fails, durable="p", max_deliver=2)
    await bus.publish_task("p", "job", "poison")
    await bus.publish_task("p", "job", "fine")
    await eventually(lambda: attempts["fine"] == 1 and attempts["poison"] == 2, what="give up")
    await eventually(lambda: _acked(client, "p"), what="nothing pending")
    await asyncio.sleep(0.3)  # a third attempt would be due by now (nak delays 0.1, 0.2 s)
    assert attempts["poison"] == 2


async def test_bad_message_is_terminated_not_redelivered(bus: A2ABus, client: NatsClient) -> None:
    got: list[Any] = []
    await bus.subscribe_to_tasks("b.tasks.*", lambda t: got.append(t.data), durable="b", ack_wait=1.0)
    await client.publish_raw("agents.b.tasks.job", b"{not json")
    await client.publish_raw("agents.b.tasks.job", b'"just a string"')
    await bus.publish_task("b", "job", "ok")
    await eventually(lambda: got == ["ok"], what="the good task")
    await eventually(lambda: _acked(client, "b"), what="bad ones terminated")
    info = await consumer(client, "b")
    assert info.num_redelivered == 0


async def test_dead_process_message_is_redelivered_after_ack_wait(make_client: Any, bus: A2ABus) -> None:
    started = asyncio.Event()
    dying = A2ABus(await make_client())

    async def hangs(task: Envelope) -> None:
        started.set()
        await asyncio.Event().wait()

    await dying.subscribe_to_tasks("d.tasks.*", hangs, durable="d", ack_wait=1.0)
    await bus.publish_task("d", "job", {"id": "d-1", "payload": "important"})
    await asyncio.wait_for(started.wait(), 5)
    await dying.client.nc.close()  # the process dies mid-task: no ack, no nak
    await dying.close()
    got: list[tuple[str, Any]] = []
    survivor = A2ABus(await make_client())
    await survivor.subscribe_to_tasks("d.tasks.*", lambda t: got.append((t.id, t.data)), durable="d", ack_wait=1.0)
    await eventually(lambda: got, timeout=10, what="redelivery")
    assert got == [("d-1", "important")]
    await survivor.close()


async def test_long_handler_keeps_its_message_with_in_progress(bus: A2ABus, client: NatsClient) -> None:
    calls: list[int] = []

    async def slow(task: Envelope) -> None:
        calls.append(task.data)
        await asyncio.sleep(2.0)  # longer than ack_wait: in_progress must keep it ours

    await bus.subscribe_to_tasks("slow.tasks.*", slow, durable="slow", ack_wait=1.0)
    await bus.publish_task("slow", "job", 1)
    await eventually(lambda: _acked(client, "slow"), timeout=10, what="acked")
    assert calls == [1]


async def test_shared_durable_is_a_queue_group(make_client: Any, bus: A2ABus) -> None:
    members = [A2ABus(await make_client()) for _ in range(3)]
    handled: list[Counter[str]] = [Counter() for _ in members]

    async def make_handler(counts: Counter[str]) -> Any:
        async def handle(task: Envelope) -> None:
            counts.update([task.id])
            await asyncio.sleep(0.002)

        return handle

    for member, counts in zip(members, handled, strict=True):
        await member.subscribe_to_tasks("q.tasks.*", await make_handler(counts), durable="q-workers", batch=4)
    for i in range(150):
        await bus.publish_task("q", "job", {"id": f"q-{i}", "payload": i}, ack=i % 10 == 0)
    await eventually(lambda: sum(sum(c.values()) for c in handled) >= 150, timeout=20, what="150 handled")
    total = Counter[str]()
    for counts in handled:
        total.update(counts)
    assert len(total) == 150 and set(total.values()) == {1}
    assert sum(1 for c in handled if c) >= 2, [sum(c.values()) for c in handled]
    for m in members:
        await m.close()


async def test_durable_name_bound_to_its_pattern(bus: A2ABus) -> None:
    sub = await bus.subscribe_to_tasks("one.tasks.*", print, durable="named")
    assert isinstance(sub, DurableSubscription)
    await sub.stop()
    with pytest.raises(ValueError, match="named"):
        await bus.subscribe_to_tasks("two.tasks.*", print, durable="named")
    assert await bus.delete_durable("named") is True
    assert await bus.delete_durable("named") is False
    with pytest.raises(ValueError):
        await bus.subscribe_to_tasks("one.tasks.*", print, durable="bad.name")


async def test_durable_survives_a_server_restart(nats_server: NatsServer, bus: A2ABus) -> None:
    seen: list[int] = []
    await bus.subscribe_to_tasks("r.tasks.*", lambda t: seen.append(t.data), durable="r")
    await bus.publish_task("r", "job", 0)
    await eventually(lambda: seen == [0], what="before restart")
    nats_server.restart()
    await bus.client.wait_connected(20)

    async def publish_one() -> bool:
        try:
            await bus.publish_task("r", "job", {"id": "after-restart", "payload": 1}, timeout=1)
            return True
        except Exception:  # noqa: BLE001 - JetStream may still be recovering
            return False

    await eventually(publish_one, timeout=20, what="publish after restart")
    await eventually(lambda: seen == [0, 1], timeout=20, what="delivery after restart")


async def test_bus_used_while_nats_is_down_starts_working_when_it_comes_up(tmp_path: Any) -> None:
    from liquidcrypto.config import Settings
    from liquidcrypto.errors import NatsUnavailableError
    from liquidcrypto.nats.embedded import free_port

    server = NatsServer(tmp_path / "late", port=free_port())
    client = NatsClient(server.url, settings=Settings())
    await client.connect()  # degraded: nothing listens yet
    bus = A2ABus(client)
    events: list[Any] = []
    tasks: list[Any] = []
    try:
        await bus.subscribe_to_events("*.events.*", lambda e: events.append(e.data))
        await bus.subscribe_to_tasks("late.tasks.*", lambda t: tasks.append(t.data), durable="late")
        with pytest.raises(NatsUnavailableError):
            await bus.publish_event("late", "e", 1)
        server.start()
        await client.wait_connected(20)

        async def publish_both() -> bool:
            try:
                await bus.publish_event("late", "e", 2, timeout=1)
                await bus.publish_task("late", "job", {"id": "late-1", "payload": 3}, timeout=1)
                return True
            except NatsUnavailableError:
                return False

        await eventually(publish_both, timeout=20, what="publishing after NATS came up")
        await eventually(lambda: 2 in events and tasks == [3], timeout=20, what="both subscriptions working")
    finally:
        await bus.close()
        await client.close()
        server.stop()


async def test_durable_handler_answers_a_request(make_client: Any, bus: A2ABus) -> None:
    agent = A2ABus(await make_client())
    await agent.subscribe_to_tasks("calc.tasks.*", lambda t: {"sum": sum(t.data)}, durable="calc")
    assert await bus.request_agent("calc", "add", [1, 2, 3], timeout=5) == {"sum": 6}
    await agent.close()


async def test_a_retried_message_is_not_overtaken_by_later_ones(bus: A2ABus, client: NatsClient) -> None:
    """Issue 10, finding 7: a durable subscriber handles its messages in stream order,
    also while one of them is retried after failures."""
    attempts: list[str] = []
    handled: list[str] = []

    def handler(task: Envelope) -> None:
        attempts.append(task.data)
        if task.data == "m1" and attempts.count("m1") <= 2:
            raise RuntimeError("m1 fails twice")
        handled.append(task.data)

    sub = await bus.subscribe_to_tasks("ordered.tasks.*", handler, durable="ordered")
    assert isinstance(sub, DurableSubscription)
    for name in ("m1", "m2", "m3"):
        await bus.publish_task("ordered", "job", name)
    await eventually(lambda: len(handled) == 3, what="all three handled")
    assert handled == ["m1", "m2", "m3"]
    assert attempts == ["m1", "m1", "m1", "m2", "m3"]
    await eventually(lambda: _acked(client, "ordered"), what="all acked")

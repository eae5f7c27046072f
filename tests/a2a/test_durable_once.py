"""A2A durable tasks are handled once, in order (issue 12, item 2), on real nats-servers:
one SIGKILLed mid-stream and restarted on the same port and storage, and an agent whose
process dies between marking a task handled and acknowledging it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from liquidcrypto import A2ABus, Envelope
from liquidcrypto.a2a.durable import DurableSubscription, mark_prefix
from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually

N = 300
KILL_AT = 100


async def _settled(client: NatsClient, durable: str) -> bool:
    """Nothing left to deliver and nothing delivered unacknowledged."""
    try:
        info = await client.js.consumer_info(streams.A2A_TASKS, durable, timeout=1)
    except Exception:  # noqa: BLE001 - JetStream may still be recovering
        return False
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


async def _publish_until_stored(bus: A2ABus, agent: str, ids: list[str]) -> None:
    """Publish in order; a publish that fails while the server is down is sent again
    with the same id (stored once, and before the next one)."""
    for i, task_id in enumerate(ids):
        while True:
            try:
                await bus.publish_task(agent, "job", {"id": task_id, "payload": i}, timeout=1)
                break
            except NatsUnavailableError:
                await asyncio.sleep(0.05)  # back-off while the server restarts


def _twice(runs: list[str]) -> list[str]:
    return sorted(t for t, n in Counter(runs).items() if n > 1)


@pytest.mark.parametrize("flow", ["backlog", "live"])
async def test_a_server_sigkill_mid_stream_runs_every_durable_task_once_in_order(
    nats_server: NatsServer, client: NatsClient, bus: A2ABus, flow: str
) -> None:
    """nats-server is SIGKILLed from inside the 100th handler and restarted on the same
    port and storage. At that moment the acks of the tasks just handled are in flight or
    not yet written (the server writes its consumers' state in the background),
    and the subscription holds a batch of fetched tasks. After the restart the server
    delivers again what it lost track of: the tasks it still counts as pending (after
    ``ack_wait``, ``num_delivered`` 2) and those whose delivery it forgot (as first
    deliveries, ``num_delivered`` 1). Every task is still handled exactly once, in
    stream order.

    ``backlog``: 300 tasks wait for the agent when it subscribes (an agent catching up).
    ``live``: the tasks are published while the agent works, through the crash.
    """
    agent = durable = f"crashy-{flow}"
    ids = [f"{flow}-{i:03d}" for i in range(N)]
    runs: list[str] = []
    killed = asyncio.Event()

    async def handle(task: Envelope) -> None:
        runs.append(task.id)
        await asyncio.sleep(0.002)  # slow enough that fetched tasks wait behind it
        if len(runs) == KILL_AT and not killed.is_set():
            nats_server.kill()  # SIGKILL, as a crash: what the server had not written is lost
            killed.set()

    pattern = f"{agent}.tasks.*"
    publisher: asyncio.Task[None] | None = None
    if flow == "backlog":
        # The consumer starts where it was created: create it, then send while nobody listens.
        first = await bus.subscribe_to_tasks(pattern, lambda t: None, durable=durable, ack_wait=2.0)
        await first.unsubscribe()
        await _publish_until_stored(bus, agent, ids)
        await bus.subscribe_to_tasks(pattern, handle, durable=durable, ack_wait=2.0)
    else:
        await bus.subscribe_to_tasks(pattern, handle, durable=durable, ack_wait=2.0)
        publisher = asyncio.create_task(_publish_until_stored(bus, agent, ids))
    await asyncio.wait_for(killed.wait(), 30)
    await asyncio.to_thread(nats_server.start)
    if publisher is not None:
        await asyncio.wait_for(publisher, 60)
    await eventually(lambda: set(runs) >= set(ids), timeout=60, what="every task handled")
    # Redeliveries of what the server still counted as pending come after ack_wait.
    await eventually(lambda: _settled(client, durable), timeout=60, what="every task acknowledged")
    assert not _twice(runs), f"{len(runs)} runs for {N} tasks; ran twice: {_twice(runs)[:20]}"
    assert runs == ids, "not in stream order"


async def test_a_task_handled_is_not_run_again_when_its_agent_dies_before_the_ack(
    make_client: Any, bus: A2ABus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's process dies after its handler returned, at the moment it would
    acknowledge the task: the server redelivers the task (after ``ack_wait``) to the next
    process with the same durable name, which acknowledges it without running it (it
    was marked handled before the ack was sent)."""
    runs: list[tuple[str, str]] = []
    dying = A2ABus(await make_client())
    died = asyncio.Event()
    real_ack = Msg.ack

    async def die_instead_of_acking(msg: Msg) -> None:
        if died.is_set():
            return await real_ack(msg)
        died.set()
        await dying.client.nc.close()  # the process is gone: no ack, no nak
        return None

    monkeypatch.setattr(Msg, "ack", die_instead_of_acking)
    await dying.subscribe_to_tasks("dies.tasks.*", lambda t: runs.append(("dying", t.id)), durable="dies", ack_wait=1.0)
    before = _already_handled()
    await bus.publish_task("dies", "job", {"id": "dies-1", "payload": 1})
    await asyncio.wait_for(died.wait(), 10)
    await dying.close()
    survivor = A2ABus(await make_client())
    await survivor.subscribe_to_tasks(
        "dies.tasks.*", lambda t: runs.append(("survivor", t.id)), durable="dies", ack_wait=1.0
    )
    await bus.publish_task("dies", "job", {"id": "dies-2", "payload": 2})
    await eventually(lambda: _settled(bus.client, "dies"), timeout=15, what="both acknowledged")
    assert runs == [("dying", "dies-1"), ("survivor", "dies-2")]
    assert _already_handled() == before + 1
    await survivor.close()


def _already_handled() -> float:
    return REGISTRY.get_sample_value("liquidcrypto_a2a_already_handled_total") or 0.0


async def test_tasks_sent_after_subscribing_are_not_looked_up(bus: A2ABus, client: NatsClient) -> None:
    """The hot path stays cheap: a first delivery of a task stored after the
    subscription bound costs no look-up in ``A2A_HANDLED``; each one costs one mark."""
    await bus.publish_task("hot", "job", {"id": "hot-before", "payload": -1})  # stored before: not ours
    sub = await bus.subscribe_to_tasks("hot.tasks.*", lambda t: None, durable="hot")
    assert isinstance(sub, DurableSubscription)
    lookups: list[str] = []
    real = sub._handled_before

    async def counting(msg: Any, envelope: Envelope) -> bool:
        lookups.append(envelope.id)
        return await real(msg, envelope)

    sub._handled_before = counting  # type: ignore[method-assign]
    for i in range(20):
        await bus.publish_task("hot", "job", {"id": f"hot-{i}", "payload": i})
    await eventually(lambda: sub.handled == 20, what="20 handled")
    await eventually(lambda: _settled(client, "hot"), what="acknowledged")
    assert lookups == []
    marks = await client.js.key_value(streams.A2A_HANDLED)
    keys = [k for k in await marks.keys() if k.startswith("hot.")]
    assert len(keys) == 20
    assert {(await marks.get(k)).value for k in keys} == {f"hot-{i}".encode() for i in range(20)}


async def test_stop_while_nats_is_down_after_the_handler_returned_ends_within_its_timeout(
    nats_server: NatsServer, bus: A2ABus
) -> None:
    """The mark cannot be stored while the server is down: the subscription keeps
    trying, and ``stop()`` ends that at once instead of hanging."""
    sub = await bus.subscribe_to_tasks("down.tasks.*", lambda t: nats_server.kill(), durable="down")
    assert isinstance(sub, DurableSubscription)
    await bus.publish_task("down", "job", {"id": "down-1", "payload": 1})
    await eventually(lambda: not nats_server.running and sub.handled == 1, what="handled, server gone")
    started = time.monotonic()
    await sub.stop(timeout=5)
    assert time.monotonic() - started < 4


async def test_a_handler_that_returns_during_stop_still_gets_its_mark(
    bus: A2ABus, client: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """``stop()`` waits for the running handler; NATS being there, the task is marked
    (and acked) after it returns, so a later repeat of it would not run."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(task: Envelope) -> None:
        started.set()
        await release.wait()

    sub = await bus.subscribe_to_tasks("stopping.tasks.*", slow, durable="stopping")
    assert isinstance(sub, DurableSubscription)
    await bus.publish_task("stopping", "job", {"id": "stopping-1", "payload": 1})
    await asyncio.wait_for(started.wait(), 10)
    stopping = asyncio.create_task(sub.stop(timeout=5))
    await eventually(lambda: sub.closed, what="stop() under way")
    release.set()
    await stopping
    marks = await client.js.key_value(streams.A2A_HANDLED)
    assert [k for k in await marks.keys() if k.startswith("stopping.")], "no mark stored"
    assert "could not be stored" not in caplog.text
    await eventually(lambda: _settled(client, "stopping"), what="acknowledged")


async def test_a_deleted_marks_bucket_is_created_again(bus: A2ABus, client: NatsClient) -> None:
    """Someone deletes ``A2A_HANDLED`` under a running subscription: the next mark fails,
    is retried with the bucket bound (so created) again, and the subscription goes on."""
    got: list[str] = []
    await bus.subscribe_to_tasks("gone.tasks.*", lambda t: got.append(t.id), durable="gone")
    await bus.publish_task("gone", "job", {"id": "gone-1", "payload": 1})
    await eventually(lambda: got == ["gone-1"], what="the first task")
    await eventually(lambda: _settled(client, "gone"), what="the first acknowledged")
    assert await client.js.delete_key_value(streams.A2A_HANDLED)
    await bus.publish_task("gone", "job", {"id": "gone-2", "payload": 2})
    await eventually(lambda: _settled(client, "gone"), timeout=15, what="the second acknowledged")
    assert got == ["gone-1", "gone-2"]
    marks = await client.js.key_value(streams.A2A_HANDLED)
    values = [(await marks.get(k)).value for k in await marks.keys()]
    assert values == [b"gone-2"]


def test_mark_keys_are_scoped_by_the_durable_name() -> None:
    assert mark_prefix("trading-agent") == "trading-agent"
    odd = mark_prefix("agent:7")  # a valid durable name but not a key token
    assert odd.startswith("h-") and odd == mark_prefix("agent:7") and odd != mark_prefix("agent:8")

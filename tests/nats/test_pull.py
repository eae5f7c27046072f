"""``PullConsumer`` against a real nats-server: the capacity bound, in-progress heartbeats,
the clean stop, and consumption across a server restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, StorageType, StreamConfig

from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.pull import PullConsumer, PullState
from tests.helpers import eventually

STREAM = "PULL_TEST"
SUBJECT = "pulltest.jobs"


@pytest.fixture
async def stream(client: NatsClient) -> AsyncIterator[str]:
    await client.js.add_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"], storage=StorageType.FILE))
    yield STREAM


def durable(client: NatsClient, name: str, ack_wait: float = 30.0) -> Callable[[], Awaitable[ConsumerInfo]]:
    """A ``bind`` that creates (or finds) durable ``name``."""

    async def bind() -> ConsumerInfo:
        config = ConsumerConfig(durable_name=name, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait)
        info: ConsumerInfo = await client.js.add_consumer(STREAM, config)
        return info

    return bind


async def publish(client: NatsClient, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await client.js.publish(SUBJECT, str(i).encode(), headers={hdr.MSG_ID: f"m{i}"})


async def info(client: NatsClient, name: str) -> ConsumerInfo:
    result: ConsumerInfo = await client.js.consumer_info(STREAM, name)
    return result


async def test_never_holds_more_than_its_capacity(client: NatsClient, stream: str) -> None:
    release = asyncio.Event()
    running: list[int] = []
    most = 0

    async def handler(msg: Msg) -> None:
        nonlocal most
        running.append(int(msg.data))
        most = max(most, len(running))
        await release.wait()
        running.remove(int(msg.data))
        await msg.ack()

    # Two handlers, three held: one message waits in the queue for a free handler.
    consumer = PullConsumer(
        client, stream, handler, durable(client, "bounded"), capacity=3, concurrency=2, ack_wait=30.0
    )
    await publish(client, 10)
    await consumer.start()
    await eventually(lambda: len(running) == 2, what="two handlers running")

    async def three_held() -> bool:
        i = await info(client, "bounded")
        return bool(i.num_ack_pending == 3 and i.num_pending == 7)

    await eventually(three_held, what="three messages held, seven left on the server")
    assert consumer.outstanding == 0  # nothing more asked for while full
    release.set()

    async def all_acked() -> bool:
        i = await info(client, "bounded")
        return bool(i.num_ack_pending == 0 and i.num_pending == 0)

    await eventually(all_acked, what="all ten handled")
    await consumer.stop()
    assert most == 2
    assert consumer.handed_back == 0


async def test_in_progress_keeps_a_long_message_and_the_one_queued_behind_it(client: NatsClient, stream: str) -> None:
    calls: Counter[bytes] = Counter()

    async def slow(msg: Msg) -> None:
        calls[msg.data] += 1
        if msg.data == b"0":
            await asyncio.sleep(3.0)  # the message's own work: three times ack_wait
        await msg.ack()

    # One handler, two held: message 1 waits behind message 0 for three ack_waits.
    consumer = PullConsumer(
        client, stream, slow, durable(client, "slow", ack_wait=1.0), capacity=2, concurrency=1, ack_wait=1.0
    )
    await consumer.start()
    await publish(client, 2)

    async def acked() -> bool:
        i = await info(client, "slow")
        return bool(i.ack_floor.stream_seq == 2)

    await eventually(acked, timeout=15, what="both messages acknowledged")
    i = await info(client, "slow")
    await consumer.stop()
    assert calls == {b"0": 1, b"1": 1}
    assert i.num_redelivered == 0 and i.delivered.stream_seq == 2


async def test_stop_hands_back_running_and_queued_messages(client: NatsClient, stream: str) -> None:
    never = asyncio.Event()
    started: list[int] = []

    async def stuck(msg: Msg) -> None:
        started.append(int(msg.data))
        await never.wait()

    # ack_wait 30 s: only a nak brings the messages back within the test's deadlines.
    first = PullConsumer(client, stream, stuck, durable(client, "shared"), capacity=3, concurrency=1, ack_wait=30.0)
    await publish(client, 5)
    await first.start()
    await eventually(lambda: started == [0], what="the first message running")

    async def three_held() -> bool:
        return bool((await info(client, "shared")).num_ack_pending == 3)

    await eventually(three_held, what="one running, two queued")
    await asyncio.wait_for(first.stop(timeout=0.2), timeout=5.0)  # returns although the handler is stuck
    got: list[tuple[int, int]] = []

    async def quick(msg: Msg) -> None:
        got.append((int(msg.data), msg.metadata.num_delivered))
        await msg.ack()

    second = PullConsumer(client, stream, quick, durable(client, "shared"), capacity=4, concurrency=2, ack_wait=30.0)
    await second.start()
    # Within seconds, not ack_wait: the three held were nak-ed (redelivered first, in order).
    await eventually(lambda: len(got) == 5, timeout=5, what="every message taken by the second consumer")
    await second.stop()
    assert sorted(got) == [(0, 2), (1, 2), (2, 2), (3, 1), (4, 1)]


async def test_a_handler_may_stop_its_own_consumer(client: NatsClient, stream: str) -> None:
    handled: list[int] = []
    consumer: PullConsumer

    async def stop_after_first(msg: Msg) -> None:
        await consumer.stop(timeout=5.0)  # neither waits for nor cancels this very handler
        handled.append(int(msg.data))
        await msg.ack()

    consumer = PullConsumer(client, stream, stop_after_first, durable(client, "self-stop"), capacity=1, ack_wait=30.0)
    await publish(client, 3)
    await consumer.start()
    await eventually(lambda: handled == [0], what="the first message handled")
    await consumer.stop()  # idempotent

    async def rest_waiting() -> bool:
        i = await info(client, "self-stop")
        return bool(i.num_ack_pending == 0 and i.num_pending == 2)

    await eventually(rest_waiting, what="the other two left on the server")
    assert not consumer.running


async def test_keeps_consuming_after_a_server_restart(client: NatsClient, stream: str, nats_server: NatsServer) -> None:
    seen: list[int] = []

    async def handler(msg: Msg) -> None:
        seen.append(int(msg.data))
        await msg.ack()

    consumer = PullConsumer(
        client, stream, handler, durable(client, "survivor"), capacity=4, concurrency=2, ack_wait=30.0
    )
    await consumer.start()
    await publish(client, 3)
    await eventually(lambda: sorted(seen) == [0, 1, 2], what="before the restart")
    await asyncio.to_thread(nats_server.restart)
    await client.wait_connected(20)

    for i in range(3, 8):

        async def published(i: int = i) -> bool:
            try:
                await publish(client, 1, start=i)  # a retry is de-duplicated by its Nats-Msg-Id
                return True
            except Exception:  # noqa: BLE001 - JetStream may still be recovering
                return False

        await eventually(published, timeout=20, interval=0.2, what=f"publish {i} after the restart")
        await eventually(lambda i=i: i in seen, timeout=20, what=f"delivery of {i} after the restart")
    await consumer.stop()
    assert sorted(seen) == list(range(8)) and len(set(seen)) == len(seen)


async def test_a_forged_message_on_the_inbox_is_dropped_and_never_answered(client: NatsClient, stream: str) -> None:
    """Anyone in the account who learns the inbox could send a "task" whose reply subject
    is, say, a ``$JS.API`` subject: acking it would publish there. Only messages whose
    reply is a JetStream ack subject are handled."""
    handled: list[bytes] = []
    answered: list[bytes] = []

    async def record(msg: Msg) -> None:
        answered.append(msg.data)

    await client.subscribe_msgs("victim.subject", record)

    async def handler(msg: Msg) -> None:
        handled.append(msg.data)
        await msg.ack()

    consumer = PullConsumer(
        client, stream, handler, durable(client, "forged"), capacity=2, concurrency=1, ack_wait=30.0
    )
    await consumer.start()
    try:
        await eventually(lambda: consumer._inbox_sub is not None, what="inbox subscribed")
        assert consumer._inbox_sub is not None
        inbox = consumer._inbox_sub.subject
        await client.nc.publish(inbox, b"forged", reply="victim.subject")
        await client.nc.publish(inbox, b"", headers={hdr.STATUS: "408", hdr.PENDING_MESSAGES: "not-a-number"})
        await publish(client, 1)
        await eventually(lambda: handled == [b"0"], what="the real message handled")
        await client.flush()
        assert answered == [] and b"forged" not in handled
    finally:
        await consumer.stop()


async def test_a_programming_error_while_binding_stops_it_visibly(client: NatsClient, stream: str) -> None:
    binds = 0
    real = durable(client, "upgraded")
    failures: list[BaseException] = []

    async def bind() -> ConsumerInfo:
        nonlocal binds
        binds += 1
        if binds > 1:  # as after an upgrade that renamed something we call
            raise TypeError("add_consumer() got an unexpected keyword argument 'config'")
        return await real()

    async def handler(msg: Msg) -> None:
        await msg.ack()

    consumer = PullConsumer(client, stream, handler, bind, capacity=1, ack_wait=30.0, on_failure=failures.append)
    await consumer.start()
    assert consumer.state is PullState.RUNNING
    await client.js.delete_consumer(STREAM, "upgraded")  # the next pull finds it gone: bind again
    with pytest.raises(TypeError, match="unexpected keyword"):
        await asyncio.wait_for(consumer.wait(), 10)
    assert consumer.state is PullState.FAILED and isinstance(consumer.failure, TypeError)
    assert failures == [consumer.failure] and not consumer.running
    await consumer.stop()  # idempotent


async def test_heartbeats_that_cannot_work_stop_it_visibly(
    client: NatsClient, stream: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without heartbeats a held message would be redelivered and run twice: stop instead."""
    release = asyncio.Event()

    async def held(msg: Msg) -> None:
        await release.wait()

    async def renamed(self: Msg) -> None:
        raise AttributeError("'Msg' object has no attribute '_client'")

    monkeypatch.setattr(Msg, "in_progress", renamed)
    consumer = PullConsumer(
        client, stream, held, durable(client, "beats", ack_wait=1.0), capacity=1, ack_wait=1.0, stop_timeout=0.1
    )
    await publish(client, 1)
    await consumer.start()
    with pytest.raises(AttributeError, match="_client"):
        await asyncio.wait_for(consumer.wait(), 10)
    release.set()
    assert consumer.state is PullState.FAILED

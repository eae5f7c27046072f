"""Every JetStream publish of the bus carries its envelope id as ``Nats-Msg-Id``, so a
caller's retry with the same id is stored once (issue 10, finding 3, the bus half)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from liquidcrypto import A2ABus, Envelope
from liquidcrypto.errors import InvalidTaskError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from tests.helpers import eventually


async def messages(client: NatsClient) -> int:
    info = await client.js.stream_info(streams.A2A_TASKS)
    return int(info.state.messages)


async def headers_and_id(client: NatsClient, seq: int) -> tuple[dict[str, str], str]:
    msg = await client.js.get_msg(streams.A2A_TASKS, seq)
    assert msg.data is not None
    return dict(msg.headers or {}), orjson.loads(msg.data)["id"]


async def test_generated_ids_are_sent_as_msg_id(client: NatsClient, bus: A2ABus) -> None:
    seqs = [
        await bus.publish_task("agent-a", "job", {"payload": 1}),
        await bus.publish_event("agent-a", "progress", {"pct": 10}),
        await bus.publish_system_event("deployed", {"v": 1}),
    ]
    ack = await (await bus.publish_task_async("agent-a", "job", {"payload": 2}))
    seqs.append(ack.seq)
    for seq in seqs:
        assert seq is not None
        headers, envelope_id = await headers_and_id(client, seq)
        assert headers.get("Nats-Msg-Id") == envelope_id, f"seq {seq} stored without its id as Nats-Msg-Id"


async def test_core_publishes_carry_the_id_only_when_the_caller_chose_it(client: NatsClient, bus: A2ABus) -> None:
    """An ``ack=False`` publish that raised was not sent: a generated id needs no header there
    (it would cost every subscriber), a chosen one still de-duplicates."""
    before = (await client.js.stream_info(streams.A2A_TASKS)).state.last_seq
    await bus.publish_task("agent-a", "job", {"payload": 1}, ack=False)
    await bus.publish_task("agent-a", "job", {"payload": 2}, ack=False, id="core-1")
    await bus.publish_task("agent-a", "job", {"payload": 2}, ack=False, id="core-1")
    await bus.publish_event("agent-a", "progress", 3)  # a barrier: stored after the others
    await eventually(lambda: _last_seq_at_least(client, before + 3), what="stored")
    first, _ = await headers_and_id(client, before + 1)
    second, second_id = await headers_and_id(client, before + 2)
    assert "Nats-Msg-Id" not in first
    assert second.get("Nats-Msg-Id") == second_id == "core-1"
    assert (await client.js.stream_info(streams.A2A_TASKS)).state.last_seq == before + 3  # "core-1" once


async def _last_seq_at_least(client: NatsClient, seq: int) -> bool:
    return bool((await client.js.stream_info(streams.A2A_TASKS)).state.last_seq >= seq)


@pytest.mark.parametrize("how", ["keyword", "task-id", "envelope"])
async def test_a_retry_with_the_same_id_is_stored_once(client: NatsClient, bus: A2ABus, how: str) -> None:
    async def send() -> int | None:
        if how == "keyword":
            return await bus.publish_task("agent-a", "job", {"payload": {"n": 1}}, id="retry-1")
        if how == "task-id":
            return await bus.publish_task("agent-a", "job", {"id": "retry-1", "payload": {"n": 1}})
        envelope = Envelope(id="retry-1", kind="task", agent_id="agent-a", type="job", timestamp=1, data={"n": 1})
        return await bus.publish_task("agent-a", "job", envelope)

    before = await messages(client)
    first = await send()
    second = await send()  # the caller's retry after, say, an ambiguous timeout
    assert first == second
    assert await messages(client) == before + 1


async def test_async_publishes_retried_with_the_same_id_are_stored_once(client: NatsClient, bus: A2ABus) -> None:
    before = await messages(client)
    acks = [await (await bus.publish_task_async("agent-a", "job", {"n": 1}, id="async-1")) for _ in range(2)]
    assert acks[0].seq == acks[1].seq and acks[1].duplicate
    assert await messages(client) == before + 1


async def test_events_retried_with_the_same_id_are_stored_once(client: NatsClient, bus: A2ABus) -> None:
    before = await messages(client)
    for _ in range(2):
        await bus.publish_event("agent-a", "progress", {"pct": 1}, id="ev-1")
        await bus.publish_system_event("deployed", {"v": 1}, id="sys-1")
    assert await messages(client) == before + 2


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "a\r\nNats-Expected-Stream: X", "a\x00b", "x" * 300, 42],
)
async def test_ids_that_cannot_be_a_header_value_are_refused(bus: A2ABus, bad: Any) -> None:
    with pytest.raises(InvalidTaskError) as err:
        await bus.publish_task("agent-a", "job", {"n": 1}, id=bad)
    assert "id" in str(err.value)
    with pytest.raises(InvalidTaskError):
        await bus.publish_task("agent-a", "job", {"id": bad, "payload": 1})
    with pytest.raises(InvalidTaskError):
        await bus.publish_event("agent-a", "progress", 1, id=bad)


async def test_two_different_ids_for_one_task_are_refused(bus: A2ABus) -> None:
    with pytest.raises(InvalidTaskError, match=r"'a'.*'b'"):
        await bus.publish_task("agent-a", "job", {"id": "a", "payload": 1}, id="b")

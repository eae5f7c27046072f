"""The A2A bus on a real nats-server: subjects, envelopes, JetStream storage and
de-duplication, wildcards, queue groups, request/reply, bad input, history."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from datetime import timedelta
from typing import Any

import orjson
import pytest

from liquidcrypto import A2ABus, Envelope, reply
from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a.envelope import Kind
from liquidcrypto.errors import (
    InvalidSubjectError,
    InvalidTaskError,
    LiquidNatsError,
    RequestTimeoutError,
)
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from tests.helpers import eventually


async def stored(client: NatsClient, seq: int) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(subject, envelope dict, headers) of the stream message at ``seq``."""
    msg = await client.js.get_msg(streams.A2A_TASKS, seq)
    assert msg.subject is not None and msg.data is not None
    return msg.subject, orjson.loads(msg.data), dict(msg.headers or {})


async def last_seq(client: NatsClient) -> int:
    info = await client.js.stream_info(streams.A2A_TASKS)
    return int(info.state.last_seq)


# -- subjects and envelopes ---------------------------------------------------------


async def test_exact_subjects_of_tasks_events_system_events_and_heartbeats(client: NatsClient, bus: A2ABus) -> None:
    seen: list[str] = []

    async def record(msg: Any) -> None:
        seen.append(msg.subject)

    await client.subscribe_msgs("agents.>", record)
    await client.subscribe_msgs("system.>", record)
    await bus.publish_task("trading-agent", "execute", {"id": "task-123", "payload": {"symbol": "BTCUSDT"}})
    await bus.publish_event("trading-agent", "order_filled", {"orderId": "456"})
    await bus.publish_system_event("deploy_finished", {"version": "1.2"})
    await bus.register_agent({"id": "trading-agent", "name": "Trader"}, heartbeat=False)
    await eventually(lambda: len(seen) == 4, what="four messages")
    assert seen == [
        "agents.trading-agent.tasks.execute",
        "agents.trading-agent.events.order_filled",
        "system.events.deploy_finished",
        "agents.trading-agent.heartbeat",
    ]


async def test_publish_task_returns_stream_sequence_and_stores_the_envelope(client: NatsClient, bus: A2ABus) -> None:
    seq = await bus.publish_task(
        "trading-agent", "execute", {"id": "task-123", "payload": {"symbol": "BTCUSDT", "action": "buy"}}
    )
    assert seq == await last_seq(client)
    subject, body, headers = await stored(client, seq)
    assert subject == "agents.trading-agent.tasks.execute"
    assert headers["Nats-Msg-Id"] == "task-123"
    assert body["id"] == "task-123"
    assert body["kind"] == "task"
    assert body["agent_id"] == "trading-agent"
    assert body["type"] == "execute"
    assert body["data"] == {"symbol": "BTCUSDT", "action": "buy"}
    assert isinstance(body["timestamp"], int)
    second = await bus.publish_event("trading-agent", "order_filled", {"orderId": "456"}, task_id="task-123")
    assert second == seq + 1
    _, event, _ = await stored(client, second)
    assert event["task_id"] == "task-123" and event["kind"] == "event"


async def test_duplicate_task_id_is_stored_once(client: NatsClient, bus: A2ABus) -> None:
    first = await bus.publish_task("trading-agent", "execute", {"id": "task-dup", "payload": 1})
    again = await bus.publish_task("trading-agent", "execute", {"id": "task-dup", "payload": 1})
    fire_and_forget = await bus.publish_task("trading-agent", "execute", {"id": "task-dup"}, ack=False)
    assert fire_and_forget is None
    await client.flush()
    assert again == first
    info = await client.js.stream_info(streams.A2A_TASKS)
    assert info.state.messages == 1


async def test_task_without_payload_and_plain_values(client: NatsClient, bus: A2ABus) -> None:
    seq = await bus.publish_task("a1", "echo", {"id": "t-1", "text": "hi", "n": 2})
    _, body, _ = await stored(client, seq)
    assert body["id"] == "t-1" and body["data"] == {"text": "hi", "n": 2}
    seq = await bus.publish_task("a1", "echo", [1, 2, 3])
    _, body, headers = await stored(client, seq)
    assert body["data"] == [1, 2, 3] and body["id"]
    assert headers["Nats-Msg-Id"] == body["id"]  # generated ids too: a caller's retry is de-duplicated
    seq2 = await bus.publish_task("a1", "echo", [1, 2, 3])
    _, body2, _ = await stored(client, seq2)
    assert seq2 == seq + 1 and body2["id"] != body["id"]
    seq = await bus.publish_task("a1", "echo", {"id": "t-2", "payload": 5, "priority": 3, "correlationId": "c1"})
    _, body, _ = await stored(client, seq)
    assert body["data"] == 5 and body["metadata"] == {"priority": 3} and body["correlation_id"] == "c1"


def test_fast_encoder_matches_the_model() -> None:
    raw = env_mod.encode(
        id="x1",
        kind=Kind.TASK,
        agent_id="a",
        type="t",
        data={"k": [1]},
        correlation_id="c",
        reply_to="r",
        metadata={"m": 1},
    )
    model = env_mod.decode(raw, "agents.a.tasks.t")
    assert orjson.loads(raw) == model.to_dict()
    assert model["payload"] == model.payload == model.data == {"k": [1]}
    assert model["agent_id"] == model.agent_id == "a"
    assert model.get("task_id") is None and model.get("nope", 7) == 7
    with pytest.raises(KeyError):
        model["nope"]
    assert model.time.year >= 2024


def test_decode_fills_a_hand_written_message_and_accepts_camel_case() -> None:
    env = env_mod.decode(b'{"data": "test"}', "agents.test.tasks.echo", {"Nats-Msg-Id": "m-1"})
    assert (env.id, env.kind, env.agent_id, env.type, env.data) == ("m-1", Kind.TASK, "test", "echo", "test")
    env = env_mod.decode(
        b'{"agentId": "x", "type": "t", "id": "1", "timestamp": 5, "taskId": "t9"}', "agents.x.events.t"
    )
    assert env.agent_id == "x" and env.task_id == "t9"
    for bad in (b"not json", b"[1, 2]", b'{"timestamp": "yesterday"}', b'{"id": 5}'):
        with pytest.raises(ValueError):
            env_mod.decode(bad, "agents.x.events.t")


async def test_stream_keeps_one_hour_and_dedupes_for_one_hour(client: NatsClient) -> None:
    info = await client.js.stream_info(streams.A2A_TASKS)
    assert info.config.max_age == 3600
    assert info.config.duplicate_window == 3600
    assert sorted(info.config.subjects or []) == ["agents.>", "system.>"]


# -- subscriptions ------------------------------------------------------------------


async def test_event_handler_gets_agent_id_type_data_timestamp(bus: A2ABus) -> None:
    got: list[Envelope] = []
    await bus.subscribe_to_events("*.events.>", got.append)
    await bus.publish_event("trading-agent", "order_filled", {"orderId": "456"})
    await eventually(lambda: got, what="the event")
    event = got[0]
    assert f"{event.agent_id}: {event.type}" == "trading-agent: order_filled"
    assert event["agent_id"] == "trading-agent" and event["type"] == "order_filled"
    assert event["data"] == {"orderId": "456"} and event["timestamp"] > 0


async def test_wildcards_star_is_one_token_and_gt_is_one_or_more(client: NatsClient, bus: A2ABus) -> None:
    star: list[str] = []
    gt: list[str] = []
    one_agent: list[str] = []
    await bus.subscribe_to_tasks("*.tasks.*", lambda t: star.append(f"{t.agent_id}.{t.type}"))
    await bus.subscribe_to_events("*.events.>", lambda e: gt.append(e.type))
    await bus.subscribe_to_events("trading-agent.events.*", lambda e: one_agent.append(e.agent_id))
    await bus.publish_task("a1", "execute", 1)
    await bus.publish_task("a2", "cancel", 2)
    await client.publish("agents.a1.tasks.execute.extra", {"data": 3})  # two tokens after tasks
    await bus.publish_event("trading-agent", "filled", None)
    await bus.publish_event("risk-agent", "alert", None)
    await client.publish("agents.risk-agent.events.deep.nested", {"data": 1})
    await client.publish("agents.risk-agent.events", {"data": 1})  # '>' needs at least one token
    await client.flush()
    await eventually(lambda: len(star) == 2 and len(gt) == 3 and len(one_agent) == 1, what="wildcard deliveries")
    await asyncio.sleep(0.05)  # any wrongly matched message would have arrived by now
    assert sorted(star) == ["a1.execute", "a2.cancel"]
    assert sorted(gt) == ["alert", "filled", "nested"]
    assert one_agent == ["trading-agent"]


async def test_queue_group_of_three_handles_each_of_300_tasks_once(make_client: Any, client: NatsClient) -> None:
    members = [A2ABus(await make_client()) for _ in range(3)]
    handled: list[Counter[str]] = [Counter() for _ in members]
    for member, counts in zip(members, handled, strict=True):
        await member.subscribe_to_tasks(
            "trading-agent.tasks.*", lambda t, c=counts: c.update([t.id]), queue="trading-workers"
        )
    for m in members:
        await m.client.flush()
    sender = A2ABus(client)
    for i in range(300):
        await sender.publish_task("trading-agent", "execute", {"id": f"task-{i}", "payload": i}, ack=i % 2 == 0)
    await eventually(lambda: sum(sum(c.values()) for c in handled) >= 300, what="300 tasks handled")
    await asyncio.sleep(0.05)
    total = Counter[str]()
    for counts in handled:
        total.update(counts)
    assert len(total) == 300 and set(total.values()) == {1}
    assert all(sum(c.values()) > 0 for c in handled), [sum(c.values()) for c in handled]
    for m in [*members, sender]:
        await m.close()


async def test_handler_exception_is_logged_and_subscription_continues(
    bus: A2ABus, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[int] = []

    async def handler(task: Envelope) -> None:
        if task.data == 0:
            raise RuntimeError("boom")
        got.append(task.data)

    await bus.subscribe_to_tasks("worker.tasks.>", handler)
    with caplog.at_level(logging.ERROR):
        for i in range(3):
            await bus.publish_task("worker", "job", i)
        await eventually(lambda: got == [1, 2], what="tasks after the failure")
    failures = [r for r in caplog.records if "boom" in str(r.exc_info)]
    assert failures and "agents.worker.tasks.job" in failures[0].getMessage()


async def test_bad_messages_are_skipped_not_fatal(client: NatsClient, bus: A2ABus) -> None:
    got: list[Any] = []
    await bus.subscribe_to_events("x.events.*", lambda e: got.append(e.data))
    await client.publish_raw("agents.x.events.e", b"\xff not json")
    await client.publish_raw("agents.x.events.e", b"[1, 2, 3]")
    await client.publish_raw("agents.x.events.e", b'{"timestamp": "noon"}')
    await bus.publish_event("x", "e", "good")
    await eventually(lambda: got, what="the good event")
    assert got == ["good"]


@pytest.mark.parametrize("bad", ["", " ", "a.b", "a b", "*", ">", "agent\n", 7, None])
async def test_invalid_ids_raise_value_error_naming_the_value_before_sending(
    client: NatsClient, bus: A2ABus, bad: Any
) -> None:
    before = await last_seq(client)
    for call in (
        bus.publish_task(bad, "execute", {}),
        bus.publish_task("agent", bad, {}),
        bus.publish_event(bad, "e"),
        bus.publish_event("agent", bad),
        bus.publish_system_event(bad),
        bus.request_agent(bad, "t", {}, timeout=0.1),
    ):
        with pytest.raises(ValueError) as info:
            await call
        assert isinstance(info.value, InvalidSubjectError)
        assert repr(bad) in str(info.value)
    assert await last_seq(client) == before


@pytest.mark.parametrize("bad", ["", "a..b", ">.tasks", "a.>.b", "a*.tasks", "tasks.", ".x"])
async def test_invalid_patterns_raise(bus: A2ABus, bad: str) -> None:
    with pytest.raises(ValueError, match="pattern"):
        await bus.subscribe_to_tasks(bad, print)
    with pytest.raises(ValueError, match="pattern"):
        await bus.subscribe_to_events(bad, print)


async def test_bad_task_ids_and_payloads(client: NatsClient, bus: A2ABus) -> None:
    before = await last_seq(client)
    for bad_id in (123, "", "   "):
        with pytest.raises(InvalidTaskError):
            await bus.publish_task("a", "t", {"id": bad_id, "payload": 1})
    with pytest.raises(ValueError, match="JSON"):
        await bus.publish_task("a", "t", {"payload": object()})
    with pytest.raises(ValueError):
        await bus.subscribe_to_tasks("a.tasks.*", print, queue="bad queue")
    assert await last_seq(client) == before


# -- request / reply ----------------------------------------------------------------


async def test_request_agent_gets_the_reply(make_client: Any, bus: A2ABus) -> None:
    agent = A2ABus(await make_client())
    handled: list[str] = []

    async def quote(task: Envelope) -> None:
        handled.append(task.id)
        await reply({"symbol": task.data["symbol"], "price": 95000})

    await agent.subscribe_to_tasks("pricer.tasks.quote", quote)
    await agent.subscribe_to_tasks("pricer.tasks.double", lambda t: t.data * 2)  # return value replies
    await agent.client.flush()
    try:
        answer = await bus.request_agent("pricer", "quote", {"payload": {"symbol": "BTCUSDT"}}, timeout=15)
    except RequestTimeoutError as exc:  # says which half was lost, should it ever happen
        raise AssertionError(f"{exc}; the handler ran for {handled}") from exc
    assert answer == {"symbol": "BTCUSDT", "price": 95000}
    assert await bus.request_agent("pricer", "double", 21, timeout=15) == 42
    results = await asyncio.gather(*(bus.request_agent("pricer", "double", i, timeout=15) for i in range(20)))
    assert results == [2 * i for i in range(20)]
    await agent.close()


async def test_request_agent_times_out_clearly(bus: A2ABus) -> None:
    with pytest.raises(RequestTimeoutError) as info:
        await bus.request_agent("nobody", "work", {"payload": 1}, timeout=0.3)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, LiquidNatsError)
    assert "agents.nobody.tasks.work" in str(info.value)


async def test_reply_outside_a_handler_raises() -> None:
    with pytest.raises(RuntimeError, match="inside"):
        await reply(1)


# -- history and async acks ---------------------------------------------------------


async def test_replay_reads_history_in_order(bus: A2ABus) -> None:
    seqs = [await bus.publish_event("hist", "tick", i) for i in range(6)]
    await bus.publish_task("hist", "other", 99)
    all_events = [e.data async for e in bus.replay("hist.events.*", since=timedelta(minutes=5))]
    assert all_events == list(range(6))
    assert seqs[3] is not None
    from_cursor = [e.data async for e in bus.replay("hist.events.*", since=seqs[3])]
    assert from_cursor == [3, 4, 5]
    limited = [e.data async for e in bus.replay("hist.>", limit=2)]
    assert limited == [0, 1]
    assert [e async for e in bus.replay("nobody.>")] == []
    with pytest.raises(ValueError):
        [e async for e in bus.replay("hist.>", since=0)]


async def test_publish_task_async_is_stored(client: NatsClient, bus: A2ABus) -> None:
    futures = [await bus.publish_task_async("bulk", "job", {"id": f"b-{i}", "payload": i}) for i in range(500)]
    await bus.wait_acks(timeout=10)
    acks = [f.result() for f in futures]
    assert [a.seq for a in acks] == list(range(1, 501))
    assert (await client.js.stream_info(streams.A2A_TASKS)).state.messages == 500


async def test_closed_bus_refuses_use(bus: A2ABus) -> None:
    await bus.close()
    with pytest.raises(LiquidNatsError, match="closed"):
        await bus.publish_event("a", "b")

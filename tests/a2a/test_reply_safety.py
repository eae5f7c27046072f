"""A task sender cannot choose where an agent publishes: ``reply_to`` in a task body is
only ever an inbox of the requester (issue 10, finding 1).

The attacker is a plain nats-py connection that publishes crafted envelopes onto the
agent's task subject; the agent's handler returns (or ``reply``-s) a value as usual.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client as RawConnection
from nats.aio.msg import Msg
from prometheus_client import REGISTRY

from liquidcrypto import A2ABus, Envelope, reply
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.helpers import eventually

PURGE = f"$JS.API.STREAM.PURGE.{streams.ORCHESTRATOR_TASKS}"


def refused(reason: str) -> float:
    return REGISTRY.get_sample_value("liquidcrypto_a2a_replies_refused_total", {"reason": reason}) or 0.0


async def send_crafted(nc: RawConnection, subject: str, **fields: Any) -> None:
    body = {
        "id": f"evil-{fields.get('n', 0)}",
        "kind": "task",
        "agent_id": "victim",
        "type": "work",
        "timestamp": 1,
        "data": {"x": 1},
    }
    body.update({k: v for k, v in fields.items() if k != "n"})
    await nc.publish(subject, orjson.dumps(body))
    await nc.flush()


async def orchestrator_messages(client: NatsClient) -> int:
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS)
    return int(info.state.messages)


@pytest.mark.parametrize("durable", [None, "victim-durable"])
@pytest.mark.parametrize("reply_to", [PURGE, "orchestrator.tasks.evil.p1"], ids=["purge", "inject-task"])
async def test_reply_to_outside_an_inbox_leaves_the_work_queue_unchanged(
    client: NatsClient, bus: A2ABus, attacker: RawConnection, durable: str | None, reply_to: str
) -> None:
    await client.js_publish("orchestrator.tasks.s1.p1", {"task": "keep me"})
    assert await orchestrator_messages(client) == 1
    handled: list[str] = []

    async def handler(task: Envelope) -> dict[str, str]:
        handled.append(task.id)
        return {"done": task.id}  # a returned value is sent as the reply

    await bus.subscribe_to_tasks("victim.tasks.*", handler, durable=durable)
    before = refused("not_inbox")
    await send_crafted(attacker, "agents.victim.tasks.work", reply_to=reply_to, n=1)
    # A second, harmless task: handled one at a time, so the first one's reply (if any)
    # was published before this one runs.
    await send_crafted(attacker, "agents.victim.tasks.work", n=2)
    await eventually(lambda: handled == ["evil-1", "evil-2"], what="both tasks handled")
    # Barrier: stored after anything the agent's connection published before it.
    await client.js_publish("orchestrator.tasks.zz.barrier", {"task": "barrier"})
    assert await orchestrator_messages(client) == 2, "the agent's reply changed the work queue"
    assert refused("not_inbox") == before + 1
    if durable is not None:  # the task is still acked

        async def acked() -> bool:
            info = await client.js.consumer_info(streams.A2A_TASKS, durable)
            return bool(info.num_ack_pending == 0 and info.num_pending == 0)

        await eventually(acked, what="crafted task acked")


async def test_reply_to_a_trade_subject_injects_no_trade_frame(
    client: NatsClient, bus: A2ABus, attacker: RawConnection, nats_server: NatsServer
) -> None:
    spy = await nats.connect(nats_server.url)
    seen: list[str] = []

    async def on_trade(msg: Msg) -> None:
        seen.append(msg.subject)

    await spy.subscribe("trades.>", cb=on_trade)
    await spy.flush()
    sent: list[bool] = []

    async def handler(task: Envelope) -> None:
        sent.append(await reply({"price": 1}))  # explicit reply()

    await bus.subscribe_to_tasks("victim.tasks.*", handler)
    await send_crafted(attacker, "agents.victim.tasks.work", reply_to="trades.BTCUSDT")
    await eventually(lambda: sent, what="handler ran")
    assert sent == [False], "reply() reported a reply to a non-inbox subject as sent"
    # Barrier: the agent's connection sends a sentinel after whatever it published.
    await client.publish_raw("trades.zz-sentinel", b"{}")
    await eventually(lambda: "trades.zz-sentinel" in seen, what="sentinel")
    assert seen == ["trades.zz-sentinel"], f"a frame was injected into the trade feed: {seen}"
    await spy.close()


@pytest.mark.parametrize(
    ("reply_to", "reason"),
    [
        ("_INBOX.>", "invalid"),
        ("_INBOX.*", "invalid"),
        ("_INBOX.abc.*", "invalid"),
        ("_INBOX.a b", "invalid"),
        ("_INBOX.a\r\nPUB x 1", "invalid"),
        ("_INBOX.a\x00b", "invalid"),
        ("_INBOX..a", "invalid"),
        ("_INBOX." + "a" * 600, "too_long"),
        ("_INBOX", "not_inbox"),
        ("_INBOXX.a", "not_inbox"),
        ("$KV.A2A_AGENTS.victim", "not_inbox"),
        ("agents.victim.tasks.work", "not_inbox"),
        ("", "invalid"),
    ],
)
def test_reply_addresses_other_than_a_literal_inbox_subject_are_refused(reply_to: str, reason: str) -> None:
    from liquidcrypto.a2a.replies import refused_reason

    assert refused_reason(reply_to, "_INBOX") == reason


@pytest.mark.parametrize("reply_to", ["_INBOX.abc", "_INBOX.abc.def-1_2", "_MY_INBOX.x.y"])
def test_literal_inbox_subjects_are_accepted(reply_to: str) -> None:
    from liquidcrypto.a2a.replies import refused_reason

    prefix = "_MY_INBOX" if reply_to.startswith("_MY_") else "_INBOX"
    assert refused_reason(reply_to, prefix) is None


async def test_wildcard_inbox_reply_is_refused_on_the_wire(
    client: NatsClient, bus: A2ABus, attacker: RawConnection
) -> None:
    """``_INBOX.>`` would reach every pending request of every client at once."""
    got: list[bytes] = []

    async def on_inbox(msg: Msg) -> None:
        got.append(msg.data)

    await attacker.subscribe("_INBOX.victims.*", cb=on_inbox)
    await attacker.flush()
    handled: list[str] = []
    await bus.subscribe_to_tasks("victim.tasks.*", lambda t: handled.append(t.id) or "answer")
    await send_crafted(attacker, "agents.victim.tasks.work", reply_to="_INBOX.victims.*", n=1)
    await send_crafted(attacker, "agents.victim.tasks.work", reply_to="_INBOX.victims.ok", n=2)
    await eventually(lambda: len(handled) == 2, what="both handled")
    await eventually(lambda: got, what="the legitimate inbox reply")
    await client.flush()
    await attacker.flush()
    assert len(got) == 1 and orjson.loads(got[0])["correlation_id"] == "evil-2"


async def test_request_agent_still_gets_its_reply(bus: A2ABus, make_client: Any) -> None:
    agent = A2ABus(await make_client())
    await agent.subscribe_to_tasks("calc.tasks.add", lambda t: t.data["a"] + t.data["b"])
    assert await bus.request_agent("calc", "add", {"payload": {"a": 2, "b": 3}}) == 5
    await agent.close()


async def test_request_agent_with_a_custom_inbox_prefix(make_client: Any) -> None:
    requester = A2ABus(await make_client(inbox_prefix="_LC_INBOX"))
    agent = A2ABus(await make_client(inbox_prefix="_LC_INBOX"))
    await agent.subscribe_to_tasks("calc.tasks.add", lambda t: t.data["a"] + t.data["b"])
    assert await requester.request_agent("calc", "add", {"payload": {"a": 2, "b": 5}}) == 7
    await agent.close()
    await requester.close()


async def test_refusals_are_logged_without_flooding(
    bus: A2ABus, attacker: RawConnection, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from liquidcrypto.a2a import replies

    monkeypatch.setattr(replies, "_last_warning", {})  # earlier tests' warnings do not count
    handled: list[str] = []
    await bus.subscribe_to_tasks("victim.tasks.*", lambda t: handled.append(t.id) or "x")
    with caplog.at_level("WARNING", logger="liquidcrypto.a2a.replies"):
        for i in range(20):
            await send_crafted(attacker, "agents.victim.tasks.work", reply_to=PURGE, n=i)
        await eventually(lambda: len(handled) == 20, what="all handled")
        await asyncio.sleep(0)
    warnings = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert PURGE in warnings[0].getMessage()

"""One small test per bug the fuzz suite found or issue 10 names, each on a real nats-server.

Each test failed on the code of its day, marked ``xfail(strict=True)`` until the fix
landed (see ``known_bugs``); all pass now and guard against the bug coming back. The
untrusted party is a raw nats-py connection, as in the properties.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as Nats

from liquidcrypto import A2ABus, Envelope, OrchestratorTask, WorkQueue, codec
from liquidcrypto.errors import LiquidNatsError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.workqueue.models import DeadLetter, decode_task
from tests.helpers import eventually


def troubles(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records and tracebacks of the package (what the properties call unexpected)."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.name.startswith("liquidcrypto") and (r.levelno >= logging.ERROR or r.exc_info)
    ]


async def subject_count(client: NatsClient, stream: str, subject_filter: str) -> int:
    info = await client.js.stream_info(stream, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


def task_body(session: str, sub: str, **extra: Any) -> bytes:
    return orjson.dumps({"sessionId": session, "subPrdId": sub, "createdAt": 1, **extra})


# -- issue 10, finding 1: reply_to is published to unchecked ----------------------------------


@pytest.mark.parametrize(
    ("reply_to", "stream"),
    [("$JS.API.STREAM.PURGE.ORCHESTRATOR_TASKS", streams.ORCHESTRATOR_TASKS), ("trades.BTCUSDT", streams.TRADE_EVENTS)],
)
async def test_reply_to_outside_the_bus_inboxes_is_never_published(
    client: NatsClient, bus: A2ABus, attacker: Nats, reply_to: str, stream: str
) -> None:
    await client.js.publish("orchestrator.results.keep.me", b'{"sessionId":"keep","subPrdId":"me","success":true}')
    before = (await client.js.stream_info(stream)).state.messages
    handled: list[str] = []
    published_there: list[bytes] = []

    async def handler(task: Envelope) -> dict[str, Any]:
        handled.append(task.id)
        return {"answer": 42}

    async def spy(msg: Any) -> None:
        published_there.append(msg.data)

    await attacker.subscribe(reply_to, cb=spy)
    await attacker.flush()
    await bus.subscribe_to_tasks("victim.tasks.*", handler)
    await attacker.publish("agents.victim.tasks.run", orjson.dumps({"id": "t1", "reply_to": reply_to}))
    await attacker.publish("agents.victim.tasks.run", orjson.dumps({"id": "t2"}))
    await eventually(lambda: handled == ["t1", "t2"], what="both tasks handled")
    await client.flush()  # a reply to t1 was sent before t2 was handled: the server has it now
    await attacker.flush()  # and the attacker's subscription has received it
    assert published_there == []
    assert (await client.js.stream_info(stream)).state.messages == before


# -- issue 10, finding 2: an over-size message with headers closes the connection for good -----


async def test_oversize_task_with_headers_is_refused_and_the_client_stays_healthy(client: NatsClient) -> None:
    body = b"x" * (client.nc.max_payload - 8)  # under max_payload alone; over it with its Nats-Msg-Id
    with pytest.raises(LiquidNatsError):
        await client.js_publish_raw("agents.victim.tasks.big", body, {"Nats-Msg-Id": "big-1"}, timeout=1)
    await eventually(lambda: client.state is ConnectionState.CONNECTED, timeout=3, what="the client connected")
    assert (await client.health())["connected"]
    assert (await client.js_publish_raw("agents.victim.tasks.small", b"{}", {"Nats-Msg-Id": "small-1"})).seq >= 1


# -- finding A: a vertical tab or form feed in a subject drops the receiving connection ------


@pytest.mark.parametrize("char", ["\x0b", "\x0c"])
async def test_a_subject_with_a_vertical_tab_does_not_drop_the_connection(
    client: NatsClient, bus: A2ABus, attacker: Nats, char: str
) -> None:
    got: list[str] = []
    await bus.subscribe_to_events("*.events.>", lambda e: got.append(e.id))
    await attacker.publish(f"agents.a{char}b.events.x", b'{"id": "bad"}')
    await attacker.publish("agents.a.events.x", b'{"id": "good"}')
    await attacker.flush()
    await eventually(lambda: "good" in got or client.reconnects, what="the next event or a reconnect")
    assert client.reconnects == 0 and client.state is ConnectionState.CONNECTED
    assert got == ["bad", "good"]


# -- finding B: JSON nested past the recursion limit escapes the decoders --------------------


NESTED = b'{"a":' * 5000 + b"1" + b"}" * 5000


async def test_deeply_nested_json_is_skipped_as_bad_input(
    client: NatsClient, bus: A2ABus, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    core: list[str] = []
    durable: list[str] = []
    await bus.subscribe_to_events("*.events.>", lambda e: core.append(e.id))
    await bus.subscribe_to_tasks("victim.tasks.>", lambda t: durable.append(t.id), durable="victim", ack_wait=2)
    for subject in ("agents.victim.events.x", "agents.victim.tasks.x"):
        await attacker.publish(subject, NESTED)
        await attacker.publish(subject, b'{"id": "after"}')
    await eventually(lambda: core == ["after"] and durable == ["after"], what="the next messages handled")
    info = await client.js.consumer_info(streams.A2A_TASKS, "victim")
    assert (info.num_ack_pending, info.num_pending) == (0, 0)  # terminated as bad input, like any other
    skipped = [r for r in caplog.records if "skipping message on agents.victim.events.x" in r.getMessage()]
    assert skipped and not troubles(caplog)


# -- finding C: a malformed task the worker cannot dead-letter is never acknowledged ---------


MALFORMED_TASKS = (
    ("orchestrator.tasks.a\u2028b.c", b"not json"),  # a token NATS accepts and the package refuses
    ("orchestrator.tasks.*.c", b"not json"),  # a wildcard token, stored as it is
    ("orchestrator.tasks.s.p", b'{"a":' * 300 + b"1" + b"}" * 300),  # past orjson's encoder depth (255)
)


async def test_every_malformed_task_is_dead_lettered_and_acknowledged(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        for subject, body in MALFORMED_TASKS:
            await attacker.jetstream().publish(subject, body)

        async def consumed() -> bool:
            return await subject_count(client, streams.ORCHESTRATOR_TASKS, "orchestrator.tasks.>") == 0

        await eventually(consumed, timeout=3, what="the malformed tasks removed from the work queue")
    assert not troubles(caplog)


# -- finding D: the result goes to the session named in the task's body ----------------------


async def test_a_task_cannot_publish_a_result_into_another_session(client: NatsClient, attacker: Nats) -> None:
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        await attacker.jetstream().publish("orchestrator.tasks.mine.p1", task_body("victim", "forged"))

        async def consumed() -> bool:
            return await subject_count(client, streams.ORCHESTRATOR_TASKS, "orchestrator.tasks.>") == 0

        await eventually(consumed, what="the task consumed")
    assert await subject_count(client, streams.ORCHESTRATOR_TASKS, "orchestrator.results.victim.>") == 0


# -- finding E: a stored Status header hides a message from the pull consumers ---------------


async def test_a_task_with_a_status_header_is_still_run(client: NatsClient, attacker: Nats) -> None:
    ran: list[str] = []

    def run(task: OrchestratorTask) -> dict[str, bool]:
        ran.append(task.sub_prd_id)
        return {"success": True}

    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(run)
        for sub, status in (("p100", "100"), ("p409", "409")):
            await attacker.jetstream().publish(
                f"orchestrator.tasks.s.{sub}",
                task_body("s", sub),
                headers={"Status": status, "Description": "Consumer Deleted"},
            )
        await eventually(lambda: sorted(ran) == ["p100", "p409"], timeout=3, what="both tasks run")


async def test_a_durable_task_with_a_status_header_is_still_handled(bus: A2ABus, attacker: Nats) -> None:
    got: list[str] = []
    await bus.subscribe_to_tasks("victim.tasks.>", lambda t: got.append(t.id), durable="victim-e")
    await attacker.publish("agents.victim.tasks.x", b'{"id": "t1"}', headers={"Status": "100"})
    await attacker.publish("agents.victim.tasks.x", b'{"id": "t2"}')
    await eventually(lambda: "t2" in got, what="the next task handled")
    assert got == ["t1", "t2"]  # handled in stream order


# -- finding F: a task sender can close the worker's connection (finding 2, from outside) ----


def dead_letter_size(body: bytes, task_id: str, subject: str) -> int:
    """The size of the dead letter the worker writes for the malformed task ``body``."""
    try:
        decode_task(body)
    except ValueError as exc:
        error = f"malformed task: {exc}"
    else:
        raise AssertionError("the task must be malformed")
    letter = DeadLetter(task=codec.decode(body), task_id=task_id, subject=subject, attempts=1, last_error=error)
    return len(codec.encode(letter.to_dict(exclude={"id"})))


async def test_a_near_max_payload_malformed_task_is_dead_lettered_and_the_worker_stays_connected(
    client: NatsClient, attacker: Nats
) -> None:
    # The attacker's message fits (body + its header <= max_payload); the dead letter the
    # worker writes for it is its body plus ~235 bytes of fields, just under max_payload,
    # and its Nats-Msg-Id header pushes it over: the server closes the worker's connection.
    max_payload, task_id, subject = client.nc.max_payload, "t" * 40, "orchestrator.tasks.s.p"
    size = max_payload - 400
    size += max_payload - 4 - dead_letter_size(orjson.dumps({"x": "y" * size}), task_id, subject)
    body = orjson.dumps({"x": "y" * size})
    assert dead_letter_size(body, task_id, subject) == max_payload - 4  # one more "y", one more byte
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        await attacker.jetstream().publish(subject, body, headers={"Nats-Msg-Id": task_id})

        async def consumed() -> bool:
            if client.state is not ConnectionState.CONNECTED:
                return False
            return await subject_count(client, streams.ORCHESTRATOR_TASKS, "orchestrator.tasks.>") == 0

        await eventually(consumed, timeout=3, what="the task dead-lettered with the worker connected")
        assert client.reconnects == 0 and (await client.health())["connected"]

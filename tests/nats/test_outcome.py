""" "Raised" does not mean "not stored" (issue 12, item 5): an A2A publish and an enqueue
whose acknowledgement does not come during a freeze of nats-server raise
``PublishOutcomeUnknownError`` naming the id, and a retry with that id is stored once."""

from __future__ import annotations

import pytest

from liquidcrypto import A2ABus
from liquidcrypto.errors import PublishOutcomeUnknownError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.nats.streams import WORK_QUEUE_RESOURCES
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue.enqueue import enqueue
from tests.helpers import frozen


async def _messages(client: NatsClient, stream: str, subject: str) -> int:
    info = await client.js.stream_info(stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())


async def test_an_a2a_publish_during_a_freeze_says_outcome_unknown_and_a_retry_stores_once(
    client: NatsClient, bus: A2ABus, nats_server: NatsServer
) -> None:
    subject = "agents.frz.tasks.job"
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid), pytest.raises(PublishOutcomeUnknownError) as info:
        await bus.publish_task("frz", "job", {"id": "frz-1", "payload": {"n": 1}}, timeout=2)
    err = info.value
    assert err.sent is True and err.msg_id == "frz-1"
    assert "outcome unknown" in str(err) and "retry with the same id" in str(err) and "frz-1" in str(err)
    await client.wait_connected(15)
    seq = await bus.publish_task("frz", "job", {"id": "frz-1", "payload": {"n": 1}})
    again = await bus.publish_task("frz", "job", {"id": "frz-1", "payload": {"n": 1}})
    assert again == seq
    await client.flush()
    assert await _messages(client, streams.A2A_TASKS, subject) == 1

    # A generated id: the error names it, and publishing again with id= is as harmless.
    with frozen(nats_server.proc.pid), pytest.raises(PublishOutcomeUnknownError) as info:
        await bus.publish_task("frz", "job", {"n": 2}, timeout=2)
    generated = info.value.msg_id
    assert generated and f"id={generated!r}" in str(info.value)
    await client.wait_connected(15)
    await bus.publish_task("frz", "job", {"n": 2}, id=generated)
    await client.flush()
    assert await _messages(client, streams.A2A_TASKS, subject) == 2


async def test_an_enqueue_during_a_freeze_says_outcome_unknown_and_a_retry_stores_once(
    client: NatsClient, nats_server: NatsServer
) -> None:
    await client.require(WORK_QUEUE_RESOURCES)
    task = {"sessionId": "frz", "subPrdId": "one", "payload": {"n": 1}}
    assert nats_server.proc is not None
    with frozen(nats_server.proc.pid), pytest.raises(PublishOutcomeUnknownError) as info:
        await enqueue(client, task, timeout=2)
    err = info.value
    assert err.sent is True and err.msg_id == "frz.one"
    assert "outcome unknown" in str(err) and "retry with the same id" in str(err)
    await client.wait_connected(15)
    receipt = await enqueue(client, task)  # the same task: the same deterministic id
    assert receipt.task_id == "frz.one"
    again = await enqueue(client, task)
    assert again.duplicate and again.seq == receipt.seq
    await client.flush()
    assert await _messages(client, infra.TASKS_STREAM, "orchestrator.tasks.frz.>") == 1

    # An explicit id (a deliberate re-run's fresh one) retried after an unknown outcome.
    with frozen(nats_server.proc.pid), pytest.raises(PublishOutcomeUnknownError) as info:
        await enqueue(client, task, task_id="frz.one.rerun-1", timeout=2)
    assert info.value.msg_id == "frz.one.rerun-1"
    await client.wait_connected(15)
    await enqueue(client, task, task_id="frz.one.rerun-1")
    await client.flush()
    assert await _messages(client, infra.TASKS_STREAM, "orchestrator.tasks.frz.>") == 2

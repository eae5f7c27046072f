"""Results have a bounded life: uncollected ones expire (per-message TTL), and a result
whose ``subscribe_to_results`` handler keeps failing is dead-lettered, not dropped."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import nats
import pytest

from liquidcrypto import TaskResult, WorkQueue, list_dead_letters, requeue_dead_letter
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue.worker import WorkerOptions
from tests.helpers import eventually

MakeClient = Callable[..., Awaitable[NatsClient]]


async def stream_messages(client: NatsClient, subject_filter: str) -> int:
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


async def test_results_carry_a_ttl_and_uncollected_ones_expire(client: NatsClient) -> None:
    assert (await client.js.stream_info(streams.ORCHESTRATOR_TASKS)).config.allow_msg_ttl
    assert WorkerOptions().result_ttl == infra.DEFAULT_RESULT_TTL == 7 * 24 * 3600
    async with WorkQueue(client) as wq:
        stop = await wq.start_orchestrator_worker(lambda t: {"success": True})
        await wq.enqueue_orchestrator_task({"sessionId": "kept", "subPrdId": "a"})
        await eventually(lambda: stream_messages(client, "orchestrator.results.kept.>"), what="result stored")
        kept = await client.js.get_last_msg(streams.ORCHESTRATOR_TASKS, "orchestrator.results.kept.a")
        assert (kept.headers or {}).get(hdr.TTL) == "604800s"
        await stop()

        await wq.start_orchestrator_worker(lambda t: {"success": True}, result_ttl=1.0)
        await wq.enqueue_orchestrator_task({"sessionId": "brief", "subPrdId": "a"})
        await eventually(lambda: stream_messages(client, "orchestrator.results.brief.>"), what="result stored")

        async def expired() -> bool:
            return await stream_messages(client, "orchestrator.results.brief.>") == 0

        await eventually(expired, timeout=10, what="uncollected result expired")
        assert await stream_messages(client, "orchestrator.tasks.>") == 0
        assert await stream_messages(client, "orchestrator.results.kept.>") == 1


def test_result_ttl_is_checked() -> None:
    with pytest.raises(ValueError, match="result_ttl"):
        WorkerOptions(result_ttl=0.5)
    assert WorkerOptions(result_ttl=None).result_ttl is None


async def test_an_existing_tasks_stream_is_given_per_message_ttls(
    nats_server: NatsServer, make_client: MakeClient
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(replace(streams.ORCHESTRATOR_TASKS_STREAM, allow_msg_ttl=None))
        assert not (await nc.jetstream().stream_info(streams.ORCHESTRATOR_TASKS)).config.allow_msg_ttl
    finally:
        await nc.close()
    client = await make_client()
    assert (await client.js.stream_info(streams.ORCHESTRATOR_TASKS)).config.allow_msg_ttl


async def test_a_result_whose_handler_keeps_failing_is_dead_lettered_and_can_be_requeued(client: NatsClient) -> None:
    calls = 0

    def broken(result: TaskResult) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("database down")

    async with WorkQueue(client) as wq:
        sub = await wq.subscribe_to_results("s", broken)
        await wq.start_orchestrator_worker(lambda t: {"success": True, "result": 7})
        await wq.enqueue_orchestrator_task({"sessionId": "s", "subPrdId": "a"})
        [letter] = await eventually(lambda: list_dead_letters(client), timeout=15, what="result dead-lettered")
        await sub.unsubscribe()
        assert calls == 3 and letter.kind == "result" and letter.attempts == 3
        assert letter.task_id == "s.a" and "database down" in letter.last_error
        assert letter.subject == "orchestrator.results.s.a"
        assert TaskResult.from_dict(letter.task).result == 7
        assert await stream_messages(client, "orchestrator.results.>") == 0  # not left behind either

        got: list[TaskResult] = []
        sub = await wq.subscribe_to_results("s", got.append)
        await requeue_dead_letter(client, letter.id)
        await eventually(lambda: len(got) == 1, what="requeued result delivered")
        await sub.unsubscribe()
        assert got[0].result == 7 and await list_dead_letters(client) == []


async def test_an_unreadable_result_is_dead_lettered(client: NatsClient) -> None:
    got: list[Any] = []
    async with WorkQueue(client) as wq:
        sub = await wq.subscribe_to_results("s", got.append)
        await client.js.publish("orchestrator.results.s.bad", b"{not json", headers={hdr.MSG_ID: "bad-1"})
        [letter] = await eventually(lambda: list_dead_letters(client), what="unreadable result dead-lettered")
        await sub.unsubscribe()
    assert got == [] and letter.kind == "result" and "not valid JSON" in letter.last_error
    assert letter.task == "{not json"

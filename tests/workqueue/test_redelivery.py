"""Redelivered tasks whose result is already stored, and results stored after the
de-duplication window: a task completes once even when it runs (or ran) twice."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from liquidcrypto import OrchestratorTask, TaskResult, WorkQueue
from liquidcrypto.config import Settings
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import infra, results
from tests.helpers import eventually

MakeClient = Callable[..., Awaitable[NatsClient]]


async def stream_messages(client: NatsClient, subject_filter: str) -> int:
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


async def test_redelivered_task_whose_result_is_stored_is_acknowledged_without_running(client: NatsClient) -> None:
    """A worker stored the result and died before its ack: the redelivery must not run it again."""
    wq = WorkQueue(client)
    await infra.ensure(client)
    await infra.ensure_worker_consumer(client.js, 30.0)
    await wq.enqueue_orchestrator_task({"sessionId": "s", "subPrdId": "done"})
    # The dead worker's run: it took the task, stored the result, never acknowledged.
    psub = await client.js.pull_subscribe_bind(infra.WORKER_CONSUMER, streams.ORCHESTRATOR_TASKS)
    [first] = await psub.fetch(1, timeout=5)
    stored = TaskResult(session_id="s", sub_prd_id="done", success=True, result="first run")
    assert await results.publish_result(client, stored, "s.done")
    await first.nak()  # redelivered at once instead of after ack_wait
    await psub.unsubscribe()
    calls = 0

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return {"success": True, "result": "second run"}

    stop = await wq.start_orchestrator_worker(handler)

    async def task_gone() -> bool:
        return await stream_messages(client, "orchestrator.tasks.>") == 0

    await eventually(task_gone, what="redelivered task acknowledged")
    await stop()
    assert calls == 0
    [result] = await wq.collect_results("s", 1, timeout=5.0)
    assert result.result == "first run"


async def test_result_published_after_the_dedupe_window_is_not_stored_twice(make_client: MakeClient) -> None:
    """Another run stored the result; this run finishes after the 1 s de-duplication window
    has forgotten that id: the worker finds the stored result and does not add a second."""
    client = await make_client(settings=Settings(dedupe_window=1.0))
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS)
    assert info.config.duplicate_window == 1.0
    wq = WorkQueue(client)

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        other = TaskResult(session_id=t.session_id, sub_prd_id=t.sub_prd_id, success=True, result="other run")
        assert await results.publish_result(client, other, "s.slow")  # a concurrent run finished first
        await asyncio.sleep(1.5)  # this run's own work outlasts the window
        return {"success": True, "result": "this run"}

    stop = await wq.start_orchestrator_worker(handler)
    await wq.enqueue_orchestrator_task({"sessionId": "s", "subPrdId": "slow"})

    async def task_gone() -> bool:
        return await stream_messages(client, "orchestrator.tasks.>") == 0

    await eventually(task_gone, what="task acknowledged")
    await stop()
    assert await stream_messages(client, "orchestrator.results.>") == 1
    [result] = await wq.collect_results("s", 1, timeout=5.0)
    assert result.result == "other run"

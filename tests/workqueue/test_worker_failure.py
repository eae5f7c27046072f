"""A worker never idles silently: it re-creates a deleted consumer, stops visibly on a
permanent error (``failure``, ``wait()``, the metric, an error log), and logs repeated
transient pull failures at error level."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError
from prometheus_client import REGISTRY

from liquidcrypto import OrchestratorTask, WorkQueue
from liquidcrypto.errors import ConsumerConflictError, NatsUnavailableError
from liquidcrypto.nats import failures, streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue.worker import Worker, WorkerOptions
from tests.helpers import eventually


def failed_workers() -> float:
    return REGISTRY.get_sample_value("liquidcrypto_wq_workers_failed") or 0.0


async def run_one(wq: WorkQueue, sub: str, timeout: float = 15.0) -> None:
    await wq.enqueue_orchestrator_task({"sessionId": "f", "subPrdId": sub})
    results = await wq.collect_results("f", 1, timeout=timeout)
    assert results.complete, f"task {sub} was not processed within {timeout} s"


async def delete_worker_consumer(client: NatsClient) -> None:
    with contextlib.suppress(JsNotFoundError):
        await client.js.delete_consumer(streams.ORCHESTRATOR_TASKS, infra.WORKER_CONSUMER)


async def started(client: NatsClient) -> Worker:
    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        return {"success": True}

    worker = Worker(client, handler, WorkerOptions(ack_wait=5.0, stop_timeout=1.0))
    await worker.start()
    return worker


async def test_deleting_the_consumer_under_a_running_worker_recreates_it(client: NatsClient) -> None:
    wq = WorkQueue(client)
    worker = await started(client)
    try:
        await run_one(wq, "before")
        for i in range(3):
            await delete_worker_consumer(client)
            await run_one(wq, f"after{i}")
        assert worker.failure is None and not worker.stopped
        assert worker.health()["state"] == "running"
    finally:
        await worker.stop()


async def test_a_conflicting_consumer_stops_the_worker_visibly(
    client: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    before = failed_workers()
    worker = await started(client)
    await run_one(WorkQueue(client), "before")
    conflicting = ConsumerConfig(
        durable_name="intruder", filter_subject="orchestrator.tasks.f.>", ack_policy=AckPolicy.EXPLICIT
    )

    async def take_its_place() -> bool:  # the worker may re-create its consumer first: again
        await delete_worker_consumer(client)
        try:
            await client.js.add_consumer(streams.ORCHESTRATOR_TASKS, conflicting)
            return True
        except BadRequestError:
            return False

    with caplog.at_level(logging.ERROR):
        await eventually(take_its_place, what="conflicting consumer in place")
        with pytest.raises(ConsumerConflictError):
            await asyncio.wait_for(worker.wait(), 15)
    assert isinstance(worker.failure, ConsumerConflictError) and worker.stopped
    assert worker.health()["state"] == "failed" and "ConsumerConflictError" in worker.health()["failure"]
    assert failed_workers() == before + 1
    assert any(r.levelno == logging.ERROR and "permanent" in r.getMessage() for r in caplog.records)
    await worker.stop()  # still idempotent, quiet
    assert failed_workers() == before + 1


async def test_a_programming_error_while_binding_stops_the_worker_visibly(
    client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a nats-py upgrade that renamed something looks like: an AttributeError."""
    worker = await started(client)
    await run_one(WorkQueue(client), "before")

    async def renamed(*args: Any, **kwargs: Any) -> Any:
        raise AttributeError("'JetStreamContext' object has no attribute 'consumer_info'")

    monkeypatch.setattr(infra, "ensure_worker_consumer", renamed)
    await delete_worker_consumer(client)
    with pytest.raises(AttributeError, match="consumer_info"):
        await asyncio.wait_for(worker.wait(), 15)
    assert worker.stopped and worker.health()["state"] == "failed"
    await worker.stop()


async def test_repeated_transient_failures_are_logged_as_errors_until_it_recovers(
    client: NatsClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    worker = await started(client)
    wq = WorkQueue(client)
    await run_one(wq, "before")
    real = infra.ensure_worker_consumer
    outage = True

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        if outage:
            raise NatsUnavailableError("JetStream is not answering")
        return await real(*args, **kwargs)

    monkeypatch.setattr(failures, "REPEAT_LOG_INTERVAL", 0.3)
    monkeypatch.setattr(infra, "ensure_worker_consumer", unavailable)
    with caplog.at_level(logging.DEBUG, logger="liquidcrypto.nats.failures"):
        await delete_worker_consumer(client)

        def errors() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]

        await eventually(lambda: len(errors()) >= 2, what="repeated failures logged as errors")
        assert all("failed" in m and "JetStream is not answering" in m for m in errors())
        assert worker.failure is None and worker.health()["state"] == "retrying"
        outage = False
        await run_one(wq, "after")
    assert worker.health()["state"] == "running"
    assert any("working again" in r.getMessage() for r in caplog.records)
    await worker.stop()


async def test_work_queue_health_names_failed_workers(client: NatsClient) -> None:
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        health = wq.health()
        assert health == {"workers": 1, "running": 1, "failed": []}

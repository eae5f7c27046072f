"""Work queue against a real nats-server: enqueue, workers, results, retries, dead letters."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import liquidcrypto as pkg
from liquidcrypto import OrchestratorTask, TaskResult, WorkQueue, list_dead_letters, requeue_dead_letter
from liquidcrypto.config import Settings
from liquidcrypto.errors import (
    ConsumerConflictError,
    DeadLetterNotFoundError,
    InvalidSubjectError,
    InvalidTaskError,
    NatsUnavailableError,
)
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.embedded import NatsServer, free_port
from liquidcrypto.workqueue import infra
from liquidcrypto.workqueue import results as results_mod
from liquidcrypto.workqueue.worker import Worker, WorkerOptions
from tests.helpers import eventually


@pytest.fixture
async def wq(client: NatsClient) -> Any:
    async with WorkQueue(client) as q:
        yield q


def task(session: str, sub: str, specialist: str | None = None, **payload: Any) -> dict[str, Any]:
    """A task in the spec's camelCase form."""
    return {
        "sessionId": session,
        "subPrdId": sub,
        "specialist": specialist,
        "payload": payload,
        "createdAt": 1_700_000_000_000,
    }


async def stream_messages(client: NatsClient, subject_filter: str) -> int:
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


# -- models and validation -------------------------------------------------------


def test_task_accepts_camel_and_snake_case_and_sends_camel_case() -> None:
    camel = OrchestratorTask.from_dict(task("s1", "ui-1", "ui-agent", story="login"))
    snake = OrchestratorTask.from_dict(
        {
            "session_id": "s1",
            "sub_prd_id": "ui-1",
            "specialist": "ui-agent",
            "payload": {"story": "login"},
            "created_at": 1_700_000_000_000,
        }
    )
    assert camel == snake
    assert camel.subject == "orchestrator.tasks.s1.ui-1"
    assert camel.to_wire() == task("s1", "ui-1", "ui-agent", story="login")


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "with space"])
async def test_invalid_ids_raise_value_error_before_publishing(wq: WorkQueue, client: NatsClient, bad: str) -> None:
    with pytest.raises(ValueError, match="session_id") as err:
        await wq.enqueue_orchestrator_task(task(bad, "x"))
    assert isinstance(err.value, InvalidSubjectError)
    with pytest.raises(ValueError, match="sub_prd_id"):
        await wq.enqueue_orchestrator_task({"session_id": "s", "sub_prd_id": bad})
    with pytest.raises(InvalidTaskError, match="sessionId"):
        await wq.enqueue_orchestrator_task({"subPrdId": "x"})
    assert await stream_messages(client, "orchestrator.tasks.>") == 0


async def test_worker_rejects_bad_options(wq: WorkQueue) -> None:
    for kwargs in ({"concurrency": 0}, {"max_deliver": 0}, {"ack_wait": 0}, {"backoff": [-1]}):
        with pytest.raises(ValueError):
            await wq.start_orchestrator_worker(lambda t: {"success": True}, **kwargs)


async def test_collect_results_rejects_bad_arguments(wq: WorkQueue) -> None:
    with pytest.raises(ValueError, match="session_id"):
        await wq.collect_results("a.b", 1, 1.0)
    with pytest.raises(ValueError, match="timeout"):
        await wq.collect_results("s", 1, 0)


# -- the happy path -------------------------------------------------------------------


async def test_spec_example_enqueue_work_collect(wq: WorkQueue) -> None:
    receipt = await wq.enqueue_orchestrator_task(task("session-123", "ui-component", "ui-agent", story="Build"))
    assert receipt.seq >= 1 and not receipt.duplicate and receipt.task_id == "session-123.ui-component"
    seen: list[OrchestratorTask] = []

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        seen.append(t)
        return {
            "sessionId": t.session_id,
            "subPrdId": t.sub_prd_id,
            "success": True,
            "result": {"built": t.payload["story"]},
            "completedAt": 1,
        }

    stop = await wq.start_orchestrator_worker(handler)
    results = await wq.collect_results("session-123", 1, timeout=10.0)
    await stop()
    assert results.complete and results.missing == []
    assert results == [
        TaskResult(
            session_id="session-123", sub_prd_id="ui-component", success=True, result={"built": "Build"}, completed_at=1
        )
    ]
    assert [t.specialist for t in seen] == ["ui-agent"]


async def test_reenqueue_of_the_same_task_runs_once(wq: WorkQueue, client: NatsClient) -> None:
    first = await wq.enqueue_orchestrator_task(task("s", "a"))
    second = await wq.enqueue_orchestrator_task(task("s", "a", note="again"))
    assert second.duplicate and second.seq == first.seq
    calls: Counter[str] = Counter()

    def handler(t: OrchestratorTask) -> TaskResult:
        calls[t.sub_prd_id] += 1
        return TaskResult(session_id=t.session_id, sub_prd_id=t.sub_prd_id, success=True)

    stop = await wq.start_orchestrator_worker(handler, concurrency=4)
    assert (await wq.collect_results("s", 1, 10.0)).complete
    # Removed, confirmed by the server, before collect_results returned.
    assert await stream_messages(client, "orchestrator.results.>") == 0
    await stop()
    assert calls == {"a": 1}

    async def stream_empty() -> bool:  # the task and its collected result are removed
        return await stream_messages(client, "orchestrator.>") == 0

    await eventually(stream_empty, what="work-queue stream empty")


async def test_worker_holds_only_as_many_tasks_as_free_slots(wq: WorkQueue, client: NatsClient) -> None:
    release = asyncio.Event()
    running: list[str] = []

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        running.append(t.sub_prd_id)
        await release.wait()
        return {"success": True}

    for i in range(10):
        await wq.enqueue_orchestrator_task(task("s", f"t{i}"))
    stop = await wq.start_orchestrator_worker(handler, concurrency=2)
    await eventually(lambda: len(running) == 2, what="two handlers running")
    info = await client.js.consumer_info(streams.ORCHESTRATOR_TASKS, infra.WORKER_CONSUMER)
    assert info.num_ack_pending == 2 and info.num_pending == 8
    release.set()
    assert (await wq.collect_results("s", 10, 10.0)).complete
    await stop()
    assert sorted(running) == sorted(f"t{i}" for i in range(10))


async def test_task_arriving_without_a_free_slot_is_handed_back_to_another_worker(
    wq: WorkQueue, client: NatsClient
) -> None:
    """A pull request that outlived a reconnect delivers to a busy worker: it hands the
    task back at once instead of sitting on it while another worker idles."""
    release = asyncio.Event()
    ran: list[tuple[str, str]] = []

    def handler(name: str) -> Any:
        async def run(t: OrchestratorTask) -> dict[str, Any]:
            ran.append((name, t.sub_prd_id))
            if name == "busy":
                await release.wait()
            return {"success": True}

        return run

    busy = Worker(client, handler("busy"), WorkerOptions(concurrency=1))
    await busy.start()
    await wq.enqueue_orchestrator_task(task("s", "long"))
    await eventually(lambda: ran == [("busy", "long")], what="the long task running")
    await busy._pull.request(1)  # the stale request: no slot behind it
    await wq.enqueue_orchestrator_task(task("s", "next"))
    await eventually(lambda: busy.handed_back == 1, what="task handed back")
    stop_idle = await wq.start_orchestrator_worker(handler("idle"))
    await eventually(lambda: ("idle", "next") in ran, what="the idle worker running it")
    release.set()
    assert (await wq.collect_results("s", 2, 10.0)).complete
    await busy.stop()
    await stop_idle()
    assert sorted(ran) == [("busy", "long"), ("idle", "next")]


# -- failures --------------------------------------------------------------------------


async def test_poison_task_dead_lettered_after_max_deliver_then_requeued(wq: WorkQueue, client: NatsClient) -> None:
    calls: Counter[str] = Counter()
    healthy = False

    def handler(t: OrchestratorTask) -> dict[str, Any]:
        calls[t.sub_prd_id] += 1
        if t.sub_prd_id == "poison" and not healthy:
            raise RuntimeError("model refused")
        return {"success": True, "result": calls[t.sub_prd_id]}

    await wq.enqueue_orchestrator_task(task("s", "ok"))
    await wq.enqueue_orchestrator_task(task("s", "poison", "ui-agent"))
    stop = await wq.start_orchestrator_worker(handler, max_deliver=3, backoff=[0.05, 0.1])
    results = await wq.collect_results("s", 2, 15.0)
    by_id = {r.sub_prd_id: r for r in results}
    assert by_id["ok"].success
    assert not by_id["poison"].success and by_id["poison"].error == "RuntimeError: model refused"
    assert calls["poison"] == 3

    letters = await list_dead_letters(client)
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.attempts, letter.task_id, letter.last_error) == (3, "s.poison", "RuntimeError: model refused")
    assert letter.task["subPrdId"] == "poison" and letter.failed_at > 0

    healthy = True
    receipt = await requeue_dead_letter(client, letter.id)
    assert not receipt.duplicate and receipt.task_id.startswith("s.poison.rq")
    again = await wq.collect_results("s", 1, 10.0)
    await stop()
    assert again[0].sub_prd_id == "poison" and again[0].success and again[0].result == 4
    assert await list_dead_letters(client) == []
    with pytest.raises(DeadLetterNotFoundError):
        await requeue_dead_letter(client, letter.id)
    with pytest.raises(ValueError, match="positive integer"):
        await requeue_dead_letter(client, "abc")


async def test_malformed_task_message_is_a_failure_result_not_retried(wq: WorkQueue, client: NatsClient) -> None:
    await client.js.publish("orchestrator.tasks.s.bad", b"{not json", headers={"Nats-Msg-Id": "junk-1"})
    await client.js.publish("orchestrator.tasks.s.shape", b'{"sessionId": "s"}')
    calls: list[str] = []
    stop = await wq.start_orchestrator_worker(lambda t: calls.append(t.sub_prd_id) or {"success": True})
    results = {r.sub_prd_id: r for r in await wq.collect_results("s", 2, 10.0)}
    await stop()
    assert calls == []
    assert not results["bad"].success and "malformed task" in (results["bad"].error or "")
    assert not results["shape"].success and "subPrdId" in (results["shape"].error or "")
    letters = {d.subject: d for d in await list_dead_letters(client)}
    assert letters["orchestrator.tasks.s.bad"].task == "{not json"
    with pytest.raises(InvalidTaskError):
        await requeue_dead_letter(client, letters["orchestrator.tasks.s.bad"].id)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ("done", "handler returned str"),
        ({"result": 1}, "no 'success' field"),
        ({"success": True, "subPrdId": "other"}, "result for s/other while processing s/a"),
    ],
)
async def test_handler_returning_a_wrong_shape_is_a_failure_result(wq: WorkQueue, returned: Any, message: str) -> None:
    await wq.enqueue_orchestrator_task(task("s", "a"))
    calls = 0

    def handler(t: OrchestratorTask) -> Any:
        nonlocal calls
        calls += 1
        return returned

    stop = await wq.start_orchestrator_worker(handler, max_deliver=5, backoff=[0.05])
    [result] = await wq.collect_results("s", 1, 10.0)
    await stop()
    assert not result.success and message in (result.error or "")
    assert calls == 1  # a wrong shape is deterministic: not retried


async def test_long_task_with_in_progress_is_not_redelivered(wq: WorkQueue, client: NatsClient) -> None:
    calls = 0

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(3.0)  # the task's own work: three times ack_wait
        return {"success": True}

    await wq.enqueue_orchestrator_task(task("s", "long"))
    stop = await wq.start_orchestrator_worker(handler, ack_wait=1.0, concurrency=2)
    [result] = await wq.collect_results("s", 1, 15.0)
    info = await client.js.consumer_info(streams.ORCHESTRATOR_TASKS, infra.WORKER_CONSUMER)
    await stop()
    assert result.success and calls == 1
    assert info.num_redelivered == 0 and info.delivered.stream_seq == 1


async def test_ack_wait_is_never_lowered_under_a_running_worker(wq: WorkQueue, client: NatsClient) -> None:
    async def consumer() -> Any:
        return await client.js.consumer_info(streams.ORCHESTRATOR_TASKS, infra.WORKER_CONSUMER)

    async def idle_worker(ack_wait: float) -> Any:
        return await wq.start_orchestrator_worker(lambda t: {"success": True}, ack_wait=ack_wait)

    async def waiting() -> bool:
        return bool((await consumer()).num_waiting)

    long_ = await idle_worker(20.0)
    await eventually(waiting, what="the first worker's pull request")
    short = await idle_worker(2.0)
    assert (await consumer()).config.ack_wait == 20.0  # the first worker's long tasks stay safe
    longer = await idle_worker(40.0)
    assert (await consumer()).config.ack_wait == 40.0  # raising is safe for everyone
    for stop in (long_, short, longer):
        await stop()

    async def unused() -> bool:
        info = await consumer()
        return not info.num_waiting and not info.num_ack_pending

    await eventually(unused, what="no worker using the consumer")
    stop = await idle_worker(3.0)
    assert (await consumer()).config.ack_wait == 3.0  # nobody else: it follows the new worker
    await stop()


async def test_stop_lets_running_finish_and_hands_back_the_rest(wq: WorkQueue) -> None:
    started: Counter[str] = Counter()
    never = asyncio.Event()

    async def stuck(t: OrchestratorTask) -> dict[str, Any]:
        started[t.sub_prd_id] += 1
        if t.sub_prd_id == "slow":
            await never.wait()
        return {"success": True}

    await wq.enqueue_orchestrator_task(task("s", "slow"))
    stop = await wq.start_orchestrator_worker(stuck, concurrency=2)
    await eventually(lambda: started["slow"] == 1, what="slow task running")
    await asyncio.wait_for(stop(timeout=0.3), timeout=5.0)  # returns although the handler is stuck

    async def quick(t: OrchestratorTask) -> dict[str, Any]:
        started[t.sub_prd_id] += 1
        return {"success": True, "result": "second worker"}

    stop2 = await wq.start_orchestrator_worker(quick)
    [result] = await wq.collect_results("s", 1, 10.0)
    await stop2()
    assert result.result == "second worker" and started["slow"] == 2


# -- results -----------------------------------------------------------------------------


async def test_collected_results_whose_acks_are_lost_are_deleted(
    client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's consumer vanished (as in a restart): the results still leave the stream."""
    for sub in ("a", "b", "c"):
        r = TaskResult(session_id="s", sub_prd_id=sub, success=True)
        await client.js_publish(r.subject, r.to_wire(), msg_id=f"result.s.{sub}")
    psub = await client.js.pull_subscribe("orchestrator.results.s.>", stream=infra.TASKS_STREAM)
    msgs = await psub.fetch(3, timeout=5)
    await client.js.delete_consumer(infra.TASKS_STREAM, (await psub.consumer_info()).name)
    monkeypatch.setattr(results_mod, "REMOVE_TIMEOUT", 0.5)
    await results_mod.remove_results(client, msgs, "s")
    assert await stream_messages(client, "orchestrator.results.>") == 0


async def test_collect_results_timeout_returns_partial_visibly_and_keeps_results(wq: WorkQueue) -> None:
    for sub, spec in (("a", "ui-agent"), ("b", "ui-agent"), ("c", "api-agent"), ("d", None)):
        await wq.enqueue_orchestrator_task(task("s", sub, spec))
    ui_seen: list[str] = []

    def ui(t: OrchestratorTask) -> dict[str, Any]:
        ui_seen.append(t.sub_prd_id)
        return {"success": True}

    stop_ui = await wq.start_orchestrator_worker(ui, specialist="ui-agent", concurrency=2)
    partial = await wq.collect_results("s", 4, timeout=1.5)
    assert not partial.complete and len(partial) == 2
    assert sorted(r.sub_prd_id for r in partial) == ["a", "b"]
    assert partial.missing == ["c", "d"]
    # Unclaimed tasks wait for a worker that takes them; partial results stay collectable.
    stop_any = await wq.start_orchestrator_worker(lambda t: {"success": True})
    full = await wq.collect_results("s", 4, timeout=10.0)
    await stop_ui()
    await stop_any()
    assert full.complete and sorted(r.sub_prd_id for r in full) == ["a", "b", "c", "d"]
    assert sorted(ui_seen) == ["a", "b"]


async def test_results_are_deduplicated_success_over_failure(wq: WorkQueue, client: NatsClient) -> None:
    fail = TaskResult(session_id="s", sub_prd_id="a", success=False, error="x")
    ok = TaskResult(session_id="s", sub_prd_id="a", success=True)
    await client.js_publish(fail.subject, fail.to_wire(), msg_id="result.s.a")
    await client.js_publish(ok.subject, ok.to_wire(), msg_id="result.s.a.rq1")
    await client.js_publish(ok.subject, ok.to_wire(), msg_id="result.s.a.rq1")  # stream drops it
    other = TaskResult(session_id="s", sub_prd_id="b", success=True)
    await client.js_publish(other.subject, other.to_wire(), msg_id="result.s.b")
    results = await wq.collect_results("s", 2, 5.0)
    assert results.complete and {(r.sub_prd_id, r.success) for r in results} == {("a", True), ("b", True)}


async def test_one_reader_per_session(wq: WorkQueue, client: NatsClient) -> None:
    first = asyncio.create_task(wq.collect_results("s", 1, timeout=4.0))

    async def first_reader_open() -> bool:
        infos = await client.js.consumers_info(streams.ORCHESTRATOR_TASKS)
        return any((info.name or "").startswith("results-") for info in infos)

    await eventually(first_reader_open, what="the first reader's consumer")
    with pytest.raises(ConsumerConflictError, match="another reader of session 's'"):
        await wq.collect_results("s", 1, timeout=0.5)
    assert not (await first).complete
    other = await wq.collect_results("other-session", 0, timeout=0.5)  # other sessions are free
    assert other.complete


async def test_subscribe_to_results_streams_each_result_once(wq: WorkQueue) -> None:
    got: list[TaskResult] = []
    sub = await wq.subscribe_to_results("s", got.append)
    stop = await wq.start_orchestrator_worker(lambda t: {"success": True, "result": t.payload}, concurrency=3)
    for i in range(5):
        await wq.enqueue_orchestrator_task(task("s", f"t{i}", n=i))
    await eventually(lambda: len(got) == 5, what="five results streamed")
    await stop()
    await sub.unsubscribe()
    assert sorted(r.result["n"] for r in got) == [0, 1, 2, 3, 4]
    assert not sub.active


# -- faults ----------------------------------------------------------------------------------


async def enqueue_when_up(wq: WorkQueue, t: dict[str, Any]) -> None:
    async def attempt() -> bool:
        try:
            await wq.enqueue_orchestrator_task(t)
            return True
        except Exception:  # noqa: BLE001 - not reconnected yet
            return False

    await eventually(attempt, timeout=20, interval=0.2, what=f"enqueue {t['subPrdId']}")


async def test_server_restart_loses_nothing(wq: WorkQueue, client: NatsClient, nats_server: NatsServer) -> None:
    for i in range(20):
        await wq.enqueue_orchestrator_task(task("s", f"before{i}"))
    await asyncio.to_thread(nats_server.restart)  # file storage: the tasks survive
    calls: Counter[str] = Counter()

    def handler(t: OrchestratorTask) -> dict[str, Any]:
        calls[t.sub_prd_id] += 1
        return {"success": True}

    await client.wait_connected(20)
    await eventually(lambda: client.is_connected, timeout=20, what="reconnected")
    stop = await eventually(
        _try(wq.start_orchestrator_worker, handler, concurrency=4), timeout=20, interval=0.2, what="worker started"
    )
    assert (await wq.collect_results("s", 20, 20.0)).complete
    # And a running worker survives a restart (nats.py #504: pull subscriptions can go silent).
    await asyncio.to_thread(nats_server.restart)
    for i in range(10):
        await enqueue_when_up(wq, task("s", f"after{i}"))
    assert (await wq.collect_results("s", 10, 20.0)).complete
    await stop()
    assert len(calls) == 30 and set(calls.values()) == {1}


def _try(fn: Any, *args: Any, **kwargs: Any) -> Any:
    async def attempt() -> Any:
        try:
            return await fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 - not ready yet
            return None

    return attempt


async def test_task_whose_runs_never_finish_is_dead_lettered(wq: WorkQueue, client: NatsClient) -> None:
    """Runs cut short (here by stop(); in life by a worker that dies) count as attempts."""
    starts = 0
    hang = asyncio.Event()

    async def handler(t: OrchestratorTask) -> dict[str, Any]:
        nonlocal starts
        starts += 1
        await hang.wait()
        return {"success": True}

    await wq.enqueue_orchestrator_task(task("s", "killer"))
    for run in range(1, 4):
        stop = await wq.start_orchestrator_worker(handler, max_deliver=2)
        await eventually(lambda run=run: starts == run, what=f"run {run} started")
        await stop(timeout=0.1)
    stop = await wq.start_orchestrator_worker(handler, max_deliver=2)
    [result] = await wq.collect_results("s", 1, 10.0)
    await stop(timeout=0.1)
    assert starts == 3 and not result.success and "2 runs never finished" in (result.error or "")
    [letter] = await list_dead_letters(client)
    assert letter.task_id == "s.killer" and letter.attempts == 2


async def test_enqueue_without_nats_raises_instead_of_dropping() -> None:
    client = NatsClient(f"nats://127.0.0.1:{free_port()}", settings=Settings())
    await client.connect()  # degraded: nobody listens there
    try:
        with pytest.raises(NatsUnavailableError):
            await WorkQueue(client).enqueue_orchestrator_task(task("s", "a"))
    finally:
        await client.close()


def test_public_names_are_exported() -> None:
    for name in (
        "WorkQueue",
        "OrchestratorTask",
        "TaskResult",
        "ResultSet",
        "DeadLetter",
        "EnqueueReceipt",
        "enqueue_orchestrator_task",
        "start_orchestrator_worker",
        "collect_results",
        "subscribe_to_results",
        "list_dead_letters",
        "requeue_dead_letter",
    ):
        assert name in pkg.__all__ and callable(getattr(pkg, name)), name


async def test_worker_started_while_nats_is_down_runs_once_it_is_up(tmp_path: Any) -> None:
    server = NatsServer(tmp_path / "late")
    client = NatsClient(server.url, settings=Settings())
    await client.connect()  # degraded: the server is not started yet
    try:
        async with WorkQueue(client) as wq:
            stop = await wq.start_orchestrator_worker(lambda t: {"success": True, "result": "late"})
            await asyncio.to_thread(server.start)
            await client.wait_connected(20)
            await wq.enqueue_orchestrator_task(task("s", "a"))
            [result] = await wq.collect_results("s", 1, 20.0)
            await stop()
        assert result.result == "late"
    finally:
        await client.close()
        server.stop()


async def test_subscribe_to_results_retries_a_result_whose_handler_failed(wq: WorkQueue) -> None:
    calls: Counter[str] = Counter()

    def flaky(result: TaskResult) -> None:
        calls[result.sub_prd_id] += 1
        if calls[result.sub_prd_id] == 1:
            raise RuntimeError("database busy")

    sub = await wq.subscribe_to_results("s", flaky)
    stop = await wq.start_orchestrator_worker(lambda t: {"success": True})
    await wq.enqueue_orchestrator_task(task("s", "a"))
    await eventually(lambda: sub.delivered == 1, what="result delivered after a retry")
    await stop()
    await sub.unsubscribe()
    assert calls == {"a": 2}

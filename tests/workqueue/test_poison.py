"""Tasks from an untrusted sender end, whatever they hold (issue 10 fuzz findings C, D, F).

A task whose body names another session than its subject is dead-lettered, never run;
a malformed task is dead-lettered even when its subject has tokens the package refuses,
its body cannot be re-encoded, or its dead letter would exceed ``max_payload`` (the task
is then kept as its first 4 KiB of text); one that cannot be dead-lettered at all is
terminated, logged at error and counted. Nothing stays in the work queue, and the
worker's connection stays up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as Nats
from prometheus_client import REGISTRY

from liquidcrypto import OrchestratorTask, WorkQueue, list_dead_letters, requeue_dead_letter
from liquidcrypto.errors import InvalidTaskError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.workqueue.dead_letters import dlq_subject_for, result_dlq_subject_for
from liquidcrypto.workqueue.models import DeadLetter
from tests.helpers import eventually

OK_RESULT = b'{"sessionId":"s","subPrdId":"ok","success":true}'


async def subject_count(client: NatsClient, subject_filter: str) -> int:
    info = await client.js.stream_info(streams.ORCHESTRATOR_TASKS, subjects_filter=subject_filter)
    return sum((info.state.subjects or {}).values())


async def queue_empty(client: NatsClient) -> bool:
    return await subject_count(client, "orchestrator.tasks.>") == 0


async def letters(client: NatsClient, n: int) -> dict[str, DeadLetter]:
    """The first ``n`` dead letters by original subject, once there are ``n``."""

    async def found() -> list[DeadLetter] | None:
        got = await list_dead_letters(client)
        return got if len(got) >= n else None

    return {d.subject: d for d in await eventually(found, what=f"{n} dead letter(s)")}


def terminated() -> float:
    return REGISTRY.get_sample_value("liquidcrypto_wq_tasks_total", {"outcome": "terminated"}) or 0.0


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("liquidcrypto") and r.levelno >= logging.ERROR]


# -- finding D: the subject is the authority ---------------------------------------------


async def test_a_task_naming_another_session_is_dead_lettered_not_run(client: NatsClient, attacker: Nats) -> None:
    ran: list[str] = []

    def run(task: OrchestratorTask) -> dict[str, bool]:
        ran.append(task.session_id)
        return {"success": True}

    body = orjson.dumps({"sessionId": "victim", "subPrdId": "forged", "createdAt": 1})
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(run)
        await attacker.jetstream().publish("orchestrator.tasks.mine.p1", body, headers={"Nats-Msg-Id": "forge-1"})
        letter = (await letters(client, 1))["orchestrator.tasks.mine.p1"]
        await eventually(lambda: queue_empty(client), what="the task acknowledged")
        # The session of the subject learns that its task failed; the victim gets nothing.
        failure = await wq.collect_results("mine", 1, timeout=5)
    assert ran == []
    assert await subject_count(client, "orchestrator.results.victim.>") == 0
    assert [(r.sub_prd_id, r.success) for r in failure] == [("p1", False)]
    assert "victim/forged" in letter.last_error and "orchestrator.tasks.mine.p1" in letter.last_error
    assert letter.task == orjson.loads(body) and letter.task_id == "forge-1"
    with pytest.raises(InvalidTaskError, match="victim"):  # requeueing would enqueue it into the victim's session
        await requeue_dead_letter(client, letter.id)


async def test_a_task_on_a_longer_subject_is_dead_lettered_not_run(client: NatsClient, attacker: Nats) -> None:
    ran: list[str] = []

    def run(task: OrchestratorTask) -> dict[str, bool]:
        ran.append(task.sub_prd_id)
        return {"success": True}

    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(run)
        body = orjson.dumps({"sessionId": "s", "subPrdId": "p"})
        await attacker.jetstream().publish("orchestrator.tasks.s.p.extra", body)
        letter = (await letters(client, 1))["orchestrator.tasks.s.p.extra"]
        await eventually(lambda: queue_empty(client), what="the task acknowledged")
    assert ran == [] and "orchestrator.tasks.s.p.extra" in letter.last_error
    assert await subject_count(client, "orchestrator.results.>") == 0  # no session/sub-PRD subject to fail


# -- finding C: every malformed task is dead-lettered and acknowledged --------------------


async def test_invalid_subject_tokens_are_hashed_in_the_dead_letter_subject(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    bad = ("orchestrator.tasks.a\u2028b.c", "orchestrator.tasks.*.c", "orchestrator.tasks.s." + "z" * 300)
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        for subject in bad:
            await attacker.jetstream().publish(subject, b"not json")
        got = await letters(client, len(bad))
        await eventually(lambda: queue_empty(client), what="the tasks acknowledged")
    assert sorted(got) == sorted(bad)  # the letter keeps the subject as it was
    assert await subject_count(client, "orchestrator.results.>") == 0  # no valid ids: no failure result
    dlq = await client.js.stream_info(streams.ORCHESTRATOR_DLQ, subjects_filter="orchestrator.dlq.>")
    stored = set(dlq.state.subjects or {})
    assert stored == {dlq_subject_for(s) for s in bad}
    for subject in stored:
        assert subject.split(".")[2] in ("c", "s") or subject.split(".")[2].startswith("invalid-")
    assert not errors(caplog)


def test_dead_letter_subjects_are_valid_and_bounded() -> None:
    assert dlq_subject_for("orchestrator.tasks.s.p") == "orchestrator.dlq.s.p"
    assert dlq_subject_for("orchestrator.tasks.s.p.q") == "orchestrator.dlq.s.p.q"
    star = dlq_subject_for("orchestrator.tasks.*.c")
    assert star.startswith("orchestrator.dlq.invalid-") and star.endswith(".c")
    assert dlq_subject_for("orchestrator.tasks.*.c") != dlq_subject_for("orchestrator.tasks.>.c")
    assert dlq_subject_for("orchestrator.tasks.s..p").count("invalid-") == 1  # an empty token
    many = dlq_subject_for("orchestrator.tasks." + ".".join(["*"] * 2000))
    assert len(many) < 100 and many.startswith("orchestrator.dlq.invalid-")
    assert result_dlq_subject_for("orchestrator.results.s.a b").startswith("orchestrator.dlq.results.s.invalid-")


async def test_a_body_too_deep_to_re_encode_is_kept_as_text(client: NatsClient, attacker: Nats) -> None:
    body = b'{"a":' * 300 + b"1" + b"}" * 300  # orjson parses 1024 levels, encodes 255
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        await attacker.jetstream().publish("orchestrator.tasks.s.p", body)
        letter = (await letters(client, 1))["orchestrator.tasks.s.p"]
        await eventually(lambda: queue_empty(client), what="the task acknowledged")
    assert letter.task == body[:4096].decode()
    assert "first 4096 bytes" in letter.last_error


async def test_a_dead_letter_over_max_payload_keeps_the_first_4_kib(client: NatsClient, attacker: Nats) -> None:
    # Finding F: the dead letter of this malformed task (JSON, not a task) is over max_payload.
    body = orjson.dumps({"x": "y" * (client.nc.max_payload - 100)})
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        await attacker.jetstream().publish("orchestrator.tasks.s.big", body)
        letter = (await letters(client, 1))["orchestrator.tasks.s.big"]
        await eventually(lambda: queue_empty(client), what="the task acknowledged")
        failure = await wq.collect_results("s", 1, timeout=5)
    assert letter.task == body[:4096].decode() and "max_payload" in letter.last_error
    assert [(r.sub_prd_id, r.success) for r in failure] == [("big", False)]
    assert client.reconnects == 0 and client.state is ConnectionState.CONNECTED


async def test_a_task_id_too_long_for_headers_is_hashed(client: NatsClient, attacker: Nats) -> None:
    # A 60 kB task id fits the sender's headers (the server allows 64 KiB); the failure
    # result would repeat it twice in its own, the dead letter once more.
    long_id = "i" * 60_000
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        await attacker.jetstream().publish("orchestrator.tasks.s.p", b"not json", headers={"Nats-Msg-Id": long_id})
        letter = (await letters(client, 1))["orchestrator.tasks.s.p"]
        await eventually(lambda: queue_empty(client), what="the task acknowledged")
        failure = await wq.collect_results("s", 1, timeout=5)
    assert letter.task_id == "sha256-" + hashlib.sha256(long_id.encode()).hexdigest()
    assert [(r.sub_prd_id, r.success) for r in failure] == [("p", False)]


async def test_a_task_the_dead_letter_stream_refuses_is_terminated_loudly(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    before = terminated()
    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(lambda t: {"success": True})
        # An operator's limit on the dead-letter stream: no dead letter fits.
        dlq = (await client.js.stream_info(streams.ORCHESTRATOR_DLQ)).config
        await client.js.update_stream(dataclasses.replace(dlq, max_msg_size=64))
        await attacker.jetstream().publish("orchestrator.tasks.s.p", b"not json")
        await eventually(lambda: queue_empty(client), what="the task terminated")
        await wq.enqueue_orchestrator_task({"sessionId": "s", "subPrdId": "next"})
        got = await wq.collect_results("s", 2, timeout=10)
    assert sorted((r.sub_prd_id, r.success) for r in got) == [("next", True), ("p", False)]
    assert terminated() == before + 1
    assert [e for e in errors(caplog) if "terminated" in e and "orchestrator.tasks.s.p" in e]
    assert await list_dead_letters(client) == []
    assert client.reconnects == 0


async def test_a_result_too_large_to_store_dead_letters_the_task(
    client: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    runs: list[str] = []

    def run(task: OrchestratorTask) -> dict[str, Any]:
        runs.append(task.sub_prd_id)
        return {"success": True, "result": "r" * client.nc.max_payload}

    async with WorkQueue(client) as wq:
        await wq.start_orchestrator_worker(run)
        await wq.enqueue_orchestrator_task({"sessionId": "s", "subPrdId": "huge"})
        letter = (await letters(client, 1))["orchestrator.tasks.s.huge"]
        failure = await wq.collect_results("s", 1, timeout=5)
    assert runs == ["huge"]  # once: not redelivered for ever
    assert "max_payload" in letter.last_error and letter.task["subPrdId"] == "huge"
    assert [(r.sub_prd_id, r.success) for r in failure] == [("huge", False)]
    assert not errors(caplog)


async def test_an_unreadable_result_on_an_invalid_subject_is_dead_lettered(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    got: list[str] = []
    async with WorkQueue(client) as wq:
        sub = await wq.subscribe_to_results("s", lambda r: got.append(r.sub_prd_id))
        await attacker.jetstream().publish("orchestrator.results.s.a\u2028b", b"not json")
        await attacker.jetstream().publish("orchestrator.results.s.ok", OK_RESULT)
        await eventually(lambda: got == ["ok"], what="the next result delivered")
        letter = (await letters(client, 1))["orchestrator.results.s.a\u2028b"]

        async def consumed() -> bool:
            return await subject_count(client, "orchestrator.results.s.>") == 0

        await eventually(consumed, what="both results consumed")
        await sub.unsubscribe()
    assert letter.kind == "result" and letter.task == "not json"
    assert not errors(caplog)


async def test_a_result_naming_another_sub_prd_is_dead_lettered_not_delivered(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    # Whoever may publish the result of s.x must not be able to pass it off as that of s.y.
    caplog.set_level(logging.WARNING)
    got: list[str] = []
    forged = b'{"sessionId":"s","subPrdId":"y","success":true}'
    async with WorkQueue(client) as wq:
        sub = await wq.subscribe_to_results("s", lambda r: got.append(r.sub_prd_id))
        await attacker.jetstream().publish("orchestrator.results.s.x", forged)
        await attacker.jetstream().publish("orchestrator.results.s.ok", OK_RESULT)
        await eventually(lambda: got == ["ok"], what="the next result delivered")
        letter = (await letters(client, 1))["orchestrator.results.s.x"]
        await sub.unsubscribe()
    assert letter.kind == "result" and letter.task == forged.decode()
    assert "s/y" in letter.last_error and "orchestrator.results.s.x" in letter.last_error
    with pytest.raises(InvalidTaskError):
        await requeue_dead_letter(client, letter.id)
    assert not errors(caplog)


async def test_collect_results_skips_a_result_naming_another_sub_prd(client: NatsClient, attacker: Nats) -> None:
    await attacker.jetstream().publish("orchestrator.results.s.x", b'{"sessionId":"s","subPrdId":"y","success":true}')
    await attacker.jetstream().publish("orchestrator.results.s.z", b'{"sessionId":"s","subPrdId":"z","success":true}')
    async with WorkQueue(client) as wq:
        got = await wq.collect_results("s", 2, timeout=1.5)
    assert [r.sub_prd_id for r in got] == ["z"] and not got.complete


def result_terminations() -> float:
    return REGISTRY.get_sample_value("liquidcrypto_wq_results_terminated_total") or 0.0


async def test_a_result_the_dead_letter_stream_refuses_is_terminated_loudly(
    client: NatsClient, attacker: Nats, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    before = result_terminations()
    got: list[str] = []
    async with WorkQueue(client) as wq:
        sub = await wq.subscribe_to_results("s", lambda r: got.append(r.sub_prd_id))
        dlq = (await client.js.stream_info(streams.ORCHESTRATOR_DLQ)).config
        await client.js.update_stream(dataclasses.replace(dlq, max_msg_size=64))
        await attacker.jetstream().publish("orchestrator.results.s.bad", b"not json")
        await attacker.jetstream().publish("orchestrator.results.s.ok", OK_RESULT)
        await eventually(lambda: got == ["ok"], what="the next result delivered")

        async def consumed() -> bool:
            return await subject_count(client, "orchestrator.results.s.>") == 0

        await eventually(consumed, what="both results consumed")
        await sub.unsubscribe()
    assert result_terminations() == before + 1
    assert [e for e in errors(caplog) if "terminated" in e and "orchestrator.results.s.bad" in e]

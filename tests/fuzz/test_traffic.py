"""The spy's allow-list (``traffic.classify``) on its own: what it lets through and what it reports."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.fuzz.traffic import FORBIDDEN_EXAMPLES, Expectations, Seen, classify

SERVICE = (
    "_INBOX.abc.def",
    "$JS.API.STREAM.INFO.A2A_TASKS",
    "$JS.API.CONSUMER.MSG.NEXT.ORCHESTRATOR_TASKS.orchestrator-workers",
    "$JS.API.CONSUMER.INFO.A2A_TASKS.fuzz-durable",
    "$JS.API.CONSUMER.DELETE.ORCHESTRATOR_TASKS.results-0123456789abcdef",
    "$JS.API.DIRECT.GET.KV_ORCHESTRATOR_ATTEMPTS.$KV.ORCHESTRATOR_ATTEMPTS.eA",
    "$JS.ACK.ORCHESTRATOR_TASKS.orchestrator-workers.1.2.3.4.0",
    "$JS.EVENT.ADVISORY.API",
    "$KV.ORCHESTRATOR_ATTEMPTS.eA",
    "fuzz.barrier.svc.3",
)


@pytest.mark.parametrize("subject", SERVICE)
def test_the_service_own_traffic_is_allowed(subject: str) -> None:
    assert classify([Seen(subject, "", 0)], Expectations()) == []


@pytest.mark.parametrize("subject", FORBIDDEN_EXAMPLES)
def test_forbidden_subjects_are_reported(subject: str) -> None:
    (problem,) = classify([Seen(subject, "", 7)], Expectations())
    assert repr(subject) in problem


def test_attacker_messages_are_matched_once_each_and_deliveries_are_not_publishes() -> None:
    expect = Expectations(attacker=Counter({"agents.fz.tasks.x": 1}))
    delivery = Seen("agents.fz.tasks.x", "$JS.ACK.A2A_TASKS.fuzz-durable.1.1.1.1.0", 5)
    sent = Seen("agents.fz.tasks.x", "", 5)
    assert classify([delivery, sent, delivery], expect) == []
    assert len(classify([sent, sent], expect)) == 1


def test_results_and_dead_letters_only_for_tasks_that_were_sent() -> None:
    expect = Expectations(task_subjects={"orchestrator.tasks.s.p"})
    ok = [Seen("orchestrator.results.s.p", "_INBOX.x.y", 9), Seen("orchestrator.dlq.s.p", "_INBOX.x.z", 9)]
    assert classify(ok, expect) == []
    forged = [Seen("orchestrator.results.victim.p", "_INBOX.x.y", 9), Seen("orchestrator.dlq.victim.p", "", 9)]
    assert len(classify(forged, expect)) == 2

"""The A2A bus's stored models (msgspec): the same bytes as before, extra card keys kept.

The expected bytes below were written by the pydantic models these replaced.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from liquidcrypto.a2a import registry
from liquidcrypto.a2a.lifecycle import TaskRecord, TaskState, TaskStateChange, _parse
from liquidcrypto.errors import InvalidPayloadError


def test_a_state_change_leaves_out_none_fields_on_the_wire() -> None:
    change = TaskStateChange(
        task_id="t",
        seq=2,
        state=TaskState.WORKING,
        previous=TaskState.SUBMITTED,
        timestamp=5,
        message="m",
        data={"k": None},
    )
    assert change.to_dict() == {
        "task_id": "t",
        "seq": 2,
        "state": "working",
        "previous": "submitted",
        "timestamp": 5,
        "message": "m",
        "data": {"k": None},
    }
    first = TaskStateChange(task_id="t", seq=1, state=TaskState.SUBMITTED, timestamp=1)
    assert first.to_dict() == {"task_id": "t", "seq": 1, "state": "submitted", "timestamp": 1}
    assert TaskStateChange(task_id="t", seq=1, state=TaskState.SUBMITTED, timestamp=1, data=0).to_dict()["data"] == 0
    record = TaskRecord(task_id="t", changes=[first, change])
    raw = record.encode()
    assert raw == (
        b'{"task_id":"t","changes":[{"task_id":"t","seq":1,"state":"submitted","timestamp":1},'
        b'{"task_id":"t","seq":2,"state":"working","previous":"submitted","timestamp":5,"message":"m",'
        b'"data":{"k":null}}]}'
    )
    back = _parse("t", raw)
    assert back == record and back.state is TaskState.WORKING and back.seq == 2
    assert back.changes[1].previous is TaskState.SUBMITTED
    for bad in (b"{}", b"", b"[]", b'{"task_id":"t","changes":[{"seq":"x"}]}'):
        with pytest.raises(InvalidPayloadError, match="'t' is unreadable"):
            _parse("t", bad)


def test_an_agent_card_keeps_its_extra_keys_in_the_bucket() -> None:
    card = registry.AgentCard.from_dict(
        {"id": "a", "name": "A", "skills": ["x"], "url": "http://u", "caps": {"s": True}}
    )
    assert card.url == "http://u" and card.extra == {"url": "http://u", "caps": {"s": True}}  # type: ignore[attr-defined]
    raw = registry._store(card, {"load": 1})
    assert raw == (
        b'{"card":{"id":"a","name":"A","version":"0","description":"","skills":["x"],"metadata":{},'
        b'"url":"http://u","caps":{"s":true}},"status":{"load":1}}'
    )
    back, status = registry._load(raw)
    assert back.to_dict() == card.to_dict() and back.encode() == card.encode() and status == {"load": 1}
    assert registry.AgentCard.decode(card.encode()).extra == card.extra
    plain = registry.AgentCard(id="b")
    assert registry._store(plain, None) == (
        b'{"card":{"id":"b","name":"","version":"0","description":"","skills":[],"metadata":{}},"status":null}'
    )
    assert plain.extra == {} and not hasattr(plain, "url")
    info = registry.AgentInfo(card=plain, last_heartbeat=datetime.now(UTC), online=True)
    assert info.id == "b"
    with pytest.raises(InvalidPayloadError, match="id"):
        registry.AgentCard.from_dict({"name": "x"})
    with pytest.raises(InvalidPayloadError, match="skills"):
        registry.AgentCard.from_dict({"id": "a", "skills": "x"})


@pytest.mark.parametrize("depth", [999, 1_000, 1_020, 5_000])
def test_json_nested_past_the_decoders_limits_is_decoded_or_invalid_payload(depth: int) -> None:
    """msgspec's typed pass stops near 1,000 levels with RecursionError (the dict path then
    decides), orjson stops at 1,024: deep nesting decodes or is bad input, nothing else."""
    from liquidcrypto.a2a import envelope
    from liquidcrypto.workqueue.models import OrchestratorTask

    nested = b'{"a":' * depth + b"1" + b"}" * depth
    reads = (
        lambda: envelope.decode(b'{"data":' + nested + b"}", "agents.a.tasks.t"),
        lambda: OrchestratorTask.decode(b'{"sessionId": "s", "subPrdId": "p", "payload":' + nested + b"}"),
    )
    for read in reads:
        if depth < 1_024:
            assert read() is not None
        else:
            with pytest.raises(InvalidPayloadError, match="depth limit"):
                read()

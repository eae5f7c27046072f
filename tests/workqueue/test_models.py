"""The work queue's wire models (msgspec): either key spelling in, the same bytes out, ids checked.

The expected bytes below were written by the pydantic models these replaced.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from liquidcrypto.errors import InvalidPayloadError, InvalidSubjectError, InvalidTaskError
from liquidcrypto.workqueue.models import (
    DeadLetter,
    OrchestratorTask,
    TaskResult,
    coerce_result,
    coerce_task,
    decode_result,
    decode_task,
)

tokens = st.text(
    alphabet=st.characters(
        blacklist_characters=" .*>\t\n\r\x0b\x0c", blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")
    ),
    min_size=1,
    max_size=20,
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)
tasks = st.builds(
    OrchestratorTask,
    session_id=tokens,
    sub_prd_id=tokens,
    specialist=st.none() | tokens,
    payload=json_values,
    created_at=st.integers(0, 2**53),
)
results = st.builds(
    TaskResult,
    session_id=tokens,
    sub_prd_id=tokens,
    success=st.booleans(),
    result=json_values,
    error=st.none() | st.text(max_size=20),
    completed_at=st.integers(0, 2**53),
)
SPELLINGS = {"session_id": "sessionId", "sub_prd_id": "subPrdId", "created_at": "createdAt"}
TASK = OrchestratorTask(
    session_id="s1",
    sub_prd_id="ui-1",
    specialist="ui",
    payload={"a": [1, 2.5, None, "é"], "b": {"x": None}},
    created_at=1_700_000_000_000,
)
ANY_TASK = OrchestratorTask(session_id="s", sub_prd_id="p", created_at=5)


def test_the_bytes_on_the_wire_are_unchanged() -> None:
    assert (
        TASK.encode()
        == (
            '{"sessionId":"s1","subPrdId":"ui-1","specialist":"ui","payload":{"a":[1,2.5,null,"é"],'
            '"b":{"x":null}},"createdAt":1700000000000}'
        ).encode()
    )
    assert TASK.to_wire() == orjson.loads(TASK.encode())
    assert OrchestratorTask(session_id="a", sub_prd_id="b", created_at=1).encode() == (
        b'{"sessionId":"a","subPrdId":"b","specialist":null,"payload":null,"createdAt":1}'
    )
    result = TaskResult(session_id="s", sub_prd_id="p", success=True, result={"r": 1}, completed_at=2)
    assert result.encode() == (
        b'{"sessionId":"s","subPrdId":"p","success":true,"result":{"r":1},"error":null,"completedAt":2}'
    )
    assert (TASK.subject, TASK.dedupe_id, result.subject) == (
        "orchestrator.tasks.s1.ui-1",
        "s1.ui-1",
        "orchestrator.results.s.p",
    )


def test_a_dead_letter_is_stored_with_snake_case_keys_and_without_its_id() -> None:
    letter = DeadLetter(
        task={"sessionId": "s"},
        task_id="s.p",
        subject="orchestrator.tasks.s.p",
        attempts=3,
        last_error="x",
        failed_at=7,
    )
    body = letter.to_dict(exclude={"id"})
    assert body == {
        "task": {"sessionId": "s"},
        "task_id": "s.p",
        "subject": "orchestrator.tasks.s.p",
        "attempts": 3,
        "last_error": "x",
        "failed_at": 7,
        "kind": "task",
    }
    assert list(body) == ["task", "task_id", "subject", "attempts", "last_error", "failed_at", "kind"]
    older = {k: v for k, v in body.items() if k != "kind"}  # stored before results had letters
    assert DeadLetter.from_dict({**older, "id": "3"}).kind == "task"
    back = DeadLetter.from_dict({**body, "id": "4"})
    assert back.id == "4" and back.task == letter.task and back.failed_at == 7
    with pytest.raises(InvalidPayloadError, match="task"):
        DeadLetter.from_dict({"id": "4"})


@pytest.mark.parametrize(
    "data",
    [
        {"sessionId": "s", "subPrdId": "p", "createdAt": 5},
        {"session_id": "s", "sub_prd_id": "p", "created_at": 5},
        {"sessionId": "s", "sub_prd_id": "p", "created_at": 5, "unknown": 1},
        {"sessionId": "s", "session_id": "ignored", "subPrdId": "p", "createdAt": 5, "created_at": 9},
        {"sessionId": "s", "subPrdId": "p", "createdAt": "5"},  # lax, as pydantic was
        {"sessionId": "s", "subPrdId": "p", "createdAt": 5.0},
    ],
)
def test_tasks_accept_either_spelling_and_the_wire_name_wins(data: dict[str, Any]) -> None:
    assert coerce_task(data) == ANY_TASK
    assert decode_task(orjson.dumps(data)) == ANY_TASK
    assert OrchestratorTask.from_dict(data) == ANY_TASK


def test_results_accept_either_spelling() -> None:
    expected = TaskResult(session_id="s", sub_prd_id="p", success=False, error="e", completed_at=1)
    for raw in (
        b'{"sessionId":"s","subPrdId":"p","success":false,"error":"e","completedAt":1}',
        b'{"session_id":"s","sub_prd_id":"p","success":"false","error":"e","completed_at":1}',
    ):
        assert decode_result(raw) == expected
    assert coerce_result({"success": False, "error": "e", "completed_at": 1}, ANY_TASK) == expected
    assert coerce_result({"success": 1, "completedAt": 1}, ANY_TASK).success is True


@pytest.mark.parametrize("bad", ["", "a.b", "a*", ">", "with space"])
@pytest.mark.parametrize("field", ["session_id", "sub_prd_id", "specialist"])
def test_an_invalid_id_raises_invalid_subject_error_naming_it(field: str, bad: str) -> None:
    snake = {"session_id": "s", "sub_prd_id": "p", field: bad}
    camel = {SPELLINGS.get(k, k): v for k, v in snake.items()}
    for attempt in (
        lambda: OrchestratorTask(**snake),
        lambda: coerce_task(snake),
        lambda: coerce_task(camel),
        lambda: decode_task(orjson.dumps(camel)),
        lambda: decode_task(orjson.dumps(snake)),
    ):
        with pytest.raises(InvalidSubjectError) as info:
            attempt()
        assert isinstance(info.value, ValueError)
        assert field in str(info.value) and repr(bad) in str(info.value)
    if field != "specialist":
        with pytest.raises(InvalidTaskError, match=field) as result_info:
            coerce_result({**snake, "success": True}, ANY_TASK)
        assert repr(bad) in str(result_info.value)
        with pytest.raises(InvalidPayloadError, match=field) as decode_info:
            decode_result(orjson.dumps({**camel, "success": True}))
        assert repr(bad) in str(decode_info.value)


def test_shape_errors_keep_their_classes_and_name_the_field() -> None:
    with pytest.raises(InvalidTaskError, match="sessionId"):
        coerce_task({"subPrdId": "x"})
    with pytest.raises(InvalidTaskError, match="createdAt"):
        decode_task(b'{"sessionId":"s","subPrdId":"p","createdAt":"soon"}')
    with pytest.raises(InvalidTaskError, match="JSON object"):
        decode_task(b"[1]")
    with pytest.raises(InvalidTaskError, match="OrchestratorTask or a dict"):
        coerce_task([1])  # type: ignore[arg-type]
    with pytest.raises(InvalidPayloadError, match="not valid JSON"):
        decode_task(b"{")
    with pytest.raises(InvalidPayloadError, match="success"):
        decode_result(b'{"sessionId":"s","subPrdId":"p"}')
    with pytest.raises(InvalidTaskError, match="no 'success'"):
        coerce_result({"result": 1}, ANY_TASK)
    with pytest.raises(InvalidTaskError, match="while processing s/p"):
        coerce_result({"success": True, "subPrdId": "q"}, ANY_TASK)


@given(tasks)
def test_a_task_survives_the_wire(task: OrchestratorTask) -> None:
    assert decode_task(task.encode()) == task
    assert coerce_task(task.to_wire()) == task
    assert orjson.loads(task.encode()) == task.to_wire()


@given(results)
def test_a_result_survives_the_wire(result: TaskResult) -> None:
    assert decode_result(result.encode()) == result
    assert TaskResult.from_dict(result.to_wire()) == result


@given(tasks, st.lists(st.booleans(), min_size=3, max_size=3))
def test_any_mix_of_spellings_reads_the_same_task(task: OrchestratorTask, snake: list[bool]) -> None:
    data = task.to_wire()
    for use_snake, (name, wire) in zip(snake, SPELLINGS.items(), strict=True):
        if use_snake:
            data[name] = data.pop(wire)
    assert coerce_task(data) == task
    assert decode_task(orjson.dumps(data)) == task


def _outcome(read: Any) -> object:
    try:
        return read()
    except ValueError as exc:
        return type(exc), str(exc)


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "sessionId",
                "session_id",
                "subPrdId",
                "sub_prd_id",
                "specialist",
                "payload",
                "createdAt",
                "created_at",
                "other",
            ]
        ),
        json_values | tokens,
        max_size=9,
    )
)
def test_the_typed_fast_path_and_the_dict_path_agree(data: dict[str, Any]) -> None:
    if "createdAt" not in data and "created_at" not in data:
        data["createdAt"] = 1_700_000_000_000  # else each path stamps its own "now" (a ms apart at times)
    raw = orjson.dumps(data)
    assert _outcome(lambda: decode_task(raw)) == _outcome(lambda: coerce_task(orjson.loads(raw)))


@given(tokens, st.sampled_from(" .*>"), tokens)
def test_any_id_holding_a_forbidden_character_is_named(head: str, bad: str, tail: str) -> None:
    value = head + bad + tail
    with pytest.raises(InvalidSubjectError) as info:
        decode_task(orjson.dumps({"sessionId": "s", "subPrdId": value}))
    assert repr(value) in str(info.value)


def test_the_wire_model_benchmark_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location(
        "wire_models_benchmark", Path(__file__).parents[2] / "benchmarks" / "wire_models.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # pydantic resolves annotations through it
    spec.loader.exec_module(bench)
    assert bench.main(["--rounds", "1", "--budget", "0.001"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line]
    assert len(rows) == 9  # the header, then encode and decode of four shapes

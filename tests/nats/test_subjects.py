from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from liquidcrypto.errors import InvalidSubjectError, LiquidNatsError
from liquidcrypto.nats import subjects

token_text = st.text(
    alphabet=st.characters(blacklist_characters=" .*>\t\n\r\x0b\x0c", blacklist_categories=("Cs", "Zs", "Cc")),
    min_size=1,
    max_size=20,
)


def test_builders_produce_the_spec_subjects() -> None:
    assert subjects.agent_task("trading", "execute") == "agents.trading.tasks.execute"
    assert subjects.agent_event("trading", "complete") == "agents.trading.events.complete"
    assert subjects.agent_heartbeat("trading") == "agents.trading.heartbeat"
    assert subjects.system_event("task_state_changed") == "system.events.task_state_changed"
    assert subjects.orchestrator_task("s123", "ui-1") == "orchestrator.tasks.s123.ui-1"
    assert subjects.orchestrator_result("s123", "ui-1") == "orchestrator.results.s123.ui-1"
    assert subjects.orchestrator_results("s123") == "orchestrator.results.s123.>"
    assert subjects.trade("BTCUSDT") == "trades.BTCUSDT"
    assert subjects.agents_pattern("*.events.>") == "agents.*.events.>"


@pytest.mark.parametrize("bad", ["", " ", "a b", "a.b", "*", ">", "a*", "x>", "tab\there", "new\nline"])
def test_invalid_tokens_raise_value_error_naming_the_value(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        subjects.agent_task(bad, "execute")
    assert isinstance(info.value, InvalidSubjectError)
    assert isinstance(info.value, LiquidNatsError)
    assert "agent_id" in str(info.value)
    assert repr(bad) in str(info.value)


def test_non_string_token_is_refused() -> None:
    with pytest.raises(ValueError, match="symbol"):
        subjects.trade(42)  # type: ignore[arg-type]


def test_overlong_token_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than"):
        subjects.token("x" * 300, "session_id")


@pytest.mark.parametrize("good", ["agents.>", "agents.*.tasks.*", "a", "a.b.c", "*", ">", "*.events.>"])
def test_valid_patterns(good: str) -> None:
    assert subjects.pattern(good) == good


@pytest.mark.parametrize("bad", ["", "a..b", ".a", "a.", "a.>.b", "a.b*", "a.>x", "a b"])
def test_invalid_patterns(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        subjects.pattern(bad)


def test_publishing_to_a_wildcard_is_refused() -> None:
    with pytest.raises(ValueError, match="wildcard"):
        subjects.subject("agents.*.tasks")


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("agents.*.tasks", "agents.trading.tasks", True),
        ("agents.*.tasks", "agents.trading.x.tasks", False),
        ("agents.>", "agents.trading.tasks.execute", True),
        ("agents.>", "agents", False),
        ("*.events.>", "trading.events.order_filled", True),
        ("*.events.>", "trading.events", False),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_wildcard_matching(pattern: str, subject: str, expected: bool) -> None:
    assert subjects.matches(pattern, subject) is expected


@given(st.lists(token_text, min_size=1, max_size=6))
def test_valid_tokens_round_trip_and_match_themselves(tokens: list[str]) -> None:
    for t in tokens:
        assert subjects.token(t) == t
    subject = ".".join(tokens)
    assert subjects.subject(subject) == subject
    assert subjects.matches(subject, subject)
    assert subjects.matches(">", subject)
    assert subjects.matches(".".join("*" for _ in tokens), subject)

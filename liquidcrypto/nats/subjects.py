"""Subject builders and validation, in one place (the spec's subject-pattern table).

A *token* (agent id, task/event type, session id, sub-PRD id, symbol) becomes one
dot-separated part of a subject: it must be non-empty and hold no whitespace, ``.``,
``*`` or ``>``. A *pattern* is a subject that may use ``*`` (exactly one token) and
``>`` (one or more tokens, last only).
"""

from __future__ import annotations

import re

from liquidcrypto.errors import InvalidSubjectError

_BAD_TOKEN = re.compile(r"[\s.*>]")
_MAX_TOKEN = 256

AGENTS = "agents"
SYSTEM_EVENTS = "system.events"
ORCHESTRATOR_TASKS = "orchestrator.tasks"
ORCHESTRATOR_RESULTS = "orchestrator.results"
TRADES = "trades"
WS_BROADCAST = "ws.broadcast"


def token(value: object, what: str = "token") -> str:
    """Return ``value`` if it is a valid single subject token.

    Raises:
        InvalidSubjectError: (a ``ValueError``) naming ``what`` and the value.
    """
    if not isinstance(value, str):
        raise InvalidSubjectError(what, value, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidSubjectError(what, value, "must not be empty")
    if len(value) > _MAX_TOKEN:
        raise InvalidSubjectError(what, value[:40] + "...", f"longer than {_MAX_TOKEN} characters")
    bad = _BAD_TOKEN.search(value)
    if bad:
        raise InvalidSubjectError(what, value, f"must not contain whitespace, '.', '*' or '>' (found {bad.group()!r})")
    return value


def pattern(value: object, what: str = "pattern") -> str:
    """Return ``value`` if it is a valid subject or wildcard pattern.

    Raises:
        InvalidSubjectError: naming the value and what is wrong with it.
    """
    if not isinstance(value, str):
        raise InvalidSubjectError(what, value, f"must be a string, not {type(value).__name__}")
    if not value:
        raise InvalidSubjectError(what, value, "must not be empty")
    parts = value.split(".")
    for i, part in enumerate(parts):
        if part in ("*", ">"):
            if part == ">" and i != len(parts) - 1:
                raise InvalidSubjectError(what, value, "'>' may only be the last token")
            continue
        if not part:
            raise InvalidSubjectError(what, value, "has an empty token (leading, trailing or double '.')")
        bad = _BAD_TOKEN.search(part)
        if bad:
            raise InvalidSubjectError(
                what, value, f"token {part!r} contains {bad.group()!r}; wildcards must be whole tokens"
            )
    return value


def subject(value: object, what: str = "subject") -> str:
    """Return ``value`` if it is a valid concrete subject (no wildcards), for publishing."""
    s = pattern(value, what)
    if "*" in s.split(".") or ">" in s.split("."):
        raise InvalidSubjectError(what, value, "cannot publish to a wildcard subject")
    return s


def matches(pattern_: str, subject_: str) -> bool:
    """Whether ``subject_`` matches the NATS wildcard ``pattern_``."""
    p, s = pattern_.split("."), subject_.split(".")
    for i, part in enumerate(p):
        if part == ">":
            return len(s) > i
        if i >= len(s) or (part != "*" and part != s[i]):
            return False
    return len(p) == len(s)


def agent_task(agent_id: str, task_type: str) -> str:
    """``agents.{agent_id}.tasks.{task_type}``"""
    return f"{AGENTS}.{token(agent_id, 'agent_id')}.tasks.{token(task_type, 'task_type')}"


def agent_event(agent_id: str, event_type: str) -> str:
    """``agents.{agent_id}.events.{event_type}``"""
    return f"{AGENTS}.{token(agent_id, 'agent_id')}.events.{token(event_type, 'event_type')}"


def agent_heartbeat(agent_id: str) -> str:
    """``agents.{agent_id}.heartbeat``"""
    return f"{AGENTS}.{token(agent_id, 'agent_id')}.heartbeat"


def agents_pattern(relative: str) -> str:
    """``agents.{relative}`` for a pattern given relative to ``agents.`` as in the spec."""
    return pattern(f"{AGENTS}.{pattern(relative, 'pattern')}", "pattern")


def system_event(event_type: str) -> str:
    """``system.events.{event_type}``"""
    return f"{SYSTEM_EVENTS}.{token(event_type, 'event_type')}"


def orchestrator_task(session_id: str, sub_prd_id: str) -> str:
    """``orchestrator.tasks.{session_id}.{sub_prd_id}``"""
    return f"{ORCHESTRATOR_TASKS}.{token(session_id, 'session_id')}.{token(sub_prd_id, 'sub_prd_id')}"


def orchestrator_result(session_id: str, sub_prd_id: str) -> str:
    """``orchestrator.results.{session_id}.{sub_prd_id}``"""
    return f"{ORCHESTRATOR_RESULTS}.{token(session_id, 'session_id')}.{token(sub_prd_id, 'sub_prd_id')}"


def orchestrator_results(session_id: str) -> str:
    """``orchestrator.results.{session_id}.>``"""
    return f"{ORCHESTRATOR_RESULTS}.{token(session_id, 'session_id')}.>"


def trade(symbol: str) -> str:
    """``trades.{symbol}``"""
    return f"{TRADES}.{token(symbol, 'symbol')}"

"""Hypothesis strategies for the untrusted party: subjects, headers, ids, and bodies.

Bodies stay well under the server's ``max_payload`` (1 MiB) with their headers: an
over-size message with headers is issue 10's finding 2, reproduced on its own in
``test_regressions.py``.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.service import CORE_AGENT, DURABLE_AGENT, SESSION
from tests.fuzz.traffic import AttackMsg, Via

VIAS: tuple[Via, ...] = ("core", "js")

# -- text ------------------------------------------------------------------------------

NASTY_IDS = (
    "",
    " ",
    "*",
    ">",
    "a.b",
    "a b",
    "a\tb",
    "a\r\nb",
    "\x00",
    "\x1b[31m",
    "\u202e",
    "\u00a0",
    "\u2028",
    "é",
    "🙂",
    "x" * 257,
    "$JS.API.STREAM.PURGE.ORCHESTRATOR_TASKS",
    "$JS.API.STREAM.DELETE.A2A_TASKS",
    "$KV.A2A_AGENTS.fz",
    "trades.BTCUSDT",
    "ws.broadcast",
    "orchestrator.tasks.fuzz-s.injected",
    "agents.fz.tasks.injected",
    "system.events.injected",
    "_INBOX.attacker",
    "_INBOX.>",
    "fuzz-s",
    "../../etc",
)
# Where a naive responder could be made to publish: each must stay untouched.
NASTY_TARGETS = (
    "$JS.API.STREAM.PURGE.ORCHESTRATOR_TASKS",
    "$JS.API.STREAM.PURGE.A2A_TASKS",
    "$JS.API.STREAM.DELETE.TRADE_EVENTS",
    "$JS.API.CONSUMER.DELETE.ORCHESTRATOR_TASKS.orchestrator-workers",
    "$KV.A2A_AGENTS.fz",
    "trades.BTCUSDT",
    "ws.broadcast",
    "orchestrator.tasks.fuzz-s.injected",
    "orchestrator.results.fuzz-s.injected",
    f"agents.{CORE_AGENT}.tasks.injected",
    "system.events.injected",
    "a b",
    "*",
    ">",
    "agents.>",
    "\x00",
    "é.🙂",
)

any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
weird_text = st.one_of(st.sampled_from(NASTY_IDS), any_text)


def _repeat(chars: str, lo: int, hi: int) -> st.SearchStrategy[str]:
    """One character of ``chars`` repeated ``lo`` to ``hi`` times (cheap to draw, however long)."""
    return st.builds(lambda c, n: c * n, st.sampled_from(chars), st.integers(lo, hi))


huge_text = st.one_of(_repeat('xé🙂\x00\\"\u202e', 1_000, 60_000), _repeat("y", 100_000, 300_000))

# A subject token as nats-py lets it through on publish: no whitespace nats-py checks
# (space, tab, CR, LF), no dot; wildcards, control characters and non-ASCII are fine.
_TOKEN_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters=" \t\r\n.")
token = st.one_of(
    st.sampled_from(
        [
            "x",
            "*",
            ">",
            "$JS",
            "_INBOX",
            "fuzz-s",
            "ORCHESTRATOR_TASKS",
            "é",
            "🙂",
            "\x00",
            "\x1f",
            "\u00a0",
            "\u2028",
            "-",
            "%",
            "z" * 257,
        ]
    ),
    st.text(_TOKEN_CHARS, min_size=1, max_size=16),
)

# -- JSON values -----------------------------------------------------------------------

json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63),
    st.floats(allow_nan=True, allow_infinity=True),
    weird_text,
)
json_value: st.SearchStrategy[Any] = st.recursive(
    json_scalar,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(weird_text, children, max_size=4)),
    max_leaves=10,
)
big_or_junk = st.one_of(json_value, huge_text)


@st.composite
def encode(draw: st.DrawFn, obj: Any) -> bytes:
    """JSON text of ``obj`` in one of several encodings (some not valid UTF-8, some with NaN)."""
    ascii_only = draw(st.booleans())
    text = json.dumps(obj, ensure_ascii=ascii_only, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def _object(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with any subset of ``fields`` plus junk keys."""
    return st.builds(
        lambda picked, extra: {**extra, **picked},
        st.fixed_dictionaries({}, optional=fields),
        st.dictionaries(weird_text, json_value, max_size=3),
    )


# Objects nested past orjson's encoder limit (255: a malformed task's dead letter falls back
# to text, finding C), past msgspec's recursion limit (~1,000: finding B) and past orjson's
# parser limit (1,024: plain "not JSON"); arrays likewise.
_NESTING = (10, 300, 600, 1_000, 5_000)
_ARRAY_NESTING = (10, 300, 600, 1_000, 5_000, 100_000)
raw_junk = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"null", b"[]", b"{}", b'"x"', b"1e999", b"NaN", b"{", b"\xff\xfe", b'{"id": }']),
    st.builds(lambda n: b"[" * n + b"]" * n, st.sampled_from(_ARRAY_NESTING)),
    st.builds(lambda n: b'{"a":' * n + b"1" + b"}" * n, st.sampled_from(_NESTING)),
)


def reply_targets(reply_to_checked: bool) -> st.SearchStrategy[Any]:
    """Values for an envelope's ``reply_to``/``replyTo``.

    While the bus publishes replies wherever ``reply_to`` says (issue 10, finding 1),
    only values the current code handles safely are drawn: empty, not a string, or a
    subject under ``_INBOX.``. Once it refuses foreign subjects, every value is drawn.
    """
    safe = st.one_of(
        st.sampled_from(["", "_INBOX.attacker", "_INBOX.attacker.reply"]),
        st.builds(lambda t: f"_INBOX.{t}", st.text(_TOKEN_CHARS, min_size=1, max_size=12)),
        st.integers(),
        st.lists(st.integers(), max_size=2),
        st.dictionaries(any_text, st.integers(), max_size=2),
    )
    if not reply_to_checked:
        return safe
    return st.one_of(safe, st.sampled_from(NASTY_TARGETS), weird_text)


def envelope_bodies(reply_to_checked: bool) -> st.SearchStrategy[bytes]:
    """A2A envelopes: right and wrong types, aliases, missing and extra fields, huge values."""
    ids = st.one_of(weird_text, json_value)
    reply = reply_targets(reply_to_checked)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "id": ids,
        "kind": st.one_of(st.sampled_from(["task", "event", "system", "heartbeat", "reply", "x"]), json_value),
        "agent_id": ids,
        "agentId": ids,
        "type": ids,
        "timestamp": st.one_of(st.integers(), json_value),
        "data": big_or_junk,
        "payload": big_or_junk,
        "task_id": ids,
        "taskId": ids,
        "correlation_id": ids,
        "correlationId": ids,
        "reply_to": reply,
        "replyTo": reply,
        "metadata": st.one_of(st.dictionaries(weird_text, json_value, max_size=3), json_value),
    }
    return st.one_of(_object(fields).flatmap(encode), raw_junk, json_value.flatmap(encode))


def task_bodies(session: st.SearchStrategy[str], sub: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Work-queue tasks, camelCase or snake_case, with ids drawn from ``session``/``sub`` (those
    of the subject), other valid ids, or junk."""
    sid = st.one_of(session, st.just(SESSION), task_token, weird_text, json_value)
    pid = st.one_of(sub, task_token, weird_text, json_value)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "sessionId": sid,
        "session_id": sid,
        "subPrdId": pid,
        "sub_prd_id": pid,
        "specialist": st.one_of(st.none(), weird_text, json_value),
        "payload": big_or_junk,
        "createdAt": st.one_of(st.integers(), json_value),
        "created_at": json_value,
    }
    return st.one_of(_object(fields).flatmap(encode), raw_junk)


def result_bodies(session: st.SearchStrategy[str], sub: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    sid = st.one_of(session, st.just(SESSION), task_token, weird_text, json_value)
    pid = st.one_of(sub, task_token, weird_text, json_value)
    fields: dict[str, st.SearchStrategy[Any]] = {
        "sessionId": sid,
        "session_id": sid,
        "subPrdId": pid,
        "sub_prd_id": pid,
        "success": st.one_of(st.booleans(), json_value),
        "result": big_or_junk,
        "error": json_value,
        "completedAt": st.one_of(st.integers(), json_value),
    }
    return st.one_of(_object(fields).flatmap(encode), raw_junk)


# -- headers and publishing --------------------------------------------------------------

_header_value = weird_text.map(lambda s: s.replace("\r", "").replace("\n", ""))
# Headers the server or the package reads, each with values that mean something to it.
_CONTROL_HEADERS: dict[str, st.SearchStrategy[str]] = {
    "Nats-Msg-Id": st.one_of(st.sampled_from(["fuzz-s.x", "result.seq1", "dlq.seq1", "x"]), _header_value),
    "Nats-Expected-Stream": st.sampled_from(["A2A_TASKS", "ORCHESTRATOR_TASKS", "TRADE_EVENTS", "nope"]),
    "Nats-Expected-Last-Sequence": st.sampled_from(["0", "1", "-1", "18446744073709551616", "x"]),
    "Nats-Expected-Last-Msg-Id": _header_value,
    "Nats-Expected-Last-Subject-Sequence": st.sampled_from(["0", "1", "x"]),
    "Nats-Rollup": st.sampled_from(["all", "sub", "x"]),
    "Nats-TTL": st.sampled_from(["1s", "never", "x"]),
    "Lc-Specialist": _header_value,
    "Lc-Task-Id": _header_value,
    "Status": st.sampled_from(["100", "404", "408", "409", "503", "200", "x"]),
    "Description": st.sampled_from(["Consumer Deleted", "Consumer is push based", "Exceeded MaxWaiting", "x"]),
    "Nats-Pending-Messages": st.sampled_from(["0", "1", "1000000", "-5", "x"]),
    "Nats-Consumer-Stalled": st.sampled_from(["$JS.FC.x", "$JS.API.STREAM.PURGE.A2A_TASKS", "trades.BTCUSDT"]),
}
headers = st.one_of(
    st.none(),
    st.builds(
        lambda control, other: {**other, **control},
        st.lists(st.sampled_from(sorted(_CONTROL_HEADERS)), max_size=2, unique=True).flatmap(
            lambda keys: st.fixed_dictionaries({k: _CONTROL_HEADERS[k] for k in keys})
        ),
        st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True), _header_value, max_size=2),
    ),
)
# The NATS reply subject of a core publish. Every subject the attacker uses is captured by
# a stream, and JetStream itself answers a core publish with its PubAck on the reply
# subject: a reply of "trades.BTCUSDT" stores {"stream":...,"seq":...} as a trade. That is
# the server's doing, not the service's (test_regressions.py shows it), so replies here
# are the attacker's own inboxes.
nats_reply = st.one_of(st.none(), st.integers(0, 9).map(lambda i: f"_INBOX.attacker.{i}"))


@st.composite
def attack(draw: st.DrawFn, subject: st.SearchStrategy[str], body: st.SearchStrategy[bytes]) -> AttackMsg:
    via = draw(st.sampled_from(VIAS))
    return AttackMsg(
        subject=draw(subject),
        body=draw(body),
        headers=draw(headers),
        via=via,
        reply=draw(nats_reply) if via == "core" else None,
    )


def dotted(*parts: st.SearchStrategy[str] | str) -> st.SearchStrategy[str]:
    return st.tuples(*(st.just(p) if isinstance(p, str) else p for p in parts)).map(".".join)


def a2a_subjects() -> st.SearchStrategy[str]:
    return st.one_of(
        dotted("agents", CORE_AGENT, "tasks", token),
        dotted("agents", DURABLE_AGENT, "tasks", token),
        dotted("agents", DURABLE_AGENT, "tasks", token, token),
        dotted("agents", token, "events", token),
        dotted("agents", token, "tasks", token),
        dotted("agents", token, "heartbeat"),
        dotted("system", "events", token),
        dotted("system", token),
        st.lists(token, min_size=1, max_size=4).map(lambda ts: ".".join(["agents", *ts])),
    )


def a2a_batches(reply_to_checked: bool) -> st.SearchStrategy[list[AttackMsg]]:
    return st.lists(attack(a2a_subjects(), envelope_bodies(reply_to_checked)), min_size=1, max_size=6)


# Task and result subjects draw any token nats-py publishes, including those the package
# refuses as ids (whitespace, wildcards, over 256 characters): their dead letters go to a
# subject with the token hashed (finding C, fixed).
task_token = token


def work_queue_subjects(session: st.SearchStrategy[str], sub: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        dotted("orchestrator", "tasks", session, sub),
        dotted("orchestrator", "tasks", task_token),
        dotted("orchestrator", "tasks", session, sub, task_token),
        dotted("orchestrator", "results", SESSION, sub),
        dotted("orchestrator", "results", session, sub),
        dotted("orchestrator", "results", token),
    )


@st.composite
def work_queue_message(draw: st.DrawFn) -> AttackMsg:
    """A task or result on ``orchestrator.>`` whose body's ids match its subject, or not."""
    session = draw(st.one_of(st.just(SESSION), task_token))
    sub = draw(task_token)
    subject = draw(work_queue_subjects(st.just(session), st.just(sub)))
    if subject.startswith("orchestrator.tasks."):
        body = task_bodies(st.just(session), st.just(sub))
    else:
        body = result_bodies(st.just(session), st.just(sub))
    return draw(attack(st.just(subject), body))


def work_queue_batches() -> st.SearchStrategy[list[AttackMsg]]:
    return st.lists(work_queue_message(), min_size=1, max_size=5)


# -- trades ------------------------------------------------------------------------------

# Headers that change nothing about storing: every trade published is stored exactly once
# (de-duplication ids and expectations would make that depend on earlier examples).
plain_headers = st.one_of(
    st.none(),
    st.dictionaries(
        st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True).filter(
            lambda k: not k.lower().startswith("nats") and k.lower() not in ("status", "description")
        ),
        _header_value,
        max_size=3,
    ),
)
trade_bodies = st.one_of(
    json_value.flatmap(encode),
    _object({"price": json_value, "qty": json_value, "symbol": weird_text, "side": weird_text}).flatmap(encode),
    huge_text.map(lambda t: json.dumps(t).encode()),
    raw_junk,
)


@st.composite
def trade_message(draw: st.DrawFn) -> AttackMsg:
    subject = draw(st.one_of(st.just("trades.BTCUSDT"), dotted("trades", token), st.just("ws.broadcast")))
    via = draw(st.sampled_from(VIAS))
    reply = draw(nats_reply) if via == "core" else None
    return AttackMsg(subject=subject, body=draw(trade_bodies), headers=draw(plain_headers), via=via, reply=reply)


def trade_batches() -> st.SearchStrategy[list[AttackMsg]]:
    return st.lists(trade_message(), min_size=1, max_size=5)


# -- the service's private inboxes -------------------------------------------------------


def inbox_batches(inboxes: list[str]) -> st.SearchStrategy[list[AttackMsg]]:
    """Messages on the pull consumers' inboxes (anyone subscribed to ``$JS.API.>`` sees them
    as the reply subject of the pull requests): forged deliveries and status messages."""
    body = st.one_of(st.just(b""), envelope_bodies(False), task_bodies(st.just(SESSION), task_token), raw_junk)
    message = st.builds(
        lambda subject, data, hdrs, reply: AttackMsg(subject=subject, body=data, headers=hdrs, reply=reply),
        st.sampled_from(inboxes),
        body,
        headers,
        nats_reply,
    )
    return st.lists(message, min_size=1, max_size=5)

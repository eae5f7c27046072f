"""What the attacker sends, what the spy sees, and which subjects the service may publish on.

The spy is a raw nats-py connection subscribed to ``>``: it sees every message any
connection of the account publishes, the service's included. After each example every
message it saw is classified (``classify``): it was published by the attacker (counted
per subject: one message per attacker publish), it is the fuzz harness's own barrier,
or it is the service's legitimate traffic as defined by ``SERVICE_TRAFFIC`` and the
per-example rules for results and dead letters. Anything else is a violation.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from liquidcrypto.workqueue.dead_letters import dlq_subject_for, result_dlq_subject_for

Via = Literal["core", "js"]


@dataclass(frozen=True)
class AttackMsg:
    """One message of the untrusted party.

    Attributes:
        subject: where it is published (a valid nats-py publish subject).
        body: the raw body.
        headers: NATS headers (keys nats-py accepts), or None.
        via: ``core`` (``nc.publish``) or ``js`` (``js.publish``, waits for the stream's answer).
        reply: the NATS reply subject of a core publish (what a naive responder answers to).
    """

    subject: str
    body: bytes
    headers: dict[str, str] | None = None
    via: Via = "core"
    reply: str | None = None

    def __repr__(self) -> str:  # hypothesis prints falsifying examples with it: keep big bodies short
        body = self.body if len(self.body) <= 200 else self.body[:120] + b"...<%d bytes>" % len(self.body)
        return (
            f"AttackMsg(subject={self.subject!r}, body={body!r}, headers={self.headers!r}, "
            f"via={self.via!r}, reply={self.reply!r})"
        )


@dataclass(frozen=True)
class Seen:
    """One message the spy received."""

    subject: str
    reply: str
    size: int


BARRIER_PREFIX = "fuzz.barrier."
# JetStream delivers a stored message to a consumer's inbox under its original subject,
# with an ack subject as reply: the spy sees every delivery as a message on that subject.
DELIVERY_REPLY = "$JS.ACK."

# The service's own traffic, whatever the attacker did. Each line is a reason.
SERVICE_TRAFFIC: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (why, re.compile(rx))
    for why, rx in (
        # Inboxes: JetStream API answers, pub acks, pull-request deliveries, request_agent
        # replies. An attacker's reply_to under _INBOX. is the one place replies may go.
        ("inbox", r"^_INBOX\."),
        # Read-only JetStream API calls and the consumers the service creates and reads.
        ("js-read", r"^\$JS\.API\.(INFO|STREAM\.(INFO|NAMES|LIST)(\.|$)|STREAM\.MSG\.GET\.|DIRECT\.GET\.)"),
        ("js-consumer", r"^\$JS\.API\.CONSUMER\.(INFO|NAMES|LIST|CREATE|DURABLE\.CREATE|MSG\.NEXT)\."),
        # The result readers delete their own ephemeral consumers (results-<16 hex>).
        ("results-consumer-delete", r"^\$JS\.API\.CONSUMER\.DELETE\.ORCHESTRATOR_TASKS\.results-[0-9a-f]{16}$"),
        # The trade feed's push consumer is deleted and re-created by the manager.
        ("feed-consumer-delete", r"^\$JS\.API\.CONSUMER\.DELETE\.TRADE_EVENTS\.[A-Za-z0-9]+$"),
        # Acks, naks, in-progress and terms of messages the service consumes.
        ("ack", r"^\$JS\.ACK\.(A2A_TASKS|ORCHESTRATOR_TASKS|TRADE_EVENTS|KV_[A-Z0-9_]+)\."),
        ("flow-control", r"^\$JS\.FC\."),
        # The server's own advisories (API audit, consumer events).
        ("advisory", r"^\$JS\.EVENT\.(ADVISORY|METRIC)\."),
        # The worker's attempt counts (failures and redeliveries only).
        ("attempts-kv", r"^\$KV\.ORCHESTRATOR_ATTEMPTS\."),
        # The durable subscription's "handled" marks: its own name and a stream sequence.
        ("handled-kv", r"^\$KV\.A2A_HANDLED\.fuzz-durable\.\d+$"),
    )
)

# Never legitimate during an example, whatever the attacker sent (tests/fuzz/test_traffic.py
# checks that ``classify`` reports each of them).
FORBIDDEN_EXAMPLES = (
    "$JS.API.STREAM.PURGE.ORCHESTRATOR_TASKS",
    "$JS.API.STREAM.DELETE.A2A_TASKS",
    "$JS.API.STREAM.MSG.DELETE.TRADE_EVENTS",
    "$JS.API.STREAM.UPDATE.A2A_TASKS",
    "$JS.API.CONSUMER.DELETE.A2A_TASKS.fuzz-durable",
    "$JS.API.CONSUMER.DELETE.ORCHESTRATOR_TASKS.orchestrator-workers",
    "$KV.A2A_AGENTS.fz",
    "trades.BTCUSDT",
    "ws.broadcast",
    "agents.fz.tasks.x",
    "system.events.x",
    "orchestrator.tasks.fuzz-s.x",
)


@dataclass
class Expectations:
    """What the service may publish beyond ``SERVICE_TRAFFIC`` during one example.

    Attributes:
        attacker: attacker (and sentinel) messages per subject, each seen once.
        task_subjects: every ``orchestrator.tasks.*`` subject the attacker or a sentinel
            used so far (a result or dead letter of any of them may come now).
    """

    attacker: Counter[str] = field(default_factory=Counter)
    task_subjects: set[str] = field(default_factory=set)


TASKS_PREFIX = "orchestrator.tasks."
RESULTS_PREFIX = "orchestrator.results."
DLQ_PREFIX = "orchestrator.dlq."
DLQ_RESULTS_PREFIX = "orchestrator.dlq.results."


def classify(seen: Iterable[Seen], expect: Expectations) -> list[str]:
    """The violations among ``seen`` (empty when every message is accounted for).

    A result ``orchestrator.results.S.P`` is the worker's when a task was published on
    ``orchestrator.tasks.S.P``; a dead letter ``orchestrator.dlq.T`` when a task was
    published on ``orchestrator.tasks.T``; a result dead letter ``orchestrator.dlq.results.S.P``
    when the attacker published a result on ``orchestrator.results.S.P`` (tokens the package
    refuses hashed in the dead letter's subject, as ``dead_letters.dlq_subject_for`` documents).
    Per subject, the attacker's own messages are matched first.
    """
    left = Counter(expect.attacker)
    out: list[str] = []
    for msg in seen:
        s = msg.subject
        if msg.reply.startswith(DELIVERY_REPLY):
            continue  # the server delivering a stored message to a consumer, not a publish
        if left[s] > 0:
            left[s] -= 1
            continue
        if s.startswith(BARRIER_PREFIX):
            continue
        if any(rx.match(s) for _, rx in SERVICE_TRAFFIC):
            continue
        if s.startswith(RESULTS_PREFIX) and TASKS_PREFIX + s[len(RESULTS_PREFIX) :] in expect.task_subjects:
            continue
        if s.startswith(DLQ_PREFIX) and s in {dlq_subject_for(t) for t in expect.task_subjects}:
            continue
        if s.startswith(DLQ_RESULTS_PREFIX) and s in {
            result_dlq_subject_for(r) for r in expect.attacker if r.startswith(RESULTS_PREFIX)
        }:
            continue  # an unreadable result the attacker published, dead-lettered by the result reader
        out.append(f"unexpected publish on {s!r} ({msg.size} bytes, reply {msg.reply!r})")
    return out

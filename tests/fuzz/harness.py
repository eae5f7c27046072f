"""The fuzz harness: a real nats-server, the service, a spy and an attacker; one example at a time.

``Harness.example(msgs)`` publishes the attacker's messages, then one sentinel per
consumer of the service on the same connection, waits until every consumer has handled
its sentinel (so it handled everything before it), puts a barrier through the spy, and
returns the violations of the properties:

1. no unexpected exception: nothing reached the loop's exception handler, and no
   ERROR record or traceback was logged by ``liquidcrypto.*`` or ``nats.*``
   (``loop.LogCapture`` says exactly what counts);
2. no message on a subject outside the expected ones (``traffic.classify``);
3. streams change only as expected: nothing is deleted or purged (a canary message in
   each stream stays; ``A2A_TASKS`` has no holes), ``A2A_TASKS`` grows by at most what
   was published on ``agents.>``/``system.>``, the durable consumer acknowledges (or
   terminates) everything it is given, every task on ``orchestrator.tasks.>`` and every
   result of the watched session is consumed, other results and dead letters grow by at
   most one per attacker message, ``TRADE_EVENTS`` grows by exactly what the attacker
   published on ``trades.>``/``ws.broadcast`` (in ``trade_mode``; nothing otherwise);
4. the service stays healthy: the client is connected, never reconnected, dropped
   nothing as a slow consumer, every consumer still runs and handled its sentinel.

``healthy_end_to_end()`` checks, once per test, ``client.health()`` and one legitimate
request/task/event/trade through every path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from liquidcrypto import codec
from liquidcrypto.config import Settings
from liquidcrypto.errors import InvalidPayloadError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.embedded import NatsServer
from tests.fuzz.loop import LogCapture, LoopThread
from tests.fuzz.service import CHANNELS, CORE_AGENT, DURABLE, DURABLE_AGENT, SESSION, SYMBOL, Service
from tests.fuzz.traffic import (
    BARRIER_PREFIX,
    RESULTS_PREFIX,
    TASKS_PREFIX,
    AttackMsg,
    Expectations,
    Seen,
    classify,
)

DEBUG = os.environ.get("FUZZ_DEBUG") == "1"
"""FUZZ_DEBUG=1: a failing example also lists what the spy saw (API and inbox traffic aside)."""
SETTLE_TIMEOUT = 10.0
"""Seconds every consumer has to handle its sentinel."""
DRAIN_TIMEOUT = 3.0
"""Seconds the work-queue stream has to drop acknowledged tasks and results."""
CANARY_RESULT = "orchestrator.results.fuzz-canary.keep"
CANARY_EVENT = "agents.fuzz-canary.events.keep"
CANARY_TRADE = f"trades.{SYMBOL}"
PROBE_REPLY_TO = "fuzz.probe.reply"


@dataclass(frozen=True)
class StreamCounts:
    a2a_first: int
    a2a_last: int
    a2a_messages: int
    tasks: int
    watched_results: int
    other_results: int
    canary_results: int
    trades: int
    dlq: int


def envelope(kind: str, agent: str, type_: str, id_: str) -> bytes:
    return orjson.dumps({"id": id_, "kind": kind, "agent_id": agent, "type": type_, "timestamp": 1})


class Harness:
    """One nats-server, one service, one spy, one attacker (see the module docstring)."""

    def __init__(self, server: NatsServer, loop: LoopThread, logs: LogCapture, *, trade_mode: bool = False) -> None:
        """
        Args:
            trade_mode: the attacker publishes on ``trades.>`` and ``ws.broadcast`` too:
                every stored trade of ``BTCUSDT`` must reach the trade handler once, in
                order, decoded (or be skipped as not JSON), and ``TRADE_EVENTS`` grows by
                exactly what was published there.
        """
        self.server = server
        self.loop = loop
        self.logs = logs
        self.trade_mode = trade_mode
        self.channels = (*CHANNELS, "trades") if trade_mode else CHANNELS
        self.client_errors: list[str] = []

        # nats-py hands exceptions raised in a subscription callback to error_cb, which the
        # client only logs at debug level: record them (a caller's error_cb runs after the
        # client's own; connection-level errors show in health).
        async def record_error(exc: Exception) -> None:
            if not isinstance(exc, nats.errors.SlowConsumerError):
                self.client_errors.append(f"{type(exc).__name__}: {exc}"[:300])

        self.client = NatsClient(server.url, settings=Settings(), error_cb=record_error)
        self.service = Service(self.client, expect_trades=trade_mode)
        self.seen: list[Seen] = []
        self.task_subjects: set[str] = set()
        self.counter = itertools.count(1)
        self.nonce = uuid.uuid4().hex[:12]
        self.reply_to_checked = False
        self.attacker_events: list[str] = []
        self._reconnects = 0
        self._spy: Nats | None = None
        self._atk: Nats | None = None

    # -- set-up and tear-down ------------------------------------------------------

    @property
    def spy(self) -> Nats:
        assert self._spy is not None
        return self._spy

    @property
    def atk(self) -> Nats:
        assert self._atk is not None
        return self._atk

    @property
    def spy_js(self) -> JetStreamContext:
        return self.spy.jetstream(timeout=5)

    async def start(self) -> None:
        await self.client.connect(wait=15)
        self._spy = await nats.connect(self.server.url, name="fuzz-spy", max_reconnect_attempts=-1)

        async def record(msg: Msg) -> None:
            self.seen.append(Seen(msg.subject, msg.reply, len(msg.data)))

        # Canaries, stored before anything consumes: they must survive every example.
        js = self.spy_js
        await js.publish(CANARY_EVENT, envelope("event", "fuzz-canary", "keep", "canary"))
        await js.publish(CANARY_RESULT, b'{"sessionId":"fuzz-canary","subPrdId":"keep","success":true}')
        await js.publish(CANARY_TRADE, b'{"canary":true}')
        await self.service.start()
        await self.spy.subscribe(">", cb=record, pending_msgs_limit=-1, pending_bytes_limit=-1)
        await self.spy.flush()
        self._atk = await nats.connect(
            self.server.url,
            name="fuzz-attacker",
            max_reconnect_attempts=-1,
            error_cb=self._attacker_error,
            disconnected_cb=self._attacker_disconnected,
            reconnected_cb=self._attacker_reconnected,
        )
        self._reconnects = self.client.reconnects
        self.reply_to_checked = await self._probe_reply_to()

    async def pull_inboxes(self) -> list[str]:
        """The inboxes of the service's pull consumers, as anyone reading ``$JS.API.>`` learns
        them (the reply subject of their pull requests); at least the worker's, the durable's
        and the results reader's."""
        found: dict[str, str] = {}
        deadline = time.monotonic() + 10
        while len(found) < 3 and time.monotonic() < deadline:
            for s in self.seen:
                if s.subject.startswith("$JS.API.CONSUMER.MSG.NEXT.") and s.reply:
                    found[s.subject] = s.reply
            await asyncio.sleep(0.05)
        assert len(found) >= 3, f"pull requests seen: {found}"
        return sorted(set(found.values()))

    async def _attacker_error(self, exc: Exception) -> None:
        self.attacker_events.append(f"error {exc!r}")

    async def _attacker_disconnected(self) -> None:
        self.attacker_events.append("disconnected")

    async def _attacker_reconnected(self) -> None:
        self.attacker_events.append("reconnected")

    async def _probe_reply_to(self) -> bool:
        """Whether the bus refuses a ``reply_to`` outside its inboxes (issue 10, finding 1).

        While it does not, the strategies draw only ``reply_to`` values the current code
        handles safely (absent, empty, not a string, or under ``_INBOX.``) and say so.
        """
        mark, logs = len(self.seen), self.logs.mark()
        n = next(self.counter)
        body = orjson.dumps({"id": f"probe-{self.nonce}", "reply_to": PROBE_REPLY_TO})
        await self.atk.publish(f"agents.{CORE_AGENT}.tasks.probe", body)
        sentinel = self.sentinels(n)[0]
        await self.atk.publish(sentinel.subject, sentinel.body)
        problems = await self._settle(n, ["core"])
        assert not problems, problems
        replied = any(s.subject == PROBE_REPLY_TO for s in self.seen[mark:])
        del self.logs.entries[logs:]  # the refusal may be logged; that is the fix working
        return not replied

    async def close(self) -> None:
        for conn in (self._atk, self._spy):
            if conn is not None and not conn.is_closed:
                await conn.close()
        await self.service.close()
        await self.client.close()

    # -- one example -------------------------------------------------------------------

    async def example(self, msgs: Sequence[AttackMsg]) -> list[str]:
        """Publish ``msgs`` as the attacker, settle, and return the violations (empty: all held)."""
        n = next(self.counter)
        spy_mark, log_mark, loop_mark = len(self.seen), self.logs.mark(), len(self.loop.errors)
        trades_mark = len(self.service.trades)
        atk_mark, err_mark = len(self.attacker_events), len(self.client_errors)
        before = await self.counts()
        expect = Expectations()
        sent: list[AttackMsg] = []
        for msg in msgs:
            if await self.send(msg):
                sent.append(msg)
                expect.attacker[msg.subject] += 1
                if msg.subject.startswith(TASKS_PREFIX):
                    self.task_subjects.add(msg.subject)
        for msg in self.sentinels(n):
            assert await self.send(msg), f"sentinel {msg!r} not sent"
            expect.attacker[msg.subject] += 1
            if msg.subject.startswith(TASKS_PREFIX):
                self.task_subjects.add(msg.subject)
        expect.task_subjects = self.task_subjects
        problems = await self._settle(n, self.channels)
        if self.trade_mode:
            problems += self.trade_problems(sent, self.service.trades[trades_mark:], n)
        problems += classify(self.seen[spy_mark:], expect)
        if problems and DEBUG:
            problems += [
                f"(debug) the spy saw {x!r}"[:200]
                for x in self.seen[spy_mark:]
                if not x.subject.startswith(("$JS.API.", "$JS.EVENT.", "_INBOX."))
            ]
        problems += await self.stream_problems(before, sent)
        problems += self.health_problems()
        problems += [f"(harness) attacker connection: {e}" for e in self.attacker_events[atk_mark:]]
        problems += [f"nats-py error callback: {e}" for e in self.client_errors[err_mark:]]
        gc.collect()  # "Task exception was never retrieved" is reported when the task is collected
        problems += [f"logged: {e}" for e in self.logs.since(log_mark)]
        problems += [
            f"loop exception handler: {c.get('message')} {c.get('exception')!r}" for c in self.loop.errors[loop_mark:]
        ]
        return problems

    def sentinels(self, n: int) -> list[AttackMsg]:
        """Well-formed messages, one per consumer, published after the attacker's."""
        sid = f"sentinel-{self.nonce}-{n}"
        return [
            AttackMsg(f"agents.{CORE_AGENT}.tasks.sentinel", envelope("task", CORE_AGENT, "sentinel", sid)),
            AttackMsg(f"agents.{DURABLE_AGENT}.tasks.sentinel", envelope("task", DURABLE_AGENT, "sentinel", sid)),
            AttackMsg(f"agents.{CORE_AGENT}.events.sentinel", envelope("event", CORE_AGENT, "sentinel", sid)),
            AttackMsg("system.events.sentinel", envelope("system", "system", "sentinel", sid)),
            AttackMsg(
                f"{TASKS_PREFIX}{SESSION}.{sid}",
                orjson.dumps({"sessionId": SESSION, "subPrdId": sid, "payload": None, "createdAt": 1}),
                headers={"Nats-Msg-Id": f"fuzz.{sid}"},
            ),
            *([AttackMsg(CANARY_TRADE, orjson.dumps({"sentinel": sid}))] if self.trade_mode else []),
        ]

    def trade_problems(self, sent: Sequence[AttackMsg], got: list[Any], n: int) -> list[str]:
        """Each stored trade of the symbol reached the handler once, in order, decoded."""
        want: list[Any] = []
        for msg in sent:
            if msg.subject == CANARY_TRADE:
                with contextlib.suppress(InvalidPayloadError):
                    want.append(codec.decode(msg.body))
        want.append({"sentinel": f"sentinel-{self.nonce}-{n}"})
        if got != want:
            return [f"the trade handler got {len(got)} trade(s), not the {len(want)} stored: {got!r:.300}"]
        return []

    async def send(self, msg: AttackMsg) -> bool:
        """Publish as the attacker; whether it went out (nats-py refuses some locally)."""
        try:
            if msg.via == "core":
                await self.atk.publish(msg.subject, msg.body, reply=msg.reply or "", headers=msg.headers)
            else:
                await self.atk.jetstream(timeout=2).publish(msg.subject, msg.body, headers=msg.headers)
        except (nats.errors.BadSubjectError, nats.errors.BadHeaderError, nats.errors.MaxPayloadError):
            return False
        except (nats.js.errors.Error, nats.errors.Error, TimeoutError):
            return True  # sent; the stream refused it, or no stream took it
        return True

    async def _settle(self, n: int, channels: Sequence[str]) -> list[str]:
        """Wait until each channel handled sentinel ``n``, then put a barrier through the spy."""
        sid = f"sentinel-{self.nonce}-{n}"
        await self.atk.flush(5)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        missing = list(channels)
        problems: list[str] = []
        while missing and time.monotonic() < deadline:
            missing = [c for c in channels if sid not in self.service.seen[c]]
            if missing and self.client.reconnects != self._reconnects:
                # Core messages sent meanwhile are lost: report it, do not wait for them.
                problems.append(f"the client lost its connection ({self.client.last_error})")
                with contextlib.suppress(Exception):
                    await self.client.wait_connected(10)
                break
            if missing:
                await asyncio.sleep(0.005)
        problems += [f"the {c} consumer did not handle a well-formed message" for c in missing]
        # Everything the service published before this is seen by the spy before the barrier.
        marks = [f"{BARRIER_PREFIX}svc.{n}", f"{BARRIER_PREFIX}atk.{n}"]
        if self.client.is_connected:
            await self.client.nc.publish(marks[0], b"")
            await self.client.flush(5)
        else:
            marks.pop(0)
        await self.atk.publish(marks[-1], b"")
        await self.atk.flush(5)
        await self.spy.flush(5)
        deadline = time.monotonic() + 5
        while not all(any(s.subject == m for s in self.seen[-200:]) for m in marks):
            if time.monotonic() > deadline:
                problems.append(f"the spy did not see the barriers {marks}")
                break
            await asyncio.sleep(0.002)
        return problems

    # -- the checks ------------------------------------------------------------------

    async def counts(self) -> StreamCounts:
        js = self.spy_js
        a2a = (await js.stream_info(streams.A2A_TASKS)).state
        ot = (await js.stream_info(streams.ORCHESTRATOR_TASKS, subjects_filter="orchestrator.>")).state
        per_subject: dict[str, int] = ot.subjects or {}
        watched = f"{RESULTS_PREFIX}{SESSION}."
        results = {s: c for s, c in per_subject.items() if s.startswith(RESULTS_PREFIX)}
        return StreamCounts(
            a2a_first=int(a2a.first_seq),
            a2a_last=int(a2a.last_seq),
            a2a_messages=int(a2a.messages),
            tasks=sum(c for s, c in per_subject.items() if s.startswith(TASKS_PREFIX)),
            watched_results=sum(c for s, c in results.items() if s.startswith(watched)),
            other_results=sum(c for s, c in results.items() if not s.startswith(watched) and s != CANARY_RESULT),
            canary_results=results.get(CANARY_RESULT, 0),
            trades=int((await js.stream_info(streams.TRADE_EVENTS)).state.messages),
            dlq=int((await js.stream_info(streams.ORCHESTRATOR_DLQ)).state.messages),
        )

    async def stream_problems(self, before: StreamCounts, sent: Sequence[AttackMsg]) -> list[str]:
        a2a_sent = sum(m.subject.startswith(("agents.", "system.")) for m in sent) + 4  # + the sentinels
        wq_sent = sum(m.subject.startswith(("orchestrator.tasks.", "orchestrator.results.")) for m in sent)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while True:
            after = await self.counts()
            durable = await self.spy_js.consumer_info(streams.A2A_TASKS, DURABLE)
            durable_left = int(durable.num_pending or 0) + int(durable.num_ack_pending or 0)
            drained = after.tasks == 0 and after.watched_results == 0 and durable_left == 0
            if drained or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        out = []
        if after.tasks or after.watched_results:
            out.append(
                f"ORCHESTRATOR_TASKS kept {after.tasks} task(s) and {after.watched_results} result(s) of "
                f"{SESSION} unconsumed after {DRAIN_TIMEOUT:g} s"
            )
        if durable_left:
            out.append(
                f"the durable consumer left {durable.num_pending} message(s) undelivered and "
                f"{durable.num_ack_pending} unacknowledged after {DRAIN_TIMEOUT:g} s"
            )
        if after.a2a_first != before.a2a_first or after.a2a_messages != after.a2a_last - after.a2a_first + 1:
            out.append(f"A2A_TASKS lost messages: {before} -> {after}")
        if not 0 <= after.a2a_last - before.a2a_last <= a2a_sent:
            out.append(f"A2A_TASKS grew by {after.a2a_last - before.a2a_last} for {a2a_sent} published")
        if after.canary_results != 1:
            out.append(f"the canary result left ORCHESTRATOR_TASKS ({after.canary_results})")
        if not 0 <= after.other_results - before.other_results <= wq_sent:
            out.append(
                f"results of other sessions went {before.other_results} -> {after.other_results} "
                f"for {wq_sent} attacker message(s) on orchestrator.>"
            )
        trades_sent = sum(m.subject.startswith("trades.") or m.subject == "ws.broadcast" for m in sent)
        trades_sent += 1 if self.trade_mode else 0  # the sentinel trade
        if after.trades != before.trades + trades_sent:
            out.append(f"TRADE_EVENTS went from {before.trades} to {after.trades} messages for {trades_sent} published")
        if not 0 <= after.dlq - before.dlq <= wq_sent:
            out.append(f"ORCHESTRATOR_DLQ went {before.dlq} -> {after.dlq} for {wq_sent} attacker message(s)")
        return out

    def health_problems(self) -> list[str]:
        c = self.client
        out = self.service.problems()
        if c.state is not ConnectionState.CONNECTED or not c.is_connected:
            out.append(f"the client is {c.state} (last error {c.last_error})")
        if c.reconnects != self._reconnects:
            out.append(f"the client reconnected ({c.reconnects - self._reconnects} time(s))")
            self._reconnects = c.reconnects
        if c.slow_consumer_events:
            out.append(f"{c.slow_consumer_events} slow-consumer event(s)")
        if self.atk.is_closed:
            out.append(f"(harness) the attacker connection was closed: {self.attacker_events[-3:]}")
        return out

    async def healthy_end_to_end(self) -> list[str]:
        """``health()`` and one legitimate message through every path, after all examples."""
        n = next(self.counter)
        log_mark, loop_mark = self.logs.mark(), len(self.loop.errors)
        out: list[str] = []
        health = await self.client.health()
        if not health["connected"] or health["jetstream"] != {"enabled": True, "streams": 3}:
            out.append(f"health() is {health}")
        svc = self.service
        answer = await svc.bus.request_agent(
            CORE_AGENT, "final", {"id": f"final-{self.nonce}", "payload": n}, timeout=5
        )
        if answer != {"echo": "final"}:
            out.append(f"request_agent answered {answer!r}")
        await svc.bus.publish_task(DURABLE_AGENT, "final", {"id": f"final-d-{self.nonce}", "payload": n})
        await svc.bus.publish_event(CORE_AGENT, "final", {"n": n}, id=f"final-e-{self.nonce}")
        await svc.bus.publish_system_event("final", {"n": n}, id=f"final-s-{self.nonce}")
        await svc.wq.enqueue_orchestrator_task({"sessionId": SESSION, "subPrdId": f"final-{self.nonce}"})
        trades_mark = len(svc.trades)
        await svc.manager.publish_trade_event(SYMBOL, {"final": n})
        await svc.manager.flush()
        want = {
            "durable": f"final-d-{self.nonce}",
            "events": f"final-e-{self.nonce}",
            "system": f"final-s-{self.nonce}",
            "work": f"final-{self.nonce}",
            "results": f"final-{self.nonce}",
        }
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if all(v in svc.seen[k] for k, v in want.items()) and svc.trades[trades_mark:]:
                break
            await asyncio.sleep(0.01)
        out += [f"{k} did not handle a legitimate message" for k, v in want.items() if v not in svc.seen[k]]
        if svc.trades[trades_mark:] != [{"final": n}]:
            out.append(f"the trade handler got {svc.trades[trades_mark:]!r}, not the one legitimate trade")
        del svc.trades[trades_mark:]
        out += self.health_problems()
        gc.collect()
        out += [f"logged: {e}" for e in self.logs.since(log_mark)]
        out += [f"loop exception handler: {c.get('message')}" for c in self.loop.errors[loop_mark:]]
        return out


def attack_summary(msgs: Sequence[AttackMsg]) -> str:
    return "\n".join(f"  {m!r}" for m in msgs)


def run_example(h: Harness, msgs: Sequence[AttackMsg]) -> None:
    """The body of every property: run one example and fail with every violation named."""
    problems = h.loop.run(h.example(msgs), timeout=45)
    assert not problems, "properties violated:\n  " + "\n  ".join(problems) + "\nby:\n" + attack_summary(msgs)

"""``A2ABus``: agent tasks, events, system events, heartbeats, request-reply, history,
task lifecycle and the agent registry, on one ``NatsClient``.

Subjects (built and validated by ``liquidcrypto.nats.subjects``)::

    agents.{agent_id}.tasks.{task_type}     publish_task / subscribe_to_tasks
    agents.{agent_id}.events.{event_type}   publish_event / subscribe_to_events
    agents.{agent_id}.heartbeat             heartbeats of registered agents
    system.events.{event_type}              publish_system_event, task_state_changed

Publishing goes through JetStream (the ``A2A_TASKS`` stream captures ``agents.>`` and
``system.>`` for one hour) and returns the stream sequence. Every envelope's id (the
caller's ``id=``, or a generated one) is sent as ``Nats-Msg-Id``, so the stream stores a
re-sent envelope once: to retry safely after an ambiguous failure, pass your own ``id=``
(or publish again with the id the error names). Non-durable
subscriptions are core NATS subscriptions (they see a message as soon as the server
does); durable ones are JetStream consumers (``liquidcrypto.a2a.durable``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from functools import lru_cache
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a import history, metrics
from liquidcrypto.a2a.durable import (
    DEFAULT_ACK_WAIT,
    DEFAULT_BATCH,
    DEFAULT_MAX_DELIVER,
    DurableSubscription,
)
from liquidcrypto.a2a.envelope import SYSTEM_AGENT, Envelope, Kind
from liquidcrypto.a2a.lifecycle import TaskRecord, TaskState, TaskStateChange, TaskStateStore
from liquidcrypto.a2a.registry import AgentCard, AgentInfo, AgentRegistry
from liquidcrypto.a2a.replies import ReplyInbox, run_handler
from liquidcrypto.errors import (
    InvalidPayloadError,
    LiquidNatsError,
    NatsUnavailableError,
    PublishOutcomeUnknownError,
    RequestTimeoutError,
)
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import streams, subjects
from liquidcrypto.nats.client import ConnectionState, NatsClient
from liquidcrypto.nats.subscription import Subscription, call_handler

log = logging.getLogger(__name__)

Handler = Callable[[Envelope], Any]
TASK_STATE_CHANGED = "task_state_changed"
_PUBLISHED = metrics.PUBLISHED_COUNTS
for _kind in Kind:
    _PUBLISHED.setdefault(_kind.value, 0)


def _cached(builder: Callable[[str, str], str]) -> Callable[[Any, Any], str]:
    """``builder`` with its valid results cached (invalid input is re-checked and raises)."""
    cached = lru_cache(maxsize=4096)(builder)

    def build(a: Any, b: Any) -> str:
        try:
            return cached(a, b)
        except TypeError:  # unhashable input: let the builder name it
            return builder(a, b)

    return build


_task_subject = _cached(subjects.agent_task)
_event_subject = _cached(subjects.agent_event)


def absolute_pattern(pattern: str) -> str:
    """``agents.{pattern}`` for the spec's relative patterns; ``agents.``/``system.`` ones as given.

    Raises:
        InvalidSubjectError: (a ``ValueError``) naming the pattern.
    """
    if isinstance(pattern, str) and pattern.startswith(("agents.", "system.")):
        return subjects.pattern(pattern)
    return subjects.agents_pattern(pattern)


class A2ABus:
    """The A2A bus on a ``NatsClient``. Use ``async with A2ABus(client) as bus:`` or ``close()``."""

    def __init__(self, client: NatsClient) -> None:
        self.client = client
        self._subscriptions: set[Subscription] = set()
        self._durables: set[DurableSubscription] = set()
        self._states: TaskStateStore | None = None
        self._registry: AgentRegistry | None = None
        self._inbox: ReplyInbox | None = None
        self._closed = False

    async def __aenter__(self) -> A2ABus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop subscriptions, durable loops and heartbeats (durable consumers stay); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._registry is not None:
            await self._registry.close()
        for durable in list(self._durables):
            await durable.stop()
        for sub in self._subscriptions:
            await sub.unsubscribe()
        if self._inbox is not None:
            await self._inbox.close()
        self._subscriptions.clear()
        self._durables.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise LiquidNatsError("the A2A bus is closed")

    # -- publishing ------------------------------------------------------------

    async def publish_task(
        self,
        agent_id: str,
        task_type: str,
        task: Any = None,
        *,
        id: str | None = None,
        ack: bool = True,
        timeout: float = 5.0,
        reply_to: str | None = None,
    ) -> int | None:
        """Send a task to ``agents.{agent_id}.tasks.{task_type}``.

        Args:
            agent_id: the receiving agent.
            task_type: the kind of task.
            task: a dict like the spec's ``{"id": "task-123", "payload": {...}}`` (``id``
                kept, ``payload``/``data`` become the envelope's data, other keys its
                metadata), a dict without ``payload`` (all of it but ``id`` is the data),
                an ``Envelope``, or any JSON value (the data).
            id: the envelope id (default: the task's ``id``, else a fresh one). It is the
                de-duplication id: publishing again with the same id within the stream's
                hour stores it once, so a retry after a failure is safe.
            ack: wait until JetStream stored it (default). ``False`` publishes on core
                NATS without waiting (the stream still stores and de-duplicates it).
            timeout: seconds to wait for the acknowledgement.
            reply_to: inbox a handler's ``reply(...)`` answers to (see ``request_agent``).

        Returns:
            the stream sequence (a re-sent task id returns the original's), or ``None``
            when ``ack=False``.

        Raises:
            InvalidSubjectError: ``agent_id`` or ``task_type`` is not a valid token.
            InvalidTaskError: the id is not valid (``envelope.check_id``), or two differ.
            InvalidPayloadError: the task is not JSON-able.
            NatsUnavailableError: it could not be stored (the message names the id to
                retry with).
        """
        subject = _task_subject(agent_id, task_type)
        given_id, data, correlation, metadata = env_mod.task_fields(task, id)
        msg_id = given_id or env_mod.new_id()
        payload = env_mod.encode(
            id=msg_id,
            kind=Kind.TASK,
            agent_id=agent_id,
            type=task_type,
            data=data,
            correlation_id=correlation,
            reply_to=reply_to,
            metadata=metadata,
        )
        return await self._publish(subject, payload, msg_id, Kind.TASK, ack, timeout, given_id is not None)

    async def publish_event(
        self,
        agent_id: str,
        event_type: str,
        data: Any = None,
        *,
        task_id: str | None = None,
        correlation_id: str | None = None,
        id: str | None = None,
        ack: bool = True,
        timeout: float = 5.0,
    ) -> int | None:
        """Publish an event of ``agent_id`` on ``agents.{agent_id}.events.{event_type}``.

        ``task_id``/``correlation_id`` link it to the task it is about. ``id`` (default: a
        fresh one) is the de-duplication id. Returns and raises as ``publish_task``.
        """
        subject = _event_subject(agent_id, event_type)
        msg_id = env_mod.new_id() if id is None else env_mod.check_id(id, "event id")
        payload = env_mod.encode(
            id=msg_id,
            kind=Kind.EVENT,
            agent_id=agent_id,
            type=event_type,
            data=data,
            task_id=task_id,
            correlation_id=correlation_id,
        )
        return await self._publish(subject, payload, msg_id, Kind.EVENT, ack, timeout, id is not None)

    async def publish_system_event(
        self,
        event_type: str,
        data: Any = None,
        *,
        task_id: str | None = None,
        id: str | None = None,
        ack: bool = True,
        timeout: float = 5.0,
    ) -> int | None:
        """Publish a system-wide event on ``system.events.{event_type}`` (``agent_id`` is
        ``"system"``). Returns and raises as ``publish_task``."""
        subject = subjects.system_event(event_type)
        msg_id = env_mod.new_id() if id is None else env_mod.check_id(id, "event id")
        payload = env_mod.encode(
            id=msg_id,
            kind=Kind.SYSTEM,
            agent_id=SYSTEM_AGENT,
            type=event_type,
            data=data,
            task_id=task_id,
        )
        return await self._publish(subject, payload, msg_id, Kind.SYSTEM, ack, timeout, id is not None)

    async def publish_task_async(
        self, agent_id: str, task_type: str, task: Any = None, *, id: str | None = None, stall: float = 5.0
    ) -> asyncio.Future[PubAck]:
        """Send a task without waiting: returns a future of JetStream's acknowledgement.

        Many publishes then share the round trips (nats-py ``publish_async``; at most 4,000
        pending, ``stall`` seconds of waiting for a slot). A failed acknowledgement nobody
        awaits is logged and counted. ``wait_acks()`` waits for all of them. ``id`` is
        the de-duplication id, as for ``publish_task``.

        Raises:
            InvalidTaskError: the id is not valid, or two differ.
            NatsUnavailableError: no slot freed up within ``stall`` seconds.
        """
        subject = _task_subject(agent_id, task_type)
        given_id, data, correlation, metadata = env_mod.task_fields(task, id)
        msg_id = given_id or env_mod.new_id()
        payload = env_mod.encode(
            id=msg_id,
            kind=Kind.TASK,
            agent_id=agent_id,
            type=task_type,
            data=data,
            correlation_id=correlation,
            metadata=metadata,
        )
        try:
            fut = await self.client.js_publish_async_raw(subject, payload, {hdr.MSG_ID: msg_id}, stall=stall)
        except NatsUnavailableError as exc:
            metrics.PUBLISH_FAILURES.inc()
            raise _with_id(exc, msg_id) from exc
        fut.add_done_callback(_log_async_failure)
        _PUBLISHED["task"] += 1
        return fut

    async def wait_acks(self, timeout: float = 10.0) -> None:
        """Wait until every ``publish_task_async`` was acknowledged (or failed).

        Raises:
            NatsUnavailableError: some are still unacknowledged after ``timeout`` seconds.
        """
        js = self.client.js
        try:
            await asyncio.wait_for(js.publish_async_completed(), timeout)
        except TimeoutError:
            raise NatsUnavailableError(
                f"{js.publish_async_pending()} JetStream publishes unacknowledged after {timeout:g} s"
            ) from None

    async def _publish(
        self, subject: str, payload: bytes, msg_id: str, kind: Kind, ack: bool, timeout: float, chosen: bool
    ) -> int | None:
        """Publish with the envelope id ``msg_id`` as ``Nats-Msg-Id``.

        Always on JetStream publishes (``ack``), generated ids included: one that failed
        ambiguously (a timeout while the message sat in a reconnect buffer) may still be
        stored, and the caller's retry with the id the error names must then be
        de-duplicated. A core publish (``ack=False``) that raised was not sent, so it
        carries the header only for an id the caller ``chosen`` (a header costs every
        subscriber ~15-25 us, see the benchmarks page).
        """
        if self._closed:
            raise LiquidNatsError("the A2A bus is closed")
        headers = {hdr.MSG_ID: msg_id} if ack or chosen else None
        try:
            if not ack:
                await self.client.publish_raw(subject, payload, headers)
                _PUBLISHED[kind] += 1
                return None
            pub_ack = await self.client.js_publish_raw(subject, payload, headers, timeout=timeout)
        except NatsUnavailableError as exc:
            metrics.PUBLISH_FAILURES.inc()
            raise _with_id(exc, msg_id) from exc
        if pub_ack.duplicate:
            log.info("%s: id %s was already stored (seq %s); not stored twice", subject, msg_id, pub_ack.seq)
        else:
            _PUBLISHED[kind] += 1
        return int(pub_ack.seq)

    # -- subscribing -----------------------------------------------------------

    async def subscribe_to_tasks(
        self,
        pattern: str,
        handler: Handler,
        queue: str | None = None,
        durable: str | None = None,
        *,
        batch: int = DEFAULT_BATCH,
        ack_wait: float = DEFAULT_ACK_WAIT,
        max_deliver: int = DEFAULT_MAX_DELIVER,
    ) -> Subscription | DurableSubscription:
        """Handle tasks matching ``pattern`` (relative to ``agents.``: ``"trading-agent.tasks.*"``).

        The handler (sync or async) receives an ``Envelope``; inside it ``await reply(x)``
        (or returning ``x``) answers a ``request_agent``. A handler exception is logged
        with the subject and the subscription carries on.

        Args:
            queue: with ``durable=None``, a core queue group: each task reaches one member.
            durable: a durable JetStream consumer of this name: tasks published while no
                subscriber runs are delivered when one comes back (within the stream's
                hour), marked handled (``A2A_HANDLED``) and acked after the handler
                returns, retried in place if it raises (up to ``max_deliver`` attempts,
                later tasks waiting: each subscriber handles its tasks in stream order),
                redelivered if the process dies. A repeat delivery of a handled task
                (an ack lost in a crash) is acked without running: once in effect.
                Every process using the same name shares the consumer (a durable queue
                group, so ``queue`` adds nothing here; order then holds per process).
            batch: durable only: messages fetched per request while busy.
            ack_wait: durable only: seconds before an unacknowledged message is redelivered.
            max_deliver: durable only: attempts before a failing message is terminated.

        Raises:
            InvalidSubjectError: the pattern, queue or durable name is invalid.
            ValueError: the durable name is in use with another pattern.
        """
        self._check_open()
        subject = absolute_pattern(pattern)
        if queue is not None:
            subjects.token(queue, "queue group")
        if durable is None:
            sub = await self.client.subscribe_msgs(subject, self._callback(subject, handler, True), queue)
            self._subscriptions.add(sub)
            log.info("subscribed to tasks %s%s", subject, f" (queue {queue})" if queue else "")
            return sub
        subjects.token(durable, "durable name")
        dsub = DurableSubscription(
            self.client,
            durable=durable,
            filter_subject=subject,
            handler=handler,
            batch=batch,
            ack_wait=ack_wait,
            max_deliver=max_deliver,
        )
        await dsub.start()
        self._durables.add(dsub)
        log.info("subscribed to tasks %s (durable %s)", subject, durable)
        return dsub

    async def subscribe_to_events(self, pattern: str, handler: Handler) -> Subscription:
        """Handle events matching ``pattern`` (relative to ``agents.``: ``"*.events.>"``;
        ``"system.events.>"`` is taken as absolute). The handler (sync or async) receives an
        ``Envelope`` with ``agent_id``, ``type``, ``data``, ``timestamp``.

        Raises:
            InvalidSubjectError: the pattern is invalid.
        """
        self._check_open()
        subject = absolute_pattern(pattern)
        sub = await self.client.subscribe_msgs(subject, self._callback(subject, handler, False))
        self._subscriptions.add(sub)
        log.info("subscribed to events %s", subject)
        return sub

    def _callback(self, pattern: str, handler: Handler, tasks: bool) -> Callable[[Msg], Any]:
        """The nats-py callback of a core subscription (the hot path: kept flat on purpose)."""
        client = self.client
        decode = env_mod.decode
        fast_decode = env_mod.DECODER.decode
        fast_errors = env_mod.DECODE_ERRORS
        received = metrics.RECEIVED_COUNTS
        is_coroutine = inspect.iscoroutinefunction(handler)

        async def on_msg(msg: Msg) -> None:
            try:
                envelope = fast_decode(msg.data)
            except fast_errors:
                try:
                    envelope = decode(msg.data, msg.subject, msg.headers)
                except InvalidPayloadError as exc:
                    metrics.SKIPPED.labels("core").inc()
                    log.warning("skipping message on %s (subscription %s): %s", msg.subject, pattern, exc)
                    return
            try:
                if tasks:
                    await run_handler(handler, envelope, client, msg.subject)
                elif is_coroutine:
                    await handler(envelope)
                else:  # a plain handler runs in a thread: it must not stop the event loop
                    await call_handler(handler, envelope)
            except Exception:
                metrics.HANDLER_ERRORS.labels("core").inc()
                log.exception("handler of %s failed on %s (id %s)", pattern, msg.subject, envelope.id)
                return
            received["core"] += 1

        return on_msg

    async def delete_durable(self, name: str) -> bool:
        """Delete a durable consumer (its position is lost). Returns whether it existed."""
        subjects.token(name, "durable name")
        try:
            return bool(await self.client.js.delete_consumer(streams.A2A_TASKS, name))
        except nats.js.errors.NotFoundError:
            return False

    async def replay(
        self, pattern: str, since: history.Since = None, *, limit: int | None = None
    ) -> AsyncIterator[Envelope]:
        """Yield the stored messages matching ``pattern`` from ``since`` up to now, in order.

        For debugging and late joiners; the stream keeps one hour.

        Args:
            pattern: relative to ``agents.`` (``"*.events.>"``), or ``system.``-absolute.
            since: a datetime, a timedelta back from now, or a stream sequence; ``None``
                for everything stored.
            limit: stop after this many envelopes.

        Raises:
            InvalidSubjectError: the pattern is invalid.
        """
        self._check_open()
        async for envelope in history.replay(self.client, absolute_pattern(pattern), since, limit=limit):
            yield envelope

    # -- request / reply -------------------------------------------------------

    async def request_agent(self, agent_id: str, task_type: str, task: Any = None, timeout: float = 5.0) -> Any:
        """Send a task and wait for the handler's ``reply(...)`` (or non-``None`` return).

        While the client is not connected it waits for the connection within ``timeout``
        (the rest of it is for the reply).

        Returns:
            the ``data`` of the reply.

        Raises:
            RequestTimeoutError: (a ``TimeoutError``) no reply within ``timeout`` seconds.
            InvalidSubjectError / InvalidTaskError / NatsUnavailableError: as ``publish_task``.
        """
        subject = _task_subject(agent_id, task_type)
        if not self.client.is_connected:
            total, deadline = timeout, time.monotonic() + timeout
            await self.client.wait_connected(timeout)
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise RequestTimeoutError(subject, total)
        if self._inbox is None:
            self._inbox = ReplyInbox(self.client)
        async with self._inbox.expect(subject, timeout) as (reply_to, answer):
            await self.publish_task(agent_id, task_type, task, reply_to=reply_to, timeout=timeout)
            reply = await answer()
        return reply.data

    # -- task lifecycle --------------------------------------------------------

    def _state_store(self) -> TaskStateStore:
        if self._states is None:
            self._states = TaskStateStore(self.client)
        return self._states

    async def update_task_state(
        self,
        task_id: str,
        state: TaskState | str,
        *,
        agent_id: str | None = None,
        message: str | None = None,
        data: Any = None,
    ) -> TaskStateChange:
        """Move a task to ``state`` and publish ``system.events.task_state_changed``.

        Returns:
            the change, with the task's next ``seq`` (1, 2, 3... per task).

        Raises:
            ValueError: ``state`` is not an A2A state, or ``task_id`` is invalid.
            IllegalTransitionError: (a ``ValueError``) e.g. leaving a terminal state.
            NatsUnavailableError: NATS is not available (if raised after the change was
                recorded, the message says so; ``watch_task`` shows it).
        """
        self._check_open()
        new_state = TaskState(state)
        change = await self._state_store().commit(task_id, new_state, agent_id=agent_id, message=message, data=data)
        try:
            await self.publish_system_event(
                TASK_STATE_CHANGED,
                change.to_dict(),
                task_id=task_id,
                id=f"{task_id}:state:{change.seq}",
            )
        except NatsUnavailableError as exc:
            raise NatsUnavailableError(
                f"task {task_id!r} is now {new_state.value!r} (seq {change.seq}) but the "
                f"{TASK_STATE_CHANGED} event was not published: {exc}"
            ) from exc
        return change

    async def get_task_state(self, task_id: str) -> TaskRecord | None:
        """The task's history (``.state``, ``.seq``, ``.changes``), or ``None``."""
        return await self._state_store().get(task_id)

    async def watch_task(self, task_id: str, since_seq: int | None = None) -> AsyncIterator[TaskStateChange]:
        """Yield the task's state changes after ``since_seq`` in order, then live ones;
        ends after a terminal state. Resume after a disconnect with the last ``seq`` seen."""
        self._check_open()
        async for change in self._state_store().watch(task_id, since_seq):
            yield change

    # -- agent registry --------------------------------------------------------

    def _agents(self) -> AgentRegistry:
        if self._registry is None:
            s = self.client.settings
            self._registry = AgentRegistry(
                self.client,
                ttl=s.a2a_agent_ttl,
                interval=s.a2a_heartbeat_interval,
                beat=self._publish_heartbeat,
                closed=lambda: self._closed or self.client.state is ConnectionState.CLOSED,
            )
        return self._registry

    async def register_agent(self, card: AgentCard | Mapping[str, Any], *, heartbeat: bool = True) -> AgentCard:
        """Store an agent card in the registry and keep it live with heartbeats.

        Raises:
            ValueError: the card has no valid ``id``.
        """
        self._check_open()
        model = card if isinstance(card, AgentCard) else AgentCard.from_dict(card)
        return await self._agents().register(model, heartbeat=heartbeat)

    async def heartbeat(self, agent_id: str, status: dict[str, Any] | None = None) -> None:
        """Beat once for a registered agent (``register_agent`` does it periodically)."""
        await self._agents().heartbeat(agent_id, status)

    async def deregister_agent(self, agent_id: str) -> None:
        """Stop the agent's heartbeats and remove its card."""
        await self._agents().deregister(agent_id)

    async def list_agents(self, include_offline: bool = False) -> list[AgentInfo]:
        """The live agents (heartbeat within ``A2A_AGENT_TTL``) with their last heartbeat."""
        return await self._agents().list(include_offline)

    async def _publish_heartbeat(self, agent_id: str, status: dict[str, Any] | None) -> None:
        subject = subjects.agent_heartbeat(agent_id)
        payload_id = env_mod.new_id()
        payload = env_mod.encode(id=payload_id, kind=Kind.HEARTBEAT, agent_id=agent_id, type="heartbeat", data=status)
        await self._publish(subject, payload, payload_id, Kind.HEARTBEAT, False, 5.0, False)


def _with_id(exc: NatsUnavailableError, msg_id: str) -> NatsUnavailableError:
    """``exc`` naming the envelope id a retry must reuse to be de-duplicated; an unknown
    outcome stays a ``PublishOutcomeUnknownError`` (``sent=True``)."""
    hint = f"publish again with id={msg_id!r} to store it at most once"
    if isinstance(exc, PublishOutcomeUnknownError):
        return PublishOutcomeUnknownError(exc.subject, exc.msg_id, exc.timeout, hint=hint)
    return NatsUnavailableError(f"{exc} (envelope id {msg_id!r}: {hint})")


def _log_async_failure(fut: asyncio.Future[PubAck]) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()  # also marks it retrieved
    if exc is not None:
        metrics.PUBLISH_FAILURES.inc()
        log.error("JetStream did not store an A2A task published with publish_task_async: %r", exc)

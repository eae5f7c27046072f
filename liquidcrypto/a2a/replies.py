"""Running a handler with ``reply(...)`` available inside it.

A task sent with ``request_agent`` carries ``reply_to`` (a private inbox) in its envelope.
Inside the handler, ``await reply(result)`` sends the answer there; returning a value
other than ``None`` does the same if the handler did not reply itself. Replies never go
to the NATS reply subject of the message: for a task published to JetStream that
subject belongs to the stream's publish acknowledgement.

``reply_to`` comes from the message body, which any client of the account can write, so
it is only trusted as a reply address the requester owns: a literal subject (valid
tokens, no wildcard, whitespace or control character, at most ``MAX_REPLY_SUBJECT``
characters) under the replying client's inbox prefix (nats-py's ``inbox_prefix``,
default ``_INBOX``; requester and agent must share it). Anything else (``$JS.API...``,
``$KV...``, ``trades.BTCUSDT``, ``_INBOX.>``) is refused: never published, counted in
``liquidcrypto_a2a_replies_refused_total{reason}`` and logged at warning (at most once
per ``WARN_EVERY`` seconds per reason). The handler still runs and the task is settled
as usual.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from nats.aio.msg import Msg

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a import metrics
from liquidcrypto.a2a.envelope import Envelope, Kind
from liquidcrypto.errors import InvalidPayloadError, RequestTimeoutError
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.subscription import Subscription, call_handler

log = logging.getLogger(__name__)

MAX_REPLY_SUBJECT = 512
"""The longest ``reply_to`` accepted (an inbox is ~50 characters; a subject past the
server's control-line limit would make it close the connection)."""
WARN_EVERY = 60.0
"""Seconds between two warnings about refused replies of one reason (the rest at debug)."""
_NOT_IN_SUBJECT = re.compile(r"[\s*>\x00-\x1f\x7f]")
_last_warning: dict[str, tuple[float, int]] = {}  # reason -> (when warned, refusals since)


def refused_reason(reply_to: object, inbox_prefix: str) -> str | None:
    """Why ``reply_to`` may not be replied to, or ``None`` if it may.

    Returns:
        ``"invalid"`` (not a literal subject: empty token, wildcard, whitespace or a
        control character), ``"too_long"`` (over ``MAX_REPLY_SUBJECT``), ``"not_inbox"``
        (a valid subject outside ``{inbox_prefix}.``), or ``None``.
    """
    if not isinstance(reply_to, str) or not reply_to:
        return "invalid"
    if len(reply_to) > MAX_REPLY_SUBJECT:
        return "too_long"
    if _NOT_IN_SUBJECT.search(reply_to) or "" in reply_to.split("."):
        return "invalid"
    if not reply_to.startswith(inbox_prefix + "."):
        return "not_inbox"
    return None


def inbox_prefix(client: NatsClient) -> str:
    """The client's inbox prefix (``_INBOX`` unless connected with ``inbox_prefix=``).

    Raises:
        NatsUnavailableError: there is no connection.
    """
    return client.nc.new_inbox().rsplit(".", 1)[0]


def _refuse(envelope: Envelope, subject: str, reason: str) -> None:
    metrics.REPLIES_REFUSED.labels(reason).inc()
    now = time.monotonic()
    warned, since = _last_warning.get(reason, (float("-inf"), 0))
    if now - warned < WARN_EVERY:
        _last_warning[reason] = (warned, since + 1)
        log.debug("refused reply_to %.80r of task %.80r on %s (%s)", envelope.reply_to, envelope.id, subject, reason)
        return
    _last_warning[reason] = (now, 0)
    log.warning(
        "refused to reply to %.80r for task %.80r on %s: %s (replies go only to a literal subject under the "
        "inbox prefix); %d more refused since the last warning",
        envelope.reply_to,
        envelope.id,
        subject,
        _REASONS[reason],
        since,
    )


_REASONS = {
    "invalid": "not a literal subject",
    "too_long": f"longer than {MAX_REPLY_SUBJECT} characters",
    "not_inbox": "not an inbox",
}


class _ReplyTarget:
    __slots__ = ("client", "envelope", "replied", "settled", "subject")

    def __init__(self, client: NatsClient, envelope: Envelope, subject: str) -> None:
        self.client = client
        self.envelope = envelope
        self.subject = subject
        self.replied = False
        self.settled = False  # sent or refused: a returned value is not sent again

    async def send(self, data: Any) -> bool:
        e = self.envelope
        if not e.reply_to:
            return False
        reason = refused_reason(e.reply_to, inbox_prefix(self.client))
        if reason is not None:
            self.settled = True
            _refuse(e, self.subject, reason)
            return False
        payload = env_mod.encode(
            id=env_mod.new_id(),
            kind=Kind.REPLY,
            agent_id=e.agent_id,
            type=e.type,
            data=data,
            task_id=e.task_id or e.id,
            correlation_id=e.id,
        )
        await self.client.publish_raw(e.reply_to, payload)
        self.replied = self.settled = True
        return True


_current: ContextVar[_ReplyTarget | None] = ContextVar("a2a_reply_target", default=None)


async def reply(data: Any = None) -> bool:
    """Answer the task being handled (call it inside a ``subscribe_to_tasks`` handler).

    Args:
        data: the JSON-able answer; ``request_agent`` returns it to the requester.

    Returns:
        ``True`` if sent; ``False`` if the task was not a request (nobody waits) or its
        ``reply_to`` is not an inbox (refused: see the module doc).

    Raises:
        RuntimeError: called outside a task handler.
        InvalidPayloadError: ``data`` is not JSON-able.
    """
    target = _current.get()
    if target is None:
        raise RuntimeError("reply() can only be called inside a subscribe_to_tasks handler")
    return await target.send(data)


async def run_handler(
    handler: Callable[[Envelope], Any], envelope: Envelope, client: NatsClient, subject: str = ""
) -> Any:
    """Call ``handler(envelope)`` with ``reply`` bound; send a non-``None`` result as the reply.

    Args:
        subject: the subject the task arrived on (for the log of a refused reply).
    """
    target = _ReplyTarget(client, envelope, subject or f"agents.{envelope.agent_id}.tasks.{envelope.type}")
    token = _current.set(target)
    try:
        result = await call_handler(handler, envelope)
    finally:
        _current.reset(token)
    if result is not None and envelope.reply_to and not target.settled:
        await target.send(result)
    return result


class ReplyInbox:
    """One wildcard inbox subscription per bus for every ``request_agent`` in flight."""

    def __init__(self, client: NatsClient) -> None:
        self.client = client
        self._inbox_base: str | None = None
        self._sub: Subscription | None = None
        self._waiting: dict[str, asyncio.Future[Envelope]] = {}

    async def _ensure(self) -> str:
        if self._inbox_base is None:
            prefix = self.client.nc.new_inbox()
            self._sub = await self.client.subscribe_msgs(f"{prefix}.*", self._on_reply)
            self._inbox_base = prefix
        return self._inbox_base

    @asynccontextmanager
    async def expect(
        self, subject: str, timeout: float
    ) -> AsyncIterator[tuple[str, Callable[[], Awaitable[Envelope]]]]:
        """Yield ``(reply_to, answer)``; ``await answer()`` waits for the reply until the deadline.

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds of entering.
        """
        prefix = await self._ensure()
        token = env_mod.new_id()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Envelope] = loop.create_future()
        deadline = loop.time() + timeout
        self._waiting[token] = fut

        async def answer() -> Envelope:
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))

        try:
            yield f"{prefix}.{token}", answer
        except TimeoutError:
            raise RequestTimeoutError(subject, timeout) from None
        finally:
            self._waiting.pop(token, None)

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._waiting.get(msg.subject.rsplit(".", 1)[-1])
        if fut is None or fut.done():
            return  # the requester gave up already
        try:
            fut.set_result(env_mod.decode(msg.data, msg.subject, msg.headers))
        except InvalidPayloadError as exc:
            log.warning("ignoring a bad reply on %s: %s", msg.subject, exc)

    async def close(self) -> None:
        for fut in self._waiting.values():
            fut.cancel()
        if self._sub is not None:
            await self._sub.unsubscribe()

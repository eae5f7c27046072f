"""Running a handler with ``reply(...)`` available inside it.

A task sent with ``request_agent`` carries ``reply_to`` (a private inbox) in its envelope.
Inside the handler, ``await reply(result)`` sends the answer there; returning a value
other than ``None`` does the same if the handler did not reply itself. Replies never go
to the NATS reply subject of the message: for a task published to JetStream that
subject belongs to the stream's publish acknowledgement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

from nats.aio.msg import Msg

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a.envelope import Envelope, Kind
from liquidcrypto.errors import InvalidPayloadError, RequestTimeoutError
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.subscription import Subscription, call_handler

log = logging.getLogger(__name__)


class _ReplyTarget:
    __slots__ = ("client", "envelope", "replied")

    def __init__(self, client: NatsClient, envelope: Envelope) -> None:
        self.client = client
        self.envelope = envelope
        self.replied = False

    async def send(self, data: Any) -> bool:
        e = self.envelope
        if not e.reply_to:
            return False
        payload = env_mod.encode(
            id=env_mod.new_id(), kind=Kind.REPLY, agent_id=e.agent_id, type=e.type, data=data,
            task_id=e.task_id or e.id, correlation_id=e.id,
        )
        await self.client.publish_raw(e.reply_to, payload)
        self.replied = True
        return True


_current: ContextVar[_ReplyTarget | None] = ContextVar("a2a_reply_target", default=None)


async def reply(data: Any = None) -> bool:
    """Answer the task being handled (call it inside a ``subscribe_to_tasks`` handler).

    Args:
        data: the JSON-able answer; ``request_agent`` returns it to the requester.

    Returns:
        ``True`` if sent; ``False`` if the task was not a request (nobody waits).

    Raises:
        RuntimeError: called outside a task handler.
        InvalidPayloadError: ``data`` is not JSON-able.
    """
    target = _current.get()
    if target is None:
        raise RuntimeError("reply() can only be called inside a subscribe_to_tasks handler")
    return await target.send(data)


async def run_handler(handler: Callable[[Envelope], Any], envelope: Envelope, client: NatsClient) -> Any:
    """Call ``handler(envelope)`` with ``reply`` bound; send a non-``None`` result as the reply."""
    target = _ReplyTarget(client, envelope)
    token = _current.set(target)
    try:
        result = await call_handler(handler, envelope)
    finally:
        _current.reset(token)
    if result is not None and envelope.reply_to and not target.replied:
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

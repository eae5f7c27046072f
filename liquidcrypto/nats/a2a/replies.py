"""Running a handler with ``reply(...)`` available inside it.

A task sent with ``request_agent`` carries ``reply_to`` (a private inbox) in its envelope.
Inside the handler, ``await reply(result)`` sends the answer there; returning a value
other than ``None`` does the same if the handler did not reply itself. Replies never go
to the NATS reply subject of the message: for a task published to JetStream that
subject belongs to the stream's publish acknowledgement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from liquidcrypto.nats.a2a import envelope as env_mod
from liquidcrypto.nats.a2a.envelope import Envelope, Kind
from liquidcrypto.nats.client import NatsClient, call_handler

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

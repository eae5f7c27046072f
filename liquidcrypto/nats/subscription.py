"""JSON subscriptions: the callback wrapper every subscriber shares, and ``Subscription``,
which outlives degraded starts (it is established once the client connects)."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from liquidcrypto import codec
from liquidcrypto.errors import InvalidPayloadError

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
MsgHandler = Callable[[Msg], Awaitable[None]]

# Pending limits of a subscription: explicit, so slow consumers are a counted event.
DEFAULT_PENDING_MSGS = 65_536
DEFAULT_PENDING_BYTES = 64 * 1024 * 1024


async def call_handler(handler: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async handler and return its result."""
    result = handler(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


def json_callback(subject: str, handler: Handler) -> MsgHandler:
    """Wrap ``handler(data)`` as a nats-py callback.

    Bad JSON is logged and skipped; handler exceptions are logged with the subject and
    the subscription carries on. If the message has a reply subject and the handler
    returns something other than ``None``, it is sent back as the JSON reply.
    """

    async def callback(msg: Msg) -> None:
        try:
            data = codec.decode(msg.data)
        except InvalidPayloadError as exc:
            log.warning("skipping message on %s: %s", msg.subject, exc)
            return
        try:
            result = await call_handler(handler, data)
        except Exception:
            log.exception("handler for %s failed on a message from %s", subject, msg.subject)
            return
        if msg.reply and result is not None:
            try:
                await msg.respond(codec.encode(result))
            except Exception:
                log.exception("reply to %s failed", msg.subject)

    return callback


class Subscription:
    """A JSON subscription that survives degraded starts.

    It is established as soon as the client is connected (at once if it already is), and
    nats-py restores it after every reconnect of the same connection.
    """

    def __init__(
        self,
        on_close: Callable[[Subscription], None],
        subject: str,
        callback: MsgHandler,
        queue: str | None,
        pending_msgs_limit: int,
        pending_bytes_limit: int,
    ) -> None:
        self._on_close = on_close
        self.subject = subject
        self.queue = queue
        self._callback = callback
        self._pending_msgs_limit = pending_msgs_limit
        self._pending_bytes_limit = pending_bytes_limit
        self._sub: NatsSubscription | None = None
        self._establishing = False
        self.closed = False

    @property
    def active(self) -> bool:
        """Whether the server-side subscription exists now."""
        return self._sub is not None and not self.closed

    @property
    def pending_msgs(self) -> int:
        return self._sub.pending_msgs if self._sub is not None else 0

    async def _establish(self, nc: NatsConnection) -> None:
        """Create the server-side subscription once (idempotent, also when called concurrently)."""
        if self.closed or self._sub is not None or self._establishing:
            return
        self._establishing = True
        try:
            sub = await nc.subscribe(
                self.subject,
                queue=self.queue or "",
                cb=self._callback,
                pending_msgs_limit=self._pending_msgs_limit,
                pending_bytes_limit=self._pending_bytes_limit,
            )
        finally:
            self._establishing = False
        if self.closed:  # unsubscribed while we were subscribing
            with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                await sub.unsubscribe()
            return
        self._sub = sub

    async def unsubscribe(self) -> None:
        """Stop receiving; idempotent."""
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        if self._sub is not None:
            with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                await self._sub.unsubscribe()
            self._sub = None

    async def drain(self) -> None:
        """Process what is pending, then stop."""
        if self._sub is not None and not self.closed:
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await self._sub.drain()  # type: ignore[no-untyped-call]
        await self.unsubscribe()

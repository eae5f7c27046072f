"""JSON subscriptions: the callback wrapper every subscriber shares; ``Subscription``,
which outlives degraded starts (it is established once the client connects); and
``StreamSubscription``, a JetStream push consumer delivering to one of them."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo, StatusCode
from nats.js.errors import NotFoundError

from liquidcrypto import codec
from liquidcrypto.errors import InvalidPayloadError, NatsUnavailableError
from liquidcrypto.nats import headers as hdr

log = logging.getLogger(__name__)

Handler = Callable[[Any], Any]
MsgHandler = Callable[[Msg], Awaitable[None]]

# Pending limits of a subscription: explicit, so slow consumers are a counted event.
DEFAULT_PENDING_MSGS = 65_536
DEFAULT_PENDING_BYTES = 64 * 1024 * 1024

# The server's flow-control subjects; nothing else is ever answered from a status message.
_FLOW_CONTROL_PREFIX = "$JS.FC."
DELETE_TIMEOUT = 2.0  # seconds an unsubscribe waits for its consumer's deletion


HANDLER_THREADS = 32
"""Threads of the shared pool that runs plain (non-async) handlers."""
_pool: ThreadPoolExecutor | None = None


def handler_pool() -> ThreadPoolExecutor:
    """The pool plain handlers run in when their owner has none of its own.

    Not the event loop's default executor: that one also resolves host names for
    (re)connections, which must never wait behind slow handlers.
    """
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="liquidcrypto-handler")
    return _pool


def is_async_handler(handler: Callable[..., Any]) -> bool:
    """Whether ``handler`` is a coroutine function (or an object whose ``__call__`` is one)."""
    if inspect.iscoroutinefunction(handler):
        return True
    return inspect.iscoroutinefunction(getattr(handler, "__call__", None))  # noqa: B004 - an async __call__


def as_async(handler: Callable[..., Any], executor: Executor | None = None) -> Callable[..., Awaitable[Any]]:
    """``handler`` as a coroutine function, decided once (for hot paths).

    An async handler is returned as it is. A plain one runs in a thread (``executor``,
    default ``handler_pool()``) in a copy of the caller's context (context variables are
    seen), so a handler that blocks never stops the event loop: pings, ``in_progress``
    heartbeats and every other subscription go on meanwhile. If it returns an awaitable,
    that is awaited on the loop.
    """
    if is_async_handler(handler):
        return handler

    async def in_thread(*args: Any) -> Any:
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(executor or handler_pool(), functools.partial(context.run, handler, *args))
        if inspect.isawaitable(result):
            result = await result
        return result

    return in_thread


async def call_handler(handler: Callable[..., Any], *args: Any, executor: Executor | None = None) -> Any:
    """Call a handler and return its result: an async one on the loop, a plain one in a
    thread (see ``as_async``). Every component calls user handlers through this."""
    if is_async_handler(handler):
        return await handler(*args)
    return await as_async(handler, executor)(*args)


def json_callback(subject: str, handler: Handler) -> MsgHandler:
    """Wrap ``handler(data)`` as a nats-py callback.

    Bad JSON is logged and skipped; handler exceptions are logged with the subject and
    the subscription carries on. If the message has a reply subject and the handler
    returns something other than ``None``, it is sent back as the JSON reply. A plain
    (non-async) handler runs in a thread (``as_async``).
    """
    run = as_async(handler)

    async def callback(msg: Msg) -> None:
        try:
            data = codec.decode(msg.data)
        except InvalidPayloadError as exc:
            log.warning("skipping message on %s: %s", msg.subject, exc)
            return
        try:
            result = await run(data)
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


def stream_callback(callback: MsgHandler, publish: Callable[[str, bytes], Awaitable[None]]) -> MsgHandler:
    """Wrap a push consumer's ``callback``: answer its status messages, pass the rest on.

    Flow-control requests and idle heartbeats arrive on the deliver subject as status
    ``100`` messages with no data. They are in order with the messages, so when one reaches
    this wrapper, ``callback`` has returned for everything before it: a flow-control request
    (or a heartbeat naming the stalled one) is answered at once, which lets a callback that
    blocks pace the server. Only ``$JS.FC.`` subjects are answered: anyone in the account
    who learns the inbox could send a "heartbeat" naming, say, a ``$JS.API`` subject.
    """

    async def on_msg(msg: Msg) -> None:
        headers = msg.headers
        if msg.data or not headers or headers.get(hdr.STATUS) != StatusCode.CONTROL_MESSAGE:
            await callback(msg)
            return
        reply = msg.reply or headers.get(hdr.CONSUMER_STALLED)
        if reply and reply.startswith(_FLOW_CONTROL_PREFIX):
            try:
                await publish(reply, b"")
            except NatsUnavailableError as exc:  # the next heartbeat names it again
                log.debug("flow-control answer on %s not sent: %s", msg.subject, exc)

    return on_msg


class JetStreamOwner(Protocol):
    """What a ``StreamSubscription`` needs of its client."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def js(self) -> JetStreamContext: ...


class StreamSubscription:
    """A JetStream push consumer made for one subscription of the client.

    ``NatsClient.subscribe_stream`` builds it. ``unsubscribe()`` deletes the consumer:
    nats-py's ``unsubscribe`` leaves an ephemeral consumer on the server until its
    ``inactive_threshold``, and the server's consumer limits are then within reach of
    whoever can make us subscribe.

    Attributes:
        stream: the stream the consumer reads.
        consumer: the consumer's name.
        info: the consumer as created; ``info.num_pending`` counts the stored messages
            from its start at that moment.
    """

    def __init__(self, client: JetStreamOwner, sub: Subscription, stream: str, info: ConsumerInfo) -> None:
        self._client = client
        self._sub = sub
        self.stream = stream
        self.consumer: str = info.name
        self.info = info

    @property
    def subject(self) -> str:
        """The consumer's filter subject."""
        return str(self.info.config.filter_subject)

    @property
    def closed(self) -> bool:
        return self._sub.closed

    @property
    def pending_msgs(self) -> int:
        """Messages received and not yet passed to the callback."""
        return self._sub.pending_msgs

    async def consumer_info(self) -> ConsumerInfo:
        """The consumer's current state on the server.

        Raises:
            NatsUnavailableError: NATS is not available.
            nats.js.errors.NotFoundError: the consumer is gone.
        """
        info: ConsumerInfo = await self._client.js.consumer_info(self.stream, self.consumer)
        return info

    async def unsubscribe(self) -> None:
        """Stop receiving and delete the consumer; idempotent, never raises."""
        if self._sub.closed:
            return
        await self._sub.unsubscribe()
        if not self._client.is_connected:
            # Not now: it expires after its inactive_threshold (gone already if the server restarted).
            log.debug("consumer %s of %s left to expire (not connected)", self.consumer, self.stream)
            return
        try:
            await asyncio.wait_for(self._client.js.delete_consumer(self.stream, self.consumer), DELETE_TIMEOUT)
        except NotFoundError:
            pass  # already gone: expired, or the server lost it
        except (nats.errors.Error, TimeoutError, NatsUnavailableError) as exc:
            # Without a connection it expires after its inactive_threshold.
            log.debug("consumer %s of %s not deleted: %r", self.consumer, self.stream, exc)

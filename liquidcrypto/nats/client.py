"""The NATS client: connection with degraded mode, provisioning, health, JSON messaging.

``NatsClient`` owns one ``Connection`` (``connection.py``: connecting, degraded mode,
reconnect supervision). ``connect()`` never raises because NATS is down: when no server
of the pool answers, the client logs
``[Server] NATS not available - running in degraded mode`` once, keeps trying in the
background with jittered back-off, and becomes ``connected`` by itself. Once connected,
nats-py reconnects for ever (``max_reconnect_attempts=-1``); a connection closed under us
(the server closed it, or nats-py gave up) is replaced by a fresh one. Every
(re)connection ensures the JetStream resources (the spec's streams, and what components
asked for with ``require``), re-subscribes what is tracked and runs the ``on_connect``
callbacks — one such round at a time.

Every publish checks body + headers against the server's ``max_payload`` first; a
JetStream publish or a request is never handed to nats-py while it is not connected (its
reconnect buffer would send it later, after the caller was told it failed): it waits for
the connection (a JetStream publish: and for JetStream) within its own timeout, then is
sent with the time left, or fails as not sent.

``health()`` probes now, bounded in time (``liquidcrypto.nats.health``).

The module-level functions (``init_nats``, ``publish``...) act on one default client,
as in the spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from functools import lru_cache
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, PubAck

from liquidcrypto import codec
from liquidcrypto.config import Settings
from liquidcrypto.errors import (
    LiquidNatsError,
    NatsUnavailableError,
    StreamConflictError,
)
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import health as health_mod
from liquidcrypto.nats import hooks, publishing, streams, subjects
from liquidcrypto.nats.connection import DEGRADED_LINE, Connection, ConnectionState
from liquidcrypto.nats.health import empty_health, guarded_flush
from liquidcrypto.nats.options import connect_options, redact_url
from liquidcrypto.nats.subscription import (
    DEFAULT_PENDING_BYTES,
    DEFAULT_PENDING_MSGS,
    Handler,
    MsgHandler,
    StreamSubscription,
    Subscription,
    json_callback,
    stream_callback,
)

__all__ = [
    "DEGRADED_LINE",
    "ConnectionState",
    "NatsClient",
    "close_nats",
    "flush_barrier",
    "get_client",
    "get_nats_health",
    "init_nats",
    "is_nats_connected",
    "publish",
    "request",
    "subscribe",
]

log = logging.getLogger(__name__)

ConnectCallback = Callable[["NatsClient"], Awaitable[None]]

_YIELD_EVERY = 256
SUBSCRIBE_FLUSH_TIMEOUT = 5.0  # seconds a subscribe waits for the server to confirm it


@lru_cache(maxsize=8192)
def _checked_subject(subject: str) -> str:
    return subjects.subject(subject)


@lru_cache(maxsize=4096)
def _checked_pattern(pattern: str) -> str:
    return subjects.pattern(pattern)


class NatsClient:
    """One NATS connection with degraded mode, provisioning and JSON helpers.

    Use as ``async with NatsClient(url) as client:`` or call ``connect()``/``close()``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        provision: bool = True,
        **options: Any,
    ) -> None:
        """
        Args:
            url: server URL, or a comma-separated list (default from ``NATS_URL``).
            settings: settings to use (default ``Settings.from_env()``).
            provision: ensure the spec's three streams on every (re)connection
                (resources components ``require`` are ensured either way).
            **options: passed to ``nats.connect`` over our defaults (callbacks given
                here run after the client's own).
        """
        self.settings = settings or Settings.from_env()
        if url is not None:
            self.settings = _replace_url(self.settings, url)
        self.servers = self.settings.nats_servers()
        self._provision = provision
        self._options = options
        self._conn = Connection(self.connect_options, self._after_connect, self.display_url)
        self._subs_nc: NatsConnection | None = None  # the connection tracked subscriptions live on
        self._subscriptions: set[Subscription] = set()
        self._on_connect: list[ConnectCallback] = []
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        self._publish_count = 0
        self._required: dict[str, streams.Resources] = {}
        self._conflicts: dict[str, list[StreamConflictError]] = {}

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> NatsClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, *, wait: float | None = None) -> NatsClient:
        """Connect, or go to degraded mode and keep trying in the background.

        Returns as soon as the client is connected, or every server of the pool failed
        once (degraded), or the connect timeout passed for each — whichever comes first.
        A server that answers while JetStream does not is waited for up to 15 s, then the
        client stays ``provisioning`` (not degraded). It never raises because NATS is down.

        Args:
            wait: if given, wait up to this many seconds to be connected, then raise
                ``NatsUnavailableError`` (for callers that cannot run degraded).

        Returns:
            the client itself, connected or degraded.
        """
        if self.state is ConnectionState.CLOSED:
            raise LiquidNatsError("client is closed")
        if self.state is ConnectionState.NEW:
            await self._conn.start()
        if wait is not None:
            await self.wait_connected(wait)
        return self

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected and provisioned.

        Raises:
            NatsUnavailableError: not connected within ``timeout`` seconds.
        """
        if not await self._conn.wait_ready(time.monotonic() + timeout):
            raise NatsUnavailableError(
                f"NATS at {self.display_url} not connected within {timeout:g} s ({self.state})"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            )

    async def close(self) -> None:
        """Drain the connection, stop background work; idempotent."""
        if self.state is ConnectionState.CLOSED:
            return
        # Components built on this client (bus heartbeats, durable loops) stop first,
        # while the connection still works.
        for close_cb in reversed(self._on_close):
            try:
                await close_cb()
            except Exception:
                log.exception("on_close callback %r failed", close_cb)
        self._on_close.clear()
        await self._conn.close()
        self._subscriptions.clear()

    def on_connect(self, callback: ConnectCallback) -> None:
        """Run ``callback(client)`` after every (re)connection and provisioning.

        If the client is connected now, the callback also runs at the next reconnect only;
        callers that need it now call it themselves. The callbacks of one connection run
        one after the other in one task; a newer connection (or losing this one) cancels
        that task, and the next round starts once it has ended: a callback is never run
        twice at once, and must leave things consistent when cancelled.
        """
        self._on_connect.append(callback)

    def on_close(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``await callback()`` when the client closes, before the connection drains."""
        self._on_close.append(callback)

    def remove_on_connect(self, callback: ConnectCallback) -> None:
        if callback in self._on_connect:
            self._on_connect.remove(callback)

    # -- state -----------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """``new``, ``connecting``, ``provisioning`` (connected, JetStream not answering
        yet), ``connected``, ``degraded`` or ``closed``."""
        return self._conn.state

    @property
    def reconnects(self) -> int:
        """Reconnections nats-py made (a fresh connection after a close counts in ``fresh_connects``)."""
        return self._conn.reconnects

    @property
    def fresh_connects(self) -> int:
        """Connections closed under the client (not by ``close()``) and replaced by a new one."""
        return self._conn.fresh_connects

    @property
    def slow_consumer_events(self) -> int:
        """Times a subscription dropped messages over its pending limits, plus ``server_cuts``."""
        return self._conn.slow_consumer_events

    @property
    def server_cuts(self) -> int:
        """Times the server closed this connection while staying up (a slow consumer, mostly)."""
        return self._conn.server_cuts

    @property
    def last_error(self) -> str | None:
        """The last connection error, described (no credentials)."""
        return self._conn.last_error

    @property
    def display_url(self) -> str:
        return ",".join(redact_url(u) for u in self.servers)

    @property
    def is_connected(self) -> bool:
        return self._conn.is_connected

    @property
    def nc(self) -> NatsConnection:
        """The nats-py connection.

        Raises:
            NatsUnavailableError: there is none (degraded or closed).
        """
        nc = self._conn.nc
        if nc is None or nc.is_closed:
            raise NatsUnavailableError(f"NATS at {self.display_url} is not available ({self.state})")
        return nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the connection (see ``nc``)."""
        js = self._conn.js
        if js is None:
            raise NatsUnavailableError(f"NATS at {self.display_url} is not available ({self.state})")
        return js

    @property
    def server_id(self) -> str | None:
        """The id of the server this client is connected to (``None`` when not connected)."""
        nc = self._conn.nc
        if nc is None or not nc.is_connected:
            return None
        return hooks.server_id(nc)

    @property
    def stream_conflicts(self) -> list[StreamConflictError]:
        """The streams found with another retention policy (left as they are), one error each."""
        return [exc for group in self._conflicts.values() for exc in group]

    # -- connecting ------------------------------------------------------------

    def connect_options(self) -> dict[str, Any]:
        """The nats-py options of this client: settings, then caller overrides (the
        connection adds its callbacks to these)."""
        opts = connect_options(self.settings)
        opts.update(self._options)
        return opts

    async def _after_connect(self, nc: NatsConnection) -> None:
        """One re-establishment round: provision, re-subscribe, run callbacks; mark connected."""
        if nc is not self._subs_nc:
            # A fresh connection (the previous one was closed): nats-py restores
            # subscriptions only on a reconnect of the same connection, so ours are made
            # anew on this one. The old connection is closed; nothing arrives through it.
            for sub in self._subscriptions:
                sub._sub = None
            self._subs_nc = nc
        await self.provision()
        # CONNECTED first: a subscribe() racing with this loop then establishes its own
        # subscription (establishing is idempotent), so none is missed or made twice.
        self._conn.set_connected()
        for sub in list(self._subscriptions):
            # Shielded: a cancelled round never leaves a server-side subscription that
            # its Subscription does not know of.
            await asyncio.shield(sub._establish(nc))
        self._conn.set_ready()
        log.info("NATS connected to server %s (%s)", self.server_id, self.display_url)
        for cb in list(self._on_connect):
            try:
                await cb(self)
            except Exception:
                log.exception("on_connect callback %r failed", cb)

    async def provision(self) -> list[StreamConflictError]:
        """Ensure the spec's streams (unless built with ``provision=False``) and every group
        components required (idempotent).

        Returns:
            the streams in conflict, logged and left as they are (``stream_conflicts``).
        """
        groups = [streams.SPEC_STREAMS] if self._provision else []
        for group in [*groups, *self._required.values()]:
            await self._ensure(group)
        return self.stream_conflicts

    async def require(self, resources: streams.Resources) -> None:
        """Ensure a component's JetStream resources now and after every (re)connection.

        Args:
            resources: the component's group (e.g. ``streams.WORK_QUEUE_RESOURCES``).

        Raises:
            StreamConflictError: one of its streams exists with another retention policy
                (the rest are ensured; it is also in ``stream_conflicts``).
            NatsUnavailableError: NATS is not available now (they are ensured on connection).
        """
        self._required[resources.name] = resources
        conflicts = await self._ensure(resources)
        if conflicts:
            raise conflicts[0]

    async def _ensure(self, resources: streams.Resources) -> list[StreamConflictError]:
        s = self.settings
        conflicts = await streams.ensure(self.js, resources, replicas=s.js_replicas, dedupe_window=s.dedupe_window)
        self._conflicts[resources.name] = conflicts
        return conflicts

    # -- health ----------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The spec's health shape, probed now and bounded in time (``health.probe``):
        ``connected`` when the server answered a PING, ``jetstream.enabled`` when the
        client is provisioned and JetStream answered too. Never raises."""
        provisioned = self.is_connected
        return await health_mod.probe(self._conn.nc, self._conn.js if provisioned else None)

    async def _usable(self, subject: str, deadline: float, *, jetstream: bool) -> float:
        """Wait until the client can send (``jetstream``: connected and provisioned; else
        a server connected) up to the monotonic ``deadline``; the seconds left.

        Raises:
            NatsUnavailableError: not so by then (nothing sent).
        """
        ok = self.is_connected or (not jetstream and self._conn.linked)
        if not ok:
            ok = await (self._conn.wait_ready(deadline) if jetstream else self._conn.wait_linked(deadline))
        left = deadline - time.monotonic()
        if not ok or left <= 0:
            waited = "JetStream" if jetstream else "a connection"
            raise NatsUnavailableError(
                f"NATS at {self.display_url} ({self.state}): no {waited} within the timeout; "
                f"message to {subject!r} not sent"
            )
        return left

    # -- messaging -------------------------------------------------------------

    async def publish(self, subject: str, data: Any, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` as JSON on core NATS.

        While reconnecting, messages wait in nats-py's reconnect buffer (core NATS is
        at most once: they are sent on reconnection, or raise when the buffer is full).

        Raises:
            InvalidSubjectError: the subject is invalid.
            InvalidPayloadError: ``data`` is not JSON-able.
            PayloadTooLargeError: body + headers exceed the server's ``max_payload``.
            NatsUnavailableError: NATS is absent or the reconnect buffer is full (not sent).
        """
        payload = codec.encode(data)
        await self.publish_raw(_checked_subject(subject), payload, headers)

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish bytes on an already validated subject (hot paths); see ``publish``."""
        await publishing.core_publish(self.nc, subject, payload, headers)
        # nats-py's publish never yields; a hot loop would starve subscribers here.
        self._publish_count += 1
        if self._publish_count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def _sendable(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> NatsConnection:
        where = f"at {self.display_url} ({self.state})"
        return publishing.sendable(self._conn.nc, subject, payload, headers, where)

    async def js_publish(
        self,
        subject: str,
        data: Any,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Publish ``data`` as JSON to JetStream and wait for the stored acknowledgement.

        Args:
            msg_id: sent as ``Nats-Msg-Id`` so the stream drops a repeat in its window.
                Always give one when a failed publish may be retried.

            timeout: seconds for the whole call: while the client is not connected (a
                reconnect, a cluster electing leaders) it waits for the connection and for
                JetStream within it, then waits for the acknowledgement the time left.

        Returns:
            the ``PubAck`` (``.seq``, ``.duplicate``, ``.stream``).

        Raises:
            PayloadTooLargeError: body + headers exceed the server's ``max_payload``.
            PublishOutcomeUnknownError: sent, but no acknowledgement within ``timeout``:
                it may be stored (now or later); retry with the same ``msg_id``.
            NatsUnavailableError: not stored and never will be (``sent`` is ``False``):
                not connected within ``timeout``, or no stream captures the subject.
        """
        hdrs = dict(headers) if headers else {}
        if msg_id is not None:
            hdrs[hdr.MSG_ID] = msg_id
        return await self.js_publish_raw(_checked_subject(subject), codec.encode(data), hdrs or None, timeout=timeout)

    async def js_publish_raw(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, timeout: float = 5.0
    ) -> PubAck:
        """``js_publish`` for bytes on an already validated subject (hot paths); same errors."""
        if not self.is_connected:
            timeout = await self._usable(subject, time.monotonic() + timeout, jetstream=True)
        self._sendable(subject, payload, headers)
        return await publishing.js_publish(self.js, subject, payload, headers, timeout)

    async def js_publish_async_raw(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, stall: float | None = None
    ) -> asyncio.Future[PubAck]:
        """Start a JetStream publish on a validated subject; the future resolves on its ack.

        nats-py bounds the pending acknowledgements; a full window waits up to ``stall``
        seconds for a slot. Like ``js_publish``, nothing is handed to nats-py while it is
        not connected.

        Raises:
            PayloadTooLargeError: body + headers exceed the server's ``max_payload``.
            NatsUnavailableError: not connected, or no slot freed up within ``stall``
                (not sent).
        """
        self._sendable(subject, payload, headers)
        return await publishing.js_publish_async(self.js, subject, payload, headers, stall)

    async def subscribe(
        self,
        subject: str,
        handler: Handler,
        queue: str | None = None,
        *,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES,
    ) -> Subscription:
        """Subscribe ``handler(data)`` (sync or async) to a subject or wildcard pattern.

        Returns once the server has the subscription. In degraded mode the subscription
        is recorded and established on connection.

        Raises:
            InvalidSubjectError: the pattern or queue name is invalid.
        """
        _checked_pattern(subject)
        if queue is not None:
            subjects.token(queue, "queue group")
        return await self.subscribe_msgs(
            subject,
            json_callback(subject, handler),
            queue,
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )

    async def subscribe_msgs(
        self,
        subject: str,
        callback: MsgHandler,
        queue: str | None = None,
        *,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES,
    ) -> Subscription:
        """Subscribe a raw nats-py message callback (for components needing headers/metadata).

        When connected, it returns once the server has the subscription: a message any
        connection to that server publishes next reaches it.
        """
        if self.state is ConnectionState.CLOSED:
            raise LiquidNatsError("client is closed")
        sub = Subscription(
            self._subscriptions.discard, subject, callback, queue, pending_msgs_limit, pending_bytes_limit
        )
        self._subscriptions.add(sub)
        if self.is_connected:
            try:
                await sub._establish(self.nc)
                await self.settle_subscriptions()
            except BaseException:
                # Cancelled: the caller gets no Subscription to unsubscribe, so none may stay.
                await asyncio.shield(sub.unsubscribe())
                raise
        return sub

    async def subscribe_stream(
        self,
        stream: str,
        subject: str,
        callback: MsgHandler,
        *,
        config: ConsumerConfig,
        pending_msgs_limit: int = DEFAULT_PENDING_MSGS,
        pending_bytes_limit: int = DEFAULT_PENDING_BYTES,
    ) -> StreamSubscription:
        """Push the messages of ``stream`` on ``subject`` (a pattern) to a raw nats-py callback.

        A subscription of this client on a fresh inbox (with these pending limits: past
        them nats-py drops and the client counts a slow-consumer event, as for
        ``subscribe``) is in place before an ephemeral push consumer delivering to it is
        created, so nothing is pushed to nobody. Flow-control requests and heartbeats, if
        ``config`` asks for them, are answered here and never reach ``callback``; with
        explicit acks, acking is the callback's job. ``unsubscribe()`` deletes the consumer.
        Nothing re-creates the consumer after a reconnection: the caller knows where to
        resume from.

        Args:
            stream: the stream to read.
            subject: the filter subject.
            config: the consumer (start, acks, flow control...); its deliver subject and
                filter are set here.

        Returns:
            the subscription; its ``info`` is the consumer as created.

        Raises:
            InvalidSubjectError: the subject is invalid.
            NatsUnavailableError: NATS is not connected, or the consumer could not be created.
        """
        _checked_pattern(subject)
        if not self.is_connected:
            raise NatsUnavailableError(f"NATS at {self.display_url} is not connected; no consumer on {stream}")
        inbox = self.nc.new_inbox()
        sub = await self.subscribe_msgs(
            inbox,
            stream_callback(callback, self.publish_raw),
            pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=pending_bytes_limit,
        )
        try:
            info = await self.js.add_consumer(
                stream, dataclasses.replace(config, deliver_subject=inbox, filter_subject=subject)
            )
        except (nats.errors.Error, TimeoutError, NatsUnavailableError) as exc:
            await sub.unsubscribe()
            raise NatsUnavailableError(f"no consumer on {stream} for {subject!r}: {exc!r}") from exc
        except BaseException:
            # Cancelled (say, a re-establishment round replaced by a newer one): a consumer
            # the server may have made must not keep pushing to a subscription nobody owns.
            await asyncio.shield(sub.unsubscribe())
            raise
        return StreamSubscription(self, sub, stream, info)

    async def settle_subscriptions(self, timeout: float = SUBSCRIBE_FLUSH_TIMEOUT) -> None:
        """``flush()`` after subscribing, when connected; never raises (a connection that
        is going re-establishes its subscriptions on reconnect)."""
        if not self.is_connected:
            return
        try:
            await flush_barrier(self.nc, timeout)
        except (nats.errors.Error, TimeoutError) as exc:
            log.debug("no round trip after subscribing: %r", exc)

    async def request(self, subject: str, data: Any, timeout: float = 2.0) -> Any:
        """Send ``data`` and return the decoded JSON reply.

        A request is not buffered while nats-py reconnects (it would reach the responder
        after the caller gave up): it waits for a connection within ``timeout``, then is
        sent and waits for the reply the time left.

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds, or no responder.
            PayloadTooLargeError: the request exceeds the server's ``max_payload``.
            NatsUnavailableError: NATS not connected within ``timeout`` (not sent).
        """
        subject = _checked_subject(subject)
        payload = codec.encode(data)
        if not self._conn.linked:
            timeout = await self._usable(subject, time.monotonic() + timeout, jetstream=False)
        msg = await publishing.request(self._sendable(subject, payload, None), subject, payload, timeout)
        return codec.decode(msg.data)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed everything sent so far (publishes,
        subscriptions): after it returns, a subscription just made receives what any
        connection to that server publishes next."""
        await flush_barrier(self.nc, timeout)


async def flush_barrier(nc: NatsConnection, timeout: float) -> None:
    """``nc.flush()`` that is a real barrier.

    nats-py (2.9 to 2.16) writes the PING of ``flush()`` straight to the socket, ahead of
    the commands still queued for its flusher task, so the PONG can come back before
    the server has seen a SUB or PUB made just before: measured, a subscription then
    missed the next message from another connection in about 5 % of fresh connections.
    Waiting for the flusher to write the queue first (``hooks.flush_pending``, a private
    hook of nats-py with a fallback) restores the order.
    """
    await hooks.flush_pending(nc, timeout)
    await guarded_flush(nc, max(1, round(timeout)))


def _replace_url(settings: Settings, url: str) -> Settings:
    return dataclasses.replace(settings, nats_url=url)


# -- the module-level default client (the spec's functions) ----------------------

_default: NatsClient | None = None


def get_client() -> NatsClient:
    """The default client.

    Raises:
        NatsUnavailableError: ``init_nats()`` has not been called.
    """
    if _default is None:
        raise NatsUnavailableError("NATS is not initialised; call init_nats() first")
    return _default


async def init_nats(url: str | None = None, **options: Any) -> NatsClient:
    """Connect the default client; never raises because NATS is down (degraded mode)."""
    global _default
    if _default is not None and _default.state is not ConnectionState.CLOSED:
        return _default
    _default = NatsClient(url, **options)
    await _default.connect()
    return _default


async def close_nats() -> None:
    """Drain and close the default client."""
    global _default
    client, _default = _default, None
    if client is not None:
        await client.close()


def is_nats_connected() -> bool:
    return _default is not None and _default.is_connected


async def get_nats_health() -> dict[str, Any]:
    if _default is None:
        return empty_health()
    return await _default.health()


async def publish(subject: str, data: Any) -> None:
    await get_client().publish(subject, data)


async def subscribe(subject: str, handler: Handler, queue: str | None = None) -> Subscription:
    return await get_client().subscribe(subject, handler, queue)


async def request(subject: str, data: Any, timeout: float = 2.0) -> Any:
    return await get_client().request(subject, data, timeout)

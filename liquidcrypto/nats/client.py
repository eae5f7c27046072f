"""The NATS client: connection with degraded mode, provisioning, health, JSON messaging.

``NatsClient`` owns one nats-py connection. ``connect()`` never raises because NATS is
down: the client logs ``[Server] NATS not available - running in degraded mode`` once,
keeps trying in the background with jittered back-off, and becomes ``connected`` by
itself. Once connected, nats-py reconnects for ever (``max_reconnect_attempts=-1``) and
every (re)connection ensures the JetStream resources (the spec's streams, and what
components asked for with ``require``) and runs the ``on_connect`` callbacks.

The module-level functions (``init_nats``, ``publish``...) act on one default client,
as in the spec.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from functools import lru_cache
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, PubAck
from nats.js.errors import NoStreamResponseError, TooManyStalledMsgsError
from prometheus_client import Counter, Gauge

from liquidcrypto import codec
from liquidcrypto.config import Settings
from liquidcrypto.errors import (
    LiquidNatsError,
    NatsUnavailableError,
    RequestTimeoutError,
    StreamConflictError,
)
from liquidcrypto.nats import headers as hdr
from liquidcrypto.nats import hooks, streams, subjects
from liquidcrypto.nats.options import connect_options, describe, jittered_delay, redact_url
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
from liquidcrypto.nats.tasks import TaskSet

__all__ = [
    "DEGRADED_LINE",
    "ConnectionState",
    "NatsClient",
    "close_nats",
    "empty_health",
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

CONNECTED = Gauge("liquidcrypto_nats_connected", "1 while the (last) NATS client is connected and provisioned")
RECONNECTS = Counter("liquidcrypto_nats_reconnects", "NATS reconnections")
DISCONNECTS = Counter("liquidcrypto_nats_disconnects", "NATS connections lost or never made (degraded mode)")
SLOW_CONSUMERS = Counter(
    "liquidcrypto_nats_slow_consumer_events", "Messages dropped by a subscription over its pending limits"
)

DEGRADED_LINE = "[Server] NATS not available - running in degraded mode"

ConnectCallback = Callable[["NatsClient"], Awaitable[None]]

_YIELD_EVERY = 256
PROVISION_TIMEOUT = 15.0
SUBSCRIBE_FLUSH_TIMEOUT = 5.0  # seconds a subscribe waits for the server to confirm it


class ConnectionState(StrEnum):
    """Where a client stands."""

    NEW = "new"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DEGRADED = "degraded"
    CLOSED = "closed"


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
            **options: passed to ``nats.connect`` over our defaults.
        """
        self.settings = settings or Settings.from_env()
        if url is not None:
            self.settings = _replace_url(self.settings, url)
        self.servers = self.settings.nats_servers()
        self._provision = provision
        self._options = options
        self.state = ConnectionState.NEW
        self._nc: NatsConnection | None = None
        self._js: JetStreamContext | None = None
        self._connected = asyncio.Event()
        self._first_failure = asyncio.Event()
        self._pending_nc: NatsConnection | None = None
        self._background = TaskSet()
        self._subscriptions: set[Subscription] = set()
        self._on_connect: list[ConnectCallback] = []
        self._on_close: list[Callable[[], Awaitable[None]]] = []
        self._publish_count = 0
        self.slow_consumer_events = 0
        self.reconnects = 0
        self.last_error: str | None = None
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

        Returns as soon as the client is connected, or the first attempt failed, or the
        connect timeout passed — whichever comes first. It never raises because NATS is down.

        Args:
            wait: if given, wait up to this many seconds to be connected, then raise
                ``NatsUnavailableError`` (for callers that cannot run degraded).

        Returns:
            the client itself, connected or degraded.
        """
        if self.state is ConnectionState.CLOSED:
            raise LiquidNatsError("client is closed")
        if self.state is not ConnectionState.NEW:
            return self
        self.state = ConnectionState.CONNECTING
        # nats-py retries the initial connect for ever when max_reconnect_attempts=-1;
        # run it as an owned task and stop waiting at the first failure.
        self._background.spawn(self._initial_connect(), "nats-connect")
        first = asyncio.ensure_future(self._first_failure.wait())
        connected = asyncio.ensure_future(self._connected.wait())
        timeout = float(self.connect_options()["connect_timeout"]) + 1
        await asyncio.wait({first, connected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if self._nc is not None and not self._connected.is_set():
            # Connected, still provisioning (a cluster electing its stream leaders).
            await asyncio.wait({connected}, timeout=PROVISION_TIMEOUT)
        connected.cancel()
        if not self._connected.is_set():
            self._enter_degraded()
        if wait is not None:
            await self.wait_connected(wait)
        return self

    async def _initial_connect(self) -> None:
        nc = NatsConnection()
        self._pending_nc = nc
        try:
            await nc.connect(**self.connect_options())
        finally:
            self._pending_nc = None
        if self.state is ConnectionState.CLOSED:
            await nc.close()
            return
        self._nc = nc
        self._js = nc.jetstream(timeout=5)
        if self.state is ConnectionState.DEGRADED:
            log.info("NATS reachable at %s; leaving degraded mode", self.display_url)
        await self._reprovision()

    async def wait_connected(self, timeout: float) -> None:
        """Wait until connected and provisioned.

        Raises:
            NatsUnavailableError: not connected within ``timeout`` seconds.
        """
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise NatsUnavailableError(
                f"NATS at {self.display_url} not connected within {timeout:g} s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            ) from None

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
        self.state = ConnectionState.CLOSED
        self._connected.clear()
        CONNECTED.set(0)
        pending = self._pending_nc
        await self._background.cancel()
        if pending is not None and not pending.is_closed:
            await pending.close()
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.debug("drain failed (%s); closing", exc)
            if not nc.is_closed:
                try:
                    await nc.close()
                except Exception as exc:  # noqa: BLE001 - e.g. ConnectionResetError with a dead server
                    log.debug("close failed (%s)", exc)
        self._subscriptions.clear()

    def on_connect(self, callback: ConnectCallback) -> None:
        """Run ``callback(client)`` after every (re)connection and provisioning.

        If the client is connected now, the callback also runs at the next reconnect only;
        callers that need it now call it themselves.
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
    def display_url(self) -> str:
        return ",".join(redact_url(u) for u in self.servers)

    @property
    def is_connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected and self.state is ConnectionState.CONNECTED

    @property
    def nc(self) -> NatsConnection:
        """The nats-py connection.

        Raises:
            NatsUnavailableError: there is none (degraded or closed).
        """
        if self._nc is None or self._nc.is_closed:
            raise NatsUnavailableError(f"NATS at {self.display_url} is not available ({self.state})")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the connection (see ``nc``)."""
        if self._js is None:
            raise NatsUnavailableError(f"NATS at {self.display_url} is not available ({self.state})")
        return self._js

    @property
    def server_id(self) -> str | None:
        """The id of the server this client is connected to (``None`` when not connected)."""
        if self._nc is None or not self._nc.is_connected:
            return None
        return hooks.server_id(self._nc)

    @property
    def stream_conflicts(self) -> list[StreamConflictError]:
        """The streams found with another retention policy (left as they are), one error each."""
        return [exc for group in self._conflicts.values() for exc in group]

    # -- connecting ------------------------------------------------------------

    def connect_options(self) -> dict[str, Any]:
        """The nats-py options of this client: settings, our callbacks, then caller overrides."""
        opts = connect_options(self.settings)
        opts.update(
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
        )
        opts.update(self._options)
        return opts

    def _enter_degraded(self) -> None:
        # Only from CONNECTING: a connection that became CONNECTED meanwhile stays so.
        if self.state is ConnectionState.CONNECTING:
            self.state = ConnectionState.DEGRADED
            DISCONNECTS.inc()
            log.warning(DEGRADED_LINE)
            log.warning("NATS at %s: %s; retrying in the background", self.display_url, self.last_error or "no answer")

    async def _after_connect(self) -> None:
        """Provision, re-establish pending subscriptions, run callbacks; then mark connected."""
        nc = self.nc
        await self.provision()
        # CONNECTED first: a subscribe() racing with this loop then establishes its own
        # subscription (establishing is idempotent), so none is missed or made twice.
        self.state = ConnectionState.CONNECTED
        for sub in list(self._subscriptions):
            await sub._establish(nc)
        self._connected.set()
        CONNECTED.set(1)
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

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_events += 1
            SLOW_CONSUMERS.inc()
            log.warning("slow consumer on %s (sid %s): messages dropped", exc.subject, exc.sid)
            return
        self.last_error = describe(exc)
        if self.state is ConnectionState.CONNECTING:
            self._first_failure.set()
        log.debug("NATS error: %s", self.last_error)

    async def _on_disconnected(self) -> None:
        if self.state is ConnectionState.CONNECTED:
            self.state = ConnectionState.DEGRADED
            self._connected.clear()
            CONNECTED.set(0)
            DISCONNECTS.inc()
            log.warning("NATS disconnected from %s; reconnecting", self.display_url)

    async def _on_reconnected(self) -> None:
        self.reconnects += 1
        RECONNECTS.inc()
        log.info("NATS reconnected to %s", self.server_id)
        # Provision in an owned task: nats-py awaits this callback in its read path.
        self._background.spawn(self._reprovision(), "nats-reprovision")

    async def _reprovision(self) -> None:
        attempt = 0
        while self.state is not ConnectionState.CLOSED:
            try:
                await self._after_connect()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retry; JetStream may not be ready yet
                attempt += 1
                self.last_error = describe(exc)
                log.warning("provisioning after reconnect failed (%s); retrying", self.last_error)
                await asyncio.sleep(jittered_delay(attempt))

    async def _on_closed(self) -> None:
        if self.state is not ConnectionState.CLOSED:
            log.warning("NATS connection closed unexpectedly")
            self.state = ConnectionState.DEGRADED
            self._connected.clear()
            CONNECTED.set(0)

    # -- health ----------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        """The spec's health shape.

        ``{"connected": bool, "server": str|None, "rtt": ms|None,
        "jetstream": {"enabled": bool, "streams": int}}`` where ``streams`` counts the
        spec's three streams (``streams.SPEC_STREAMS``) that exist.
        """
        out = empty_health()
        if not self.is_connected:
            return out
        nc = self.nc
        try:
            # A PING/PONG timed with perf_counter: uvloop's loop.time() (used by nc.rtt)
            # ticks in whole milliseconds.
            start = time.perf_counter()
            await nc.flush(timeout=2)
            rtt = time.perf_counter() - start
        except Exception:  # noqa: BLE001 - health reports, never raises
            return out
        out["connected"] = True
        out["server"] = self.server_id
        out["rtt"] = round(rtt * 1000, 3)
        try:
            infos = await asyncio.wait_for(self.js.streams_info(), timeout=2)
        except Exception:  # noqa: BLE001
            return out
        names = {i.config.name for i in infos}
        out["jetstream"] = {"enabled": True, "streams": sum(n in names for n in streams.SPEC_STREAMS.stream_names)}
        return out

    # -- messaging -------------------------------------------------------------

    async def publish(self, subject: str, data: Any, headers: dict[str, str] | None = None) -> None:
        """Publish ``data`` as JSON on core NATS.

        While reconnecting, messages wait in nats-py's reconnect buffer.

        Raises:
            InvalidSubjectError: the subject is invalid.
            InvalidPayloadError: ``data`` is not JSON-able.
            NatsUnavailableError: NATS is absent or the reconnect buffer is full.
        """
        payload = codec.encode(data)
        await self.publish_raw(_checked_subject(subject), payload, headers)

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish bytes on an already validated subject (hot paths)."""
        try:
            await self.nc.publish(subject, payload, headers=headers)
        except nats.errors.OutboundBufferLimitError as exc:
            raise NatsUnavailableError(
                f"NATS reconnect buffer full while publishing to {subject!r}; message not sent"
            ) from exc
        except nats.errors.ConnectionClosedError as exc:
            raise NatsUnavailableError(f"NATS connection closed; message to {subject!r} not sent") from exc
        # nats-py's publish never yields; a hot loop would starve subscribers here.
        self._publish_count += 1
        if self._publish_count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)

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

        Returns:
            the ``PubAck`` (``.seq``, ``.duplicate``, ``.stream``).

        Raises:
            NatsUnavailableError: it could not be stored (no connection, no stream, timeout).
        """
        hdrs = dict(headers) if headers else {}
        if msg_id is not None:
            hdrs[hdr.MSG_ID] = msg_id
        return await self.js_publish_raw(_checked_subject(subject), codec.encode(data), hdrs or None, timeout=timeout)

    async def js_publish_raw(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, timeout: float = 5.0
    ) -> PubAck:
        """``js_publish`` for bytes on an already validated subject (hot paths).

        Raises:
            NatsUnavailableError: it could not be stored (no connection, no stream, timeout).
        """
        try:
            return await self.js.publish(subject, payload, timeout=timeout, headers=headers)
        except NoStreamResponseError as exc:
            raise NatsUnavailableError(f"no JetStream stream stored {subject!r}") from exc
        except (nats.errors.TimeoutError, TimeoutError) as exc:
            raise NatsUnavailableError(f"JetStream did not acknowledge {subject!r} within {timeout:g} s") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise NatsUnavailableError(f"NATS unavailable; {subject!r} not stored") from exc

    async def js_publish_async_raw(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None, *, stall: float | None = None
    ) -> asyncio.Future[PubAck]:
        """Start a JetStream publish on a validated subject; the future resolves on its ack.

        nats-py bounds the pending acknowledgements; a full window waits up to ``stall``
        seconds for a slot.

        Raises:
            NatsUnavailableError: NATS is unavailable, or no slot freed up within ``stall``.
        """
        try:
            return await self.js.publish_async(subject, payload, wait_stall=stall, headers=headers)
        except TooManyStalledMsgsError as exc:
            raise NatsUnavailableError(f"{subject!r}: no JetStream acknowledgement slot within {stall:g} s") from exc
        except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise NatsUnavailableError(f"NATS unavailable; {subject!r} not stored") from exc

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
            await sub._establish(self.nc)
            await self.settle_subscriptions()
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

        Raises:
            RequestTimeoutError: no reply within ``timeout`` seconds, or no responder.
            NatsUnavailableError: NATS is not available.
        """
        subject = _checked_subject(subject)
        payload = codec.encode(data)
        try:
            msg = await self.nc.request(subject, payload, timeout=timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError) as exc:
            raise RequestTimeoutError(subject, timeout) from exc
        except nats.errors.ConnectionClosedError as exc:
            raise NatsUnavailableError(f"NATS connection closed; request to {subject!r} not sent") from exc
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
    await nc.flush(timeout=max(1, round(timeout)))


def empty_health() -> dict[str, Any]:
    """The health of a client that is not connected."""
    return {"connected": False, "server": None, "rtt": None, "jetstream": {"enabled": False, "streams": 0}}


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

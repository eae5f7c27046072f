"""The connection under a ``NatsClient``: connecting, degraded mode and reconnect supervision.

``Connection`` owns the nats-py connection and its state:

- **Connecting.** The first attempt runs as an owned task; ``start()`` returns once
  connected, or when every server of the pool failed once (degraded mode), and the task
  keeps trying. A server that answers while JetStream does not (a cluster electing its
  leaders) is not degraded: the state is ``provisioning`` until the streams are ensured.
- **Watchdog.** nats-py's read loop can end without reconnecting (an unexpected error in
  it) while the connection still says *connected*; a watchdog task notices it within
  ``WATCHDOG_INTERVAL`` seconds (two looks in a row) and forces a reconnect
  (``hooks.read_loop_stopped``, ``hooks.force_reconnect``).
- **Reconnecting.** nats-py reconnects a connection by itself (for ever, with our
  options). A connection nats-py reports *closed* without ``close()`` having been
  called — the server closed it after a protocol error such as an over-size message, or
  nats-py gave up — is never the end: the client is degraded meanwhile (health says so)
  and a fresh connect loop starts, with capped, jittered back-off.
- **Re-establishing.** Every (re)connection bumps ``generation`` and starts one
  re-establishment round (the client's provisioning, subscriptions and ``on_connect``
  callbacks) as a single owned task. A newer connection — or losing this one — cancels
  the running round, and the next round starts only once the cancelled one has ended:
  two rounds never run side by side, so no callback re-subscribes twice at once.
- nats-py's callbacks are bound to the connection they came with: those of a
  connection that was replaced are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext
from prometheus_client import Counter, Gauge

from liquidcrypto.nats import hooks
from liquidcrypto.nats.options import describe, jittered_delay
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

CONNECTED = Gauge("liquidcrypto_nats_connected", "1 while the (last) NATS client is connected and provisioned")
RECONNECTS = Counter("liquidcrypto_nats_reconnects", "NATS reconnections")
DISCONNECTS = Counter("liquidcrypto_nats_disconnects", "NATS connections lost or never made (degraded mode)")
FRESH_CONNECTS = Counter(
    "liquidcrypto_nats_fresh_connects", "NATS connections closed without close() and replaced by a new one"
)
SLOW_CONSUMERS = Counter(
    "liquidcrypto_nats_slow_consumer_events",
    "Messages dropped by a subscription over its pending limits, and connections the server cut (slow consumer)",
)

DEGRADED_LINE = "[Server] NATS not available - running in degraded mode"
PROVISION_TIMEOUT = 15.0
STABLE_AFTER = 30.0  # seconds a connection must live before its close restarts the back-off
WATCHDOG_INTERVAL = 0.25  # seconds between two looks at nats-py's read loop
_CALLBACKS = ("error_cb", "disconnected_cb", "reconnected_cb", "closed_cb")

Establish = Callable[[NatsConnection], Awaitable[None]]


class ConnectionState(StrEnum):
    """Where a client stands."""

    NEW = "new"
    CONNECTING = "connecting"
    PROVISIONING = "provisioning"
    """Connected to a server; JetStream not answering yet (streams being ensured)."""
    CONNECTED = "connected"
    DEGRADED = "degraded"
    CLOSED = "closed"


class Connection:
    """The nats-py connection of one client, kept alive until ``close()``.

    Args:
        options: returns the nats-py ``connect`` options (settings and caller overrides);
            callbacks in it are called after ours.
        establish: the re-establishment round, run after every (re)connection; it calls
            ``set_connected()`` and ``set_ready()`` as it gets there.
        display_url: the servers, credentials redacted, for logs.
    """

    def __init__(self, options: Callable[[], dict[str, Any]], establish: Establish, display_url: str) -> None:
        self._options = options
        self._establish = establish
        self.display_url = display_url
        self.state = ConnectionState.NEW
        self.nc: NatsConnection | None = None
        self.js: JetStreamContext | None = None
        self.generation = 0
        self.ready = asyncio.Event()
        self.reconnects = 0
        self.fresh_connects = 0
        self.slow_consumer_events = 0
        self.server_cuts = 0
        self.last_error: str | None = None
        self._eof_from: str | None = None  # the server that closed our socket, until we are back
        self._first_failure = asyncio.Event()
        self._pending_nc: NatsConnection | None = None
        self._round: asyncio.Task[None] | None = None
        self._tasks = TaskSet()
        self._installed_at = 0.0
        self._closes = 0
        self._failed_attempts = 0
        self._pool_size = 1

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting; return once connected, or once every server of the pool
        failed (then degraded), or after the connect timeout for each of them.
        A server that answers while JetStream does not leaves the state ``provisioning``
        (not degraded) after ``PROVISION_TIMEOUT``. Never raises because NATS is down."""
        self.state = ConnectionState.CONNECTING
        hooks.strict_message_parser()  # a \v or \f in a subject must not drop the connection
        options = self._options()
        servers = options.get("servers")
        self._pool_size = len(servers) if isinstance(servers, list) and servers else 1
        # nats-py retries the initial connect for ever when max_reconnect_attempts=-1;
        # run it as an owned task and stop waiting once each server has failed once.
        self._tasks.spawn(self._connect_loop(0), "nats-connect")
        self._tasks.spawn(self._watchdog(), "nats-watchdog")
        first = asyncio.ensure_future(self._first_failure.wait())
        ready = asyncio.ensure_future(self.ready.wait())
        timeout = float(options.get("connect_timeout", 2)) * self._pool_size + 1
        await asyncio.wait({first, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if self.nc is not None and not self.ready.is_set():
            # Connected, still provisioning (a cluster electing its stream leaders).
            await asyncio.wait({ready}, timeout=PROVISION_TIMEOUT)
        ready.cancel()
        if self.state is ConnectionState.PROVISIONING and not self.ready.is_set():
            log.warning(
                "NATS connected at %s but JetStream is not answering yet (%s); provisioning in the background",
                self.display_url,
                self.last_error or "no answer",
            )
        elif not self.ready.is_set() and self.state in (ConnectionState.CONNECTING, ConnectionState.DEGRADED):
            # A connection that became CONNECTED meanwhile stays so; one lost while
            # provisioning is already counted.
            if self.state is ConnectionState.CONNECTING:
                DISCONNECTS.inc()
            self.state = ConnectionState.DEGRADED
            log.warning(DEGRADED_LINE)
            log.warning("NATS at %s: %s; retrying in the background", self.display_url, self.last_error or "no answer")

    async def wait_linked(self, deadline: float) -> bool:
        """Wait until a server is connected (core NATS works), up to the monotonic
        ``deadline``; whether it is."""
        while not self.linked:
            if self._closing() or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return True

    async def wait_ready(self, deadline: float) -> bool:
        """Wait until connected and provisioned, up to the monotonic ``deadline``; whether it is."""
        while not (self.ready.is_set() and self.is_connected):
            remaining = deadline - time.monotonic()
            if self._closing() or remaining <= 0:
                return False
            # ready can be set a moment before the socket is seen down: poll too.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ready.wait(), min(remaining, 0.25))
            if self.ready.is_set() and not self.is_connected:
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return True

    @property
    def linked(self) -> bool:
        """A server is connected (core NATS works), provisioned or not."""
        nc = self.nc
        return nc is not None and nc.is_connected

    async def close(self) -> None:
        """Stop every background task, drain and close the connection; idempotent."""
        if self.state is ConnectionState.CLOSED:
            return
        self.state = ConnectionState.CLOSED
        self.ready.clear()
        CONNECTED.set(0)
        pending = self._pending_nc
        await self._tasks.cancel()
        if pending is not None and not pending.is_closed:
            await _close_quietly(pending)
        nc, self.nc, self.js = self.nc, None, None
        if nc is not None and not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), timeout=5)
            except Exception as exc:  # noqa: BLE001 - closing must not raise
                log.debug("drain failed (%s); closing", exc)
            await _close_quietly(nc)

    # -- called by the re-establishment round ------------------------------------

    def set_connected(self) -> None:
        """The round provisioned: new subscriptions are made at once from now on."""
        self.state = ConnectionState.CONNECTED

    def set_ready(self) -> None:
        """The round re-subscribed everything: the client is connected (health, waiters)."""
        self.ready.set()
        CONNECTED.set(1)

    def _closing(self) -> bool:
        # A method, so that type checkers do not narrow ``state`` across awaits.
        return self.state is ConnectionState.CLOSED

    @property
    def is_connected(self) -> bool:
        """Connected, provisioned, and the socket is up."""
        return self.nc is not None and self.nc.is_connected and self.state is ConnectionState.CONNECTED

    # -- connecting ------------------------------------------------------------

    async def _connect_loop(self, attempt: int) -> None:
        """Make a new nats-py connection until one connects (or ``close()``)."""
        while self.state is not ConnectionState.CLOSED:
            if attempt:
                await asyncio.sleep(jittered_delay(attempt))
            nc = NatsConnection()
            self._pending_nc = nc
            try:
                await nc.connect(**self._options_for(nc))
            except Exception as exc:  # noqa: BLE001 - nats-py gave up (e.g. max_reconnect_attempts set): again
                attempt += 1
                self.last_error = describe(exc)
                self._first_failure.set()
                log.warning("connecting to NATS at %s failed (%s); retrying", self.display_url, self.last_error)
                await _close_quietly(nc)
                continue
            finally:
                self._pending_nc = None
            if self._closing():  # close() ran while nc.connect() did
                await _close_quietly(nc)
                return
            self._install(nc)
            return

    def _install(self, nc: NatsConnection) -> None:
        self.nc, self.js = nc, nc.jetstream(timeout=5)
        self._installed_at = time.monotonic()
        if self.state is ConnectionState.DEGRADED:
            log.info("NATS reachable at %s; leaving degraded mode", self.display_url)
        self.state = ConnectionState.PROVISIONING
        self._start_round()

    async def _watchdog(self) -> None:
        """Force a reconnect when nats-py's read loop ended while the connection says
        connected (seen on two looks in a row, so a reconnect in progress is not hit)."""
        suspect: NatsConnection | None = None
        while not self._closing():
            await asyncio.sleep(WATCHDOG_INTERVAL)
            nc = self.nc
            if nc is None or not hooks.read_loop_stopped(nc):
                suspect = None
                continue
            if suspect is not nc:
                suspect = nc
                continue
            suspect = None
            log.warning(
                "NATS read loop of the connection to %s stopped while connected; reconnecting", self.display_url
            )
            try:
                await hooks.force_reconnect(nc)
            except Exception as exc:  # noqa: BLE001 - the watchdog must go on watching
                log.warning("forcing a NATS reconnect failed (%s)", describe(exc))

    def _options_for(self, nc: NatsConnection) -> dict[str, Any]:
        """nats-py options whose callbacks are bound to ``nc``: a replaced connection's
        callbacks are ignored. A caller's own callbacks run after ours."""
        opts = self._options()
        theirs = {name: opts.pop(name, None) for name in _CALLBACKS}

        async def chain(name: str, *args: Any) -> None:
            callback = theirs[name]
            if callback is not None:
                await callback(*args)

        async def error_cb(exc: Exception) -> None:
            self._on_error(exc)
            await chain("error_cb", exc)

        async def disconnected_cb() -> None:
            if nc is self.nc:
                self._on_disconnected()
            await chain("disconnected_cb")

        async def reconnected_cb() -> None:
            if nc is self.nc:
                self._on_reconnected()
            await chain("reconnected_cb")

        async def closed_cb() -> None:
            if nc is self.nc:
                self._on_closed()
            await chain("closed_cb")

        opts.update(
            error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb, closed_cb=closed_cb
        )
        return opts

    # -- nats-py events ----------------------------------------------------------

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumer_events += 1
            SLOW_CONSUMERS.inc()
            log.warning("slow consumer on %s (sid %s): messages dropped", exc.subject, exc.sid)
            return
        if isinstance(exc, nats.errors.UnexpectedEOF) and self.nc is not None:
            self._eof_from = hooks.server_id(self.nc)
        self.last_error = describe(exc)
        if self.state is ConnectionState.CONNECTING:
            # nats-py moves on to the next server after each failure: degraded only once
            # every server of the pool has failed.
            self._failed_attempts += 1
            if self._failed_attempts >= self._pool_size:
                self._first_failure.set()
        log.debug("NATS error: %s", self.last_error)

    def _on_disconnected(self) -> None:
        self._cancel_round()
        if self.state in (ConnectionState.CONNECTED, ConnectionState.PROVISIONING):
            self._lost()
            log.warning("NATS disconnected from %s; reconnecting", self.display_url)

    def _on_reconnected(self) -> None:
        if self.state is ConnectionState.CLOSED:
            return
        self.reconnects += 1
        RECONNECTS.inc()
        log.info("NATS reconnected to %s", self.display_url)
        self.state = ConnectionState.PROVISIONING
        self._count_server_cut()
        self._start_round()

    def _count_server_cut(self) -> None:
        """The server closed our socket and we are back on the same server (same id, so
        it did not restart): nats-server sends no ``-ERR`` when it cuts a slow consumer
        (its pending bytes for us over ``max_pending``, or its write deadline passed), so
        this is how one shows here. Counted as a slow-consumer event; an operator's kick
        would count too (the server log tells which)."""
        eof_from, self._eof_from = self._eof_from, None
        if eof_from is None or self.nc is None or hooks.server_id(self.nc) != eof_from:
            return
        self.server_cuts += 1
        self.slow_consumer_events += 1
        SLOW_CONSUMERS.inc()
        log.warning(
            "NATS server %s closed this connection while staying up: most likely as a slow consumer "
            "(its max_pending for this client exceeded; see the server log)",
            eof_from,
        )

    def _on_closed(self) -> None:
        """nats-py closed the connection and will not reconnect it; we did not ask for it."""
        self._eof_from = None
        if self.state is ConnectionState.CLOSED:
            return
        self._cancel_round()
        if self.state in (ConnectionState.CONNECTED, ConnectionState.PROVISIONING):
            self._lost()
        self.state = ConnectionState.DEGRADED
        self.ready.clear()
        CONNECTED.set(0)
        self.nc, self.js = None, None
        if time.monotonic() - self._installed_at > STABLE_AFTER:
            self._closes = 0
        self._closes += 1
        self.fresh_connects += 1
        FRESH_CONNECTS.inc()
        why = self.last_error or "no reason given"
        log.warning("NATS connection to %s closed (%s); connecting afresh", self.display_url, why)
        self._tasks.spawn(self._connect_loop(self._closes), "nats-connect")

    def _lost(self) -> None:
        self.state = ConnectionState.DEGRADED
        self.ready.clear()
        CONNECTED.set(0)
        DISCONNECTS.inc()

    # -- one re-establishment round at a time -------------------------------------

    def _start_round(self) -> None:
        """Cancel the running round (if any) and start one for the connection of now."""
        self.generation += 1
        previous = self._cancel_round()
        self._round = self._tasks.spawn(self._run_round(self.generation, previous), f"nats-establish-{self.generation}")

    def _cancel_round(self) -> asyncio.Task[None] | None:
        previous, self._round = self._round, None
        if previous is not None and not previous.done():
            previous.cancel()
        return previous

    async def _run_round(self, generation: int, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # It was cancelled; let it unwind (its clean-ups run) before this one starts.
            await asyncio.wait([previous])
        attempt = 0
        while generation == self.generation and self.state is not ConnectionState.CLOSED:
            nc = self.nc
            if nc is None or not nc.is_connected:
                return  # the next (re)connection starts a new round
            try:
                await self._establish(nc)
                return
            except Exception as exc:  # noqa: BLE001 - retry; JetStream may not be ready yet
                attempt += 1
                self.last_error = describe(exc)
                log.warning("re-establishing after (re)connection failed (%s); retrying", self.last_error)
                await asyncio.sleep(jittered_delay(attempt))


async def _close_quietly(nc: NatsConnection) -> None:
    if nc.is_closed:
        return
    with contextlib.suppress(Exception):  # e.g. ConnectionResetError with a dead server
        await nc.close()

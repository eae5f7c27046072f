"""Health of a NATS connection, probed now: the spec's shape, bounded in time.

``probe`` answers ``{"connected", "server", "rtt", "jetstream": {"enabled", "streams"}}``:

- ``connected``: the server answered a PING within ``PROBE_TIMEOUT`` seconds, on a
  connection whose read loop runs (a connection that says *connected* but reads nothing
  is not);
- ``jetstream.enabled``: besides, the client is provisioned and JetStream listed the
  streams within ``PROBE_TIMEOUT`` seconds; ``streams`` counts the spec's three.

``is_healthy`` is both: the only case ``GET /api/v1/nats/health`` answers 200. A probe
takes at most about twice ``PROBE_TIMEOUT`` and never raises.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.client import Client as NatsConnection
from nats.js import JetStreamContext

from liquidcrypto.nats import hooks, streams

PROBE_TIMEOUT = 1.0
"""Seconds each probe (the PING, the JetStream stream list) may take."""


async def probe(nc: NatsConnection | None, js: JetStreamContext | None) -> dict[str, Any]:
    """The health of ``nc``; ``js`` is ``None`` while the client is not provisioned
    (JetStream then counts as not answering)."""
    out = empty_health()
    if nc is None or not nc.is_connected or hooks.read_loop_stopped(nc):
        return out
    try:
        # A PING/PONG timed with perf_counter: uvloop's loop.time() (used by nc.rtt)
        # ticks in whole milliseconds.
        start = time.perf_counter()
        await guarded_flush(nc, round(PROBE_TIMEOUT))
        rtt = time.perf_counter() - start
    except Exception:  # noqa: BLE001 - health reports, never raises
        return out
    out["connected"] = True
    out["server"] = hooks.server_id(nc)
    out["rtt"] = round(rtt * 1000, 3)
    if js is None:
        return out
    try:
        infos = await asyncio.wait_for(js.streams_info(), timeout=PROBE_TIMEOUT)
    except Exception:  # noqa: BLE001
        return out
    names = {i.config.name for i in infos}
    out["jetstream"] = {"enabled": True, "streams": sum(n in names for n in streams.SPEC_STREAMS.stream_names)}
    return out


def is_healthy(health: dict[str, Any]) -> bool:
    """Whether a health report says NATS and JetStream both answer (HTTP 200)."""
    return bool(health["connected"] and health["jetstream"]["enabled"])


def empty_health() -> dict[str, Any]:
    """The health of a client that is not connected."""
    return {"connected": False, "server": None, "rtt": None, "jetstream": {"enabled": False, "streams": 0}}


async def guarded_flush(nc: NatsConnection, timeout: int) -> None:
    """``nc.flush(timeout)`` that leaves the connection working when it times out or is
    cancelled: nats-py keeps the abandoned PONG future, and the late PONG then stops its
    read loop (``hooks.forget_abandoned_pongs``)."""
    try:
        await nc.flush(timeout=timeout)
    except BaseException:
        hooks.forget_abandoned_pongs(nc)
        raise

"""The only place that touches nats-py internals.

nats-py (2.9 to 2.16) has no public way to do these things this project needs:

- ``server_id``: the id of the server the connection is on, for the health report
  (``connected_server_version``, ``client_id`` and ``connected_url`` are public; the
  server's id is only in the private ``_server_info``).
- ``flush_pending``: wait until the client's flusher task has written the commands queued
  so far (``_flush_pending``), which makes ``flush()`` a real barrier (see
  ``liquidcrypto.nats.client.flush_barrier``).

- ``forget_abandoned_pongs``: nats-py (2.16) leaves the future of a ``flush()`` that timed
  out or was cancelled in its PONG queue (``_pongs``); when the PONG comes, setting that
  future's result raises ``InvalidStateError`` in the read loop, which then **stops
  reading** — no message arrives until missed pings (~30 s) force a reconnect. Each
  abandoned future is replaced by a fresh placeholder (the queue stays in step with the
  PINGs sent).
- ``read_loop_stopped`` / ``force_reconnect``: the watchdog of ``connection.py``. nats-py's
  read loop ends on an unexpected exception (it logs "encountered error" and returns)
  without reconnecting: the connection then says *connected* and reads nothing until
  missed pings force a reconnect. ``read_loop_stopped`` looks at its reader task
  (``_reading_task``); ``force_reconnect`` starts nats-py's own reconnection
  (``_process_op_err``, as a stale connection does).
- ``strict_message_parser``: nats-py's ``MSG``/``HMSG`` patterns split on any whitespace,
  which in bytes includes vertical tab (0x0b) and form feed (0x0c); nats-server allows both inside a subject,
  so any client publishing to ``agents.a<VT>b.events.x`` made every matching subscriber's
  parser fail ("malformed MSG") and drop its connection. The patterns are replaced by the
  protocol's own separators (space and tab).

Each access falls back to doing without when a nats-py release drops the attribute:
the health report then shows no server id, the barrier is plain ``flush()``,
abandoned PONG futures are left as they are, a stopped read loop is left to the ping
check (``NATS_PING_INTERVAL``), a forced reconnect closes the connection instead (the
client then connects afresh), and the parser keeps its patterns (a warning says so).
``tests/nats/test_hooks.py`` exercises both paths.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

log = logging.getLogger(__name__)


def server_id(nc: object) -> str | None:
    """The id of the server the connection ``nc`` talks to, or ``None`` if unknown."""
    info = getattr(nc, "_server_info", None)
    if not isinstance(info, Mapping):
        return None
    sid = info.get("server_id")
    return str(sid) if sid else None


async def flush_pending(nc: object, timeout: float) -> bool:
    """Wait until nats-py's flusher has written every command queued on ``nc`` so far.

    Args:
        timeout: seconds to wait (nats-py waits without a deadline otherwise).

    Returns:
        whether the wait happened (``False``: this nats-py has no such hook).

    Raises:
        TimeoutError: the flusher did not write within ``timeout``.
    """
    flush = getattr(nc, "_flush_pending", None)
    if flush is None:
        return False
    await asyncio.wait_for(flush(force_flush=True), timeout)
    return True


def forget_abandoned_pongs(nc: object) -> int:
    """Replace the cancelled futures in nats-py's PONG queue of ``nc`` by fresh ones.

    Returns:
        how many were replaced (0 also when this nats-py has no such queue).
    """
    pongs = getattr(nc, "_pongs", None)
    if not isinstance(pongs, list):
        return 0
    replaced = 0
    for i, future in enumerate(pongs):
        if isinstance(future, asyncio.Future) and future.cancelled():
            pongs[i] = asyncio.get_running_loop().create_future()
            replaced += 1
    return replaced


def read_loop_stopped(nc: object) -> bool:
    """Whether nats-py's read loop of ``nc`` has ended while ``nc`` says it is connected.

    ``False`` also when this nats-py has no such task (nothing can be told).
    """
    task = getattr(nc, "_reading_task", None)
    return isinstance(task, asyncio.Task) and task.done() and bool(getattr(nc, "is_connected", False))


async def force_reconnect(nc: object) -> bool:
    """Make nats-py drop the connection ``nc`` and reconnect, as for a stale connection.

    Returns:
        ``True`` when nats-py reconnects it; ``False`` when this nats-py has no such hook
        and ``nc`` was closed instead (a closed connection is replaced by a fresh one).
    """
    import nats.errors

    process_op_err = getattr(nc, "_process_op_err", None)
    if process_op_err is not None:
        await process_op_err(nats.errors.StaleConnectionError())
        return True
    close = getattr(nc, "close", None)
    if close is not None:
        await close()
    return False


# The protocol separates arguments with spaces or tabs (nats-server's parser); nothing else.
_STRICT_MSG = rb"\AMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)\r\n"
_STRICT_HMSG = rb"\AHMSG[ \t]+([^ \t\r\n]+)[ \t]+([^ \t\r\n]+)[ \t]+(([^ \t\r\n]+)[ \t]+)?(\d+)[ \t]+(\d+)\r\n"


def strict_message_parser() -> bool:
    """Make nats-py's message parser split only on the protocol's separators (idempotent).

    Returns ``False`` (and warns once) when the parser no longer has the patterns.
    """
    import re

    from nats.protocol import parser

    if getattr(parser, "MSG_RE", None) is None or getattr(parser, "HMSG_RE", None) is None:
        if not getattr(strict_message_parser, "warned", False):
            strict_message_parser.warned = True  # type: ignore[attr-defined]
            log.warning("nats-py's parser has no MSG_RE/HMSG_RE: a subject holding 0x0b or 0x0c may drop connections")
        return False
    parser.MSG_RE = re.compile(_STRICT_MSG)
    parser.HMSG_RE = re.compile(_STRICT_HMSG)
    return True

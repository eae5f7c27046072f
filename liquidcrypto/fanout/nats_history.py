"""History of a symbol from the ``TRADE_EVENTS`` stream, for ``since_seq`` / ``last`` requests.

The stream-range reader (``liquidcrypto.nats.ranges``) reads ``trades.{symbol}`` from a
start sequence, or its last N, up to the last stored message of the symbol.
"""

from __future__ import annotations

import logging

import nats.errors
from nats.js.errors import NotFoundError

from liquidcrypto.errors import NatsUnavailableError
from liquidcrypto.nats import ranges, subjects
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.streams import TRADE_EVENTS

log = logging.getLogger(__name__)

HISTORY_IDLE_TIMEOUT = 5.0


async def read_history(
    client: NatsClient, symbol: str, *, since_seq: int | None, last: int | None, limit: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """Stored trades of ``symbol`` after ``since_seq``, or its ``last`` N, at most ``limit``.

    More than ``limit`` trades after ``since_seq`` gives the newest ``limit`` of them.

    Returns:
        ``(items, complete)``: ``(seq, payload)`` in order, and whether nothing the
        client asked for was left out (expired from the 5-minute stream, or beyond
        ``limit``).

    Raises:
        NatsUnavailableError: NATS is not available.
    """
    subject = subjects.trade(symbol)
    js = client.js
    try:
        end = int((await js.get_last_msg(TRADE_EVENTS, subject)).seq or 0)
        first = int((await js.stream_info(TRADE_EVENTS)).state.first_seq or 0)
    except NotFoundError:
        return [], since_seq is None or since_seq == 0
    except (nats.errors.Error, TimeoutError) as exc:
        raise NatsUnavailableError(f"cannot read the history of {symbol!r}: {exc!r}") from exc
    complete = True
    start: ranges.Start = first
    if since_seq is not None:
        start = since_seq + 1
        if start < first:
            complete, start = since_seq == 0, first
        if start > end:
            return [], complete
        if await ranges.count(js, TRADE_EVENTS, subject, start) > limit:
            complete, last = False, limit
    if last is not None:
        want = min(last, limit)
        if want == 0:
            return [], complete
        start = ranges.Last(want)
    items: list[tuple[int, bytes]] = []
    async with ranges.read_range(
        client, TRADE_EVENTS, subject, start=start, end_seq=end, idle_timeout=HISTORY_IDLE_TIMEOUT
    ) as rng:
        async for msg in rng:
            items.append((msg.seq, msg.data))
    # Stalled: expired meanwhile, or NATS is gone; the reader logged it, the client gets what we have.
    return items, complete and rng.complete

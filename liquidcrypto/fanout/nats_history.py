"""History of a symbol from the ``TRADE_EVENTS`` stream, for ``since_seq`` / ``last`` requests.

``HistoryCursor`` plans a read once (where it starts, where it ends, how many trades at
most) and then reads it **page by page** through the stream-range reader
(``liquidcrypto.nats.ranges``). Pages read back to back share one consumer (a new
consumer takes ~30 ms to deliver its first message); ``pause()`` deletes it and drops
what it read ahead, and the next page starts a new one right after the last trade
returned. A paused cursor holds nothing on the server or in memory, so a replay to a
client that does not read simply waits, costing nothing (see ``fanout.replay``).
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

Page = list[tuple[int, bytes]]


class HistoryCursor:
    """Stored trades of one symbol, read in pages (open it with ``HistoryCursor.open``).

    Attributes:
        symbol: the symbol.
        complete: ``False`` once something the client asked for is known to be left out
            (expired from the 5-minute stream, beyond ``limit``, or the read stalled).
        done: nothing more to read.
        count: trades returned so far.
    """

    def __init__(
        self, client: NatsClient, symbol: str, *, start: ranges.Start, end: int, remaining: int, complete: bool
    ) -> None:
        self._client = client
        self.symbol = symbol
        self._subject = subjects.trade(symbol)
        self._start = start  # Last(n) until the first trade is read, then the next sequence
        self._end = end
        self._remaining = remaining
        self._range: ranges.StreamRange | None = None
        self.complete = complete
        self.done = remaining <= 0
        self.count = 0

    @classmethod
    async def open(
        cls,
        client: NatsClient,
        symbol: str,
        *,
        since_seq: int | None,
        last: int | None,
        limit: int,
        known_seq: int = 0,
    ) -> HistoryCursor:
        """Plan the history of ``symbol`` after ``since_seq``, or its ``last`` N, at most ``limit``.

        More than ``limit`` trades after ``since_seq`` gives the newest ``limit`` of them.
        Trades up to ``known_seq`` (what the client already has) are left out: asking
        again for a history already sent reads nothing. Nothing is read yet, and no
        consumer is left behind.

        Raises:
            NatsUnavailableError: NATS is not available.
        """
        subject = subjects.trade(symbol)
        js = client.js
        try:
            end = int((await js.get_last_msg(TRADE_EVENTS, subject)).seq or 0)
            first = int((await js.stream_info(TRADE_EVENTS)).state.first_seq or 0)
        except NotFoundError:
            return cls(client, symbol, start=None, end=0, remaining=0, complete=since_seq is None or since_seq == 0)
        except (nats.errors.Error, TimeoutError) as exc:
            raise NatsUnavailableError(f"cannot read the history of {symbol!r}: {exc!r}") from exc
        complete = True
        start: ranges.Start = first
        remaining = limit
        if known_seq >= end:
            return cls(client, symbol, start=None, end=end, remaining=0, complete=True)
        if since_seq is not None:
            since_seq = max(since_seq, known_seq)
            start = since_seq + 1
            if start < first:
                complete, start = since_seq == 0, first
            if start > end:
                return cls(client, symbol, start=None, end=end, remaining=0, complete=complete)
            if await ranges.count(js, TRADE_EVENTS, subject, start) > limit:
                complete, last = False, limit
        if last is not None:
            remaining = min(last, limit)
            start = ranges.Last(remaining)
            if known_seq >= first and await ranges.count(js, TRADE_EVENTS, subject, known_seq + 1) <= remaining:
                start = known_seq + 1  # the last N reach back past what the client has
        return cls(client, symbol, start=start, end=end, remaining=remaining, complete=complete)

    async def next_page(self, size: int) -> Page:
        """The next at most ``size`` trades ``(seq, payload)`` in order; empty when ``done``.

        Reads through the cursor's consumer, started if there is none (first page, or
        after ``pause()``); deleted once everything is read.

        Raises:
            NatsUnavailableError: NATS is not available.
        """
        if self.done or size <= 0:
            return []
        rng = self._range
        if rng is None:
            rng = ranges.read_range(
                self._client,
                TRADE_EVENTS,
                self._subject,
                start=self._start,
                end_seq=self._end,
                limit=self._remaining,
                idle_timeout=HISTORY_IDLE_TIMEOUT,
            )
            await rng.__aenter__()
            self._range = rng
            if isinstance(self._start, int) and self._start < rng.first_seq and self.count:
                self.complete = False  # part of the rest expired while the cursor was paused
        want = min(size, self._remaining)
        page: Page = []
        try:
            while len(page) < want:
                try:
                    msg = await anext(rng)
                except StopAsyncIteration:
                    break
                page.append((msg.seq, msg.data))
        finally:
            self.count += len(page)
            self._remaining -= len(page)
            if page:
                self._start = page[-1][0] + 1
        if rng.end is not None or self._remaining <= 0:
            # COMPLETE: up to the end. STALLED: expired meanwhile, or NATS is gone (the
            # reader logged it); the client gets what was read. LIMIT: all that was asked.
            self.done = True
            self.complete = self.complete and rng.end is not ranges.RangeEnd.STALLED
            await self.pause()
        return page

    async def pause(self) -> None:
        """Delete the consumer and what it read ahead; the next page starts a new one. Idempotent."""
        rng, self._range = self._range, None
        if rng is not None:
            await rng.close()

    async def close(self) -> None:
        """Stop reading (``done``) and delete the consumer. Idempotent."""
        self.done = True
        await self.pause()


async def read_history(
    client: NatsClient, symbol: str, *, since_seq: int | None, last: int | None, limit: int
) -> tuple[Page, bool]:
    """Stored trades of ``symbol`` after ``since_seq``, or its ``last`` N, at most ``limit``, at once.

    More than ``limit`` trades after ``since_seq`` gives the newest ``limit`` of them.
    (``/ws`` replays read a ``HistoryCursor`` page by page instead.)

    Returns:
        ``(items, complete)``: ``(seq, payload)`` in order, and whether nothing the
        client asked for was left out (expired from the 5-minute stream, or beyond
        ``limit``).

    Raises:
        NatsUnavailableError: NATS is not available.
    """
    cursor = await HistoryCursor.open(client, symbol, since_seq=since_seq, last=last, limit=limit)
    items: Page = []
    try:
        while not cursor.done:
            items += await cursor.next_page(ranges.BUFFER)
    finally:
        await cursor.close()
    return items, cursor.complete

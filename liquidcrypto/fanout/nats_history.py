"""History of a symbol from the ``TRADE_EVENTS`` stream, for ``since_seq`` / ``last`` requests.

An ephemeral ordered consumer reads ``trades.{symbol}`` from a start sequence up to the
last stored message of the symbol. ``last: N`` finds its start sequence by a binary
search over the ``num_pending`` of probe consumers (about log2(stream size) requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from liquidcrypto.nats import subjects
from liquidcrypto.nats.streams import TRADE_EVENTS

log = logging.getLogger(__name__)

HISTORY_IDLE_TIMEOUT = 5.0


async def read_history(
    js: JetStreamContext, symbol: str, *, since_seq: int | None, last: int | None, limit: int
) -> tuple[list[tuple[int, bytes]], bool]:
    """Stored trades of ``symbol`` after ``since_seq``, or its ``last`` N, at most ``limit``.

    Returns:
        ``(items, complete)``: ``(seq, payload)`` in order, and whether nothing the
        client asked for was left out (expired from the 5-minute stream, or beyond
        ``limit``).
    """
    subject = subjects.trade(symbol)
    jsm = js._jsm
    try:
        end = int((await jsm.get_last_msg(TRADE_EVENTS, subject)).seq or 0)
    except NotFoundError:
        return [], since_seq is None or since_seq == 0
    first = (await jsm.stream_info(TRADE_EVENTS)).state.first_seq
    complete = True
    start = first
    if since_seq is not None:
        start = since_seq + 1
        if start < first:
            complete, start = since_seq == 0, first
        if start > end:
            return [], complete
        if await _count(js, subject, start) > limit:
            complete, last = False, limit
    if last is not None:
        want = min(last, limit)
        if want == 0:
            return [], complete
        start = await _start_for_last(js, subject, first, end, want)
    items, finished = await _read(js, subject, start, end)
    return items, complete and finished


async def _count(js: JetStreamContext, subject: str, start: int) -> int:
    """Messages on ``subject`` with sequence >= ``start`` (an ephemeral consumer's pending)."""
    jsm = js._jsm
    info = await jsm.add_consumer(
        TRADE_EVENTS,
        ConsumerConfig(
            filter_subject=subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=5.0,
        ),
    )
    with contextlib.suppress(nats.errors.Error, TimeoutError):
        await jsm.delete_consumer(TRADE_EVENTS, info.name)
    return int(info.num_pending or 0)


async def _start_for_last(js: JetStreamContext, subject: str, first: int, end: int, want: int) -> int:
    """The highest start sequence from which at least ``want`` messages remain."""
    lo, hi = first, end
    if await _count(js, subject, lo) <= want:
        return lo
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if await _count(js, subject, mid) >= want:
            lo = mid
        else:
            hi = mid - 1
    return lo


async def _read(js: JetStreamContext, subject: str, start: int, end: int) -> tuple[list[tuple[int, bytes]], bool]:
    items: list[tuple[int, bytes]] = []
    done = False
    progress = asyncio.Event()

    async def callback(msg: Msg) -> None:
        nonlocal done
        seq = msg.metadata.sequence.stream
        if seq <= end and not done:
            items.append((seq, msg.data))
        done = done or seq >= end
        progress.set()

    sub = await js.subscribe(
        subject,
        cb=callback,
        stream=TRADE_EVENTS,
        ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
    )
    try:
        while not done:
            progress.clear()
            try:
                await asyncio.wait_for(progress.wait(), HISTORY_IDLE_TIMEOUT)
            except TimeoutError:
                # Expired meanwhile, or NATS is gone: send what we have, say it is partial.
                log.warning("history of %s stalled at %d messages (up to seq %d)", subject, len(items), end)
                break
    finally:
        with contextlib.suppress(nats.errors.Error, TimeoutError):
            await sub.unsubscribe()
    return items, done

"""Reading the ``A2A_TASKS`` stream's history (``replay``) with the stream-range reader."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.errors import InvalidPayloadError, RequestTimeoutError
from liquidcrypto.nats import ranges, streams
from liquidcrypto.nats.client import NatsClient

log = logging.getLogger(__name__)

Since = datetime | timedelta | int | None


def start_of(since: Since) -> ranges.Start:
    """The range start for ``since`` (a datetime, a timedelta back from now, a stream seq).

    Raises:
        ValueError: anything else.
    """
    if since is None or isinstance(since, datetime):
        return since
    if isinstance(since, timedelta):
        return datetime.now(UTC) - since
    if isinstance(since, int) and not isinstance(since, bool) and since > 0:
        return since
    raise ValueError(f"since={since!r} must be a datetime, a timedelta or a stream sequence >= 1")


async def replay(
    client: NatsClient, subject: str, since: Since = None, *, limit: int | None = None
) -> AsyncIterator[Envelope]:
    """Yield the stored envelopes on ``subject`` (a pattern) from ``since`` to now, in order.

    It reads what was stored when the call started (later messages are live traffic, not
    history); its consumer is deleted at the end. Unreadable messages are logged and
    skipped (they do not count towards ``limit``).

    Raises:
        ValueError: ``since`` is not a valid start.
        RequestTimeoutError: the stream stopped delivering before the end of the history.
    """
    start = start_of(since)
    if limit is not None and limit <= 0:
        return
    count = 0
    async with ranges.read_range(client, streams.A2A_TASKS, subject, start=start) as rng:
        async for msg in rng:
            try:
                envelope = env_mod.decode(msg.data, msg.subject, msg.headers)
            except InvalidPayloadError as exc:
                log.warning("replay %s: skipping seq %s: %s", subject, msg.seq, exc)
                continue
            yield envelope
            count += 1
            if limit is not None and count >= limit:
                return
    if rng.end is ranges.RangeEnd.STALLED:
        raise RequestTimeoutError(subject, ranges.IDLE_TIMEOUT)

"""Reading the ``A2A_TASKS`` stream's history (``replay``) with a short-lived consumer."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from liquidcrypto.a2a import envelope as env_mod
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.errors import InvalidPayloadError
from liquidcrypto.nats import streams

log = logging.getLogger(__name__)

Since = datetime | timedelta | int | None


def start_of(since: Since) -> tuple[DeliverPolicy, dict[str, Any]]:
    """The consumer start for ``since`` (a datetime, a timedelta back from now, a stream seq).

    Raises:
        ValueError: anything else.
    """
    if since is None:
        return DeliverPolicy.ALL, {}
    if isinstance(since, timedelta):
        return DeliverPolicy.BY_START_TIME, {"opt_start_time": datetime.now(UTC) - since}
    if isinstance(since, datetime):
        return DeliverPolicy.BY_START_TIME, {"opt_start_time": since}
    if isinstance(since, int) and not isinstance(since, bool) and since > 0:
        return DeliverPolicy.BY_START_SEQUENCE, {"opt_start_seq": since}
    raise ValueError(f"since={since!r} must be a datetime, a timedelta or a stream sequence >= 1")


async def replay(
    js: JetStreamContext, subject: str, since: Since = None, *, limit: int | None = None
) -> AsyncIterator[Envelope]:
    """Yield the stored envelopes on ``subject`` (a pattern) from ``since`` to now, in order.

    An ephemeral in-memory consumer reads what was stored when the call started (later
    messages are live traffic, not history) and is deleted at the end. Unreadable
    messages are logged and skipped.
    """
    policy, start = start_of(since)
    name = env_mod.new_id()
    config = ConsumerConfig(
        name=name, filter_subject=subject, deliver_policy=policy, ack_policy=AckPolicy.NONE,
        inactive_threshold=60.0, mem_storage=True, num_replicas=1, **start,
    )
    info = await js.add_consumer(streams.A2A_TASKS, config)
    remaining = info.num_pending or 0
    psub = await js.pull_subscribe_bind(consumer=name, stream=streams.A2A_TASKS) if remaining else None
    count = 0
    try:
        while psub is not None and remaining > 0:
            for msg in await psub.fetch(min(remaining, 256), timeout=5):
                remaining -= 1
                try:
                    envelope = env_mod.decode(msg.data, msg.subject, msg.headers)
                except InvalidPayloadError as exc:
                    log.warning("replay %s: skipping seq %s: %s", subject, msg.metadata.sequence.stream, exc)
                    continue
                yield envelope
                count += 1
                if limit is not None and count >= limit:
                    return
    finally:
        if psub is not None:
            await psub.unsubscribe()
        try:
            await js.delete_consumer(streams.A2A_TASKS, name)
        except Exception as exc:  # noqa: BLE001 - it expires by itself after 60 s anyway
            log.debug("replay consumer %s not deleted: %s", name, exc)

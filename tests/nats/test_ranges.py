"""The stream-range reader against a real nats-server: starts (sequence, time, last N),
bounds (end, limit), wildcard filters, empty ranges, flow control, gaps, and cleanup."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js.api import StorageType, StreamConfig

from liquidcrypto.errors import InvalidSubjectError
from liquidcrypto.nats import ranges
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.ranges import Last, RangeEnd, StoredMsg, StreamRange, read_range

STREAM = "RANGES"


@pytest.fixture
async def js_client(client: NatsClient) -> NatsClient:
    """``client`` with an empty stream ``RANGES`` on ``rng.>``."""
    await client.js.add_stream(StreamConfig(name=STREAM, subjects=["rng.>"], storage=StorageType.MEMORY))
    return client


async def put(client: NatsClient, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
    return int((await client.js.publish(subject, data, headers=headers)).seq)


async def put_many(client: NatsClient, subjects: list[str], size: int = 16) -> None:
    for i, subject in enumerate(subjects):
        await client.js.publish_async(subject, str(i).encode().ljust(size, b"."))
    await client.js.publish_async_completed()


async def read(client: NatsClient, subject: str, **kwargs: Any) -> tuple[list[StoredMsg], StreamRange]:
    async with read_range(client, STREAM, subject, **kwargs) as rng:
        msgs = [m async for m in rng]
    assert await client.js.consumers_info(STREAM) == [], "the range left a consumer behind"
    return msgs, rng


def seqs(msgs: list[StoredMsg]) -> list[int]:
    return [m.seq for m in msgs]


async def test_from_a_sequence_in_order_with_every_field(js_client: NatsClient) -> None:
    s1 = await put(js_client, "rng.a.1", b"one")
    await put(js_client, "rng.b.1", b"other")
    s3 = await put(js_client, "rng.a.2", b"two", {"X-Key": "v"})
    s4 = await put(js_client, "rng.a.1", b"three")
    msgs, rng = await read(js_client, "rng.a.>")
    assert seqs(msgs) == [s1, s3, s4] and rng.complete and not rng.truncated and rng.count == 3
    msgs, rng = await read(js_client, "rng.a.>", start=s3)
    assert rng.end is RangeEnd.COMPLETE
    assert [(m.seq, m.subject, m.data) for m in msgs] == [(s3, "rng.a.2", b"two"), (s4, "rng.a.1", b"three")]
    assert msgs[0].headers == {"X-Key": "v"} and msgs[1].headers is None
    assert all(abs(datetime.now(UTC) - m.time) < timedelta(minutes=1) for m in msgs)
    assert msgs[0].time <= msgs[1].time


async def test_from_a_time(js_client: NatsClient) -> None:
    for i in range(5):
        await put(js_client, f"rng.t.{i}", b"x")
    everything, _ = await read(js_client, "rng.t.*")
    # Stored times have nanoseconds; a datetime rounds them to the nearest microsecond.
    msgs, rng = await read(js_client, "rng.t.*", start=everything[2].time - timedelta(microseconds=1))
    assert seqs(msgs) == seqs(everything[2:]) and rng.complete
    msgs, rng = await read(js_client, "rng.t.*", start=datetime.now(UTC) + timedelta(minutes=1))
    assert msgs == [] and rng.complete


async def test_last_n_with_a_wildcard_filter(js_client: NatsClient) -> None:
    subjects = [f"rng.{'x' if i % 3 else 'y'}.{i % 4}.t" for i in range(40)]
    await put_many(js_client, subjects)
    everything, _ = await read(js_client, "rng.x.*.t")
    assert len(everything) == sum(s.startswith("rng.x.") for s in subjects)
    msgs, rng = await read(js_client, "rng.x.*.t", start=Last(4))
    assert seqs(msgs) == seqs(everything[-4:]) and rng.complete
    msgs, rng = await read(js_client, "rng.x.*.t", start=Last(1000))
    assert seqs(msgs) == seqs(everything) and rng.complete
    msgs, rng = await read(js_client, "rng.x.*.t", start=Last(0))
    assert msgs == [] and rng.complete
    msgs, _ = await read(js_client, "rng.>", start=Last(3))
    assert [m.subject for m in msgs] == subjects[-3:]


async def test_limit_truncates_only_when_the_range_has_more(js_client: NatsClient) -> None:
    await put_many(js_client, [f"rng.l.{i % 2}" for i in range(10)])
    msgs, rng = await read(js_client, "rng.l.*", limit=3)
    assert len(msgs) == 3 and rng.end is RangeEnd.LIMIT and rng.truncated and not rng.complete
    msgs, rng = await read(js_client, "rng.l.*", limit=10)
    assert len(msgs) == 10 and rng.complete
    msgs, rng = await read(js_client, "rng.l.1", limit=5)  # exactly the five of rng.l.1
    assert len(msgs) == 5 and rng.complete
    msgs, rng = await read(js_client, "rng.l.*", limit=0)
    assert msgs == [] and rng.end is RangeEnd.LIMIT
    with pytest.raises(ValueError, match="limit"):
        await read(js_client, "rng.l.*", limit=-1)


async def test_empty_ranges(js_client: NatsClient) -> None:
    msgs, rng = await read(js_client, "rng.>")  # empty stream
    assert msgs == [] and rng.complete
    msgs, rng = await read(js_client, "rng.>", start=Last(5))
    assert msgs == [] and rng.complete
    s1 = await put(js_client, "rng.e", b"x")
    msgs, rng = await read(js_client, "rng.nothing.>")  # no message matches
    assert msgs == [] and rng.complete
    msgs, rng = await read(js_client, "rng.e", start=s1 + 1)  # starts after the end
    assert msgs == [] and rng.complete
    msgs, rng = await read(js_client, "rng.e", end_seq=0)
    assert msgs == [] and rng.complete
    for bad in (0, -1, True, "1"):
        with pytest.raises(ValueError, match="start"):
            await read(js_client, "rng.>", start=bad)
    with pytest.raises(InvalidSubjectError):
        await read(js_client, "rng..x")


async def test_the_end_is_fixed_when_the_range_is_entered(js_client: NatsClient) -> None:
    await put_many(js_client, ["rng.n"] * 5)
    msgs, rng = await read(js_client, "rng.n", end_seq=3)
    assert seqs(msgs) == [1, 2, 3] and rng.complete
    async with read_range(js_client, STREAM, "rng.n") as rng:
        await put_many(js_client, ["rng.n"] * 5)  # live traffic, not history
        msgs = [m async for m in rng]
    assert seqs(msgs) == [1, 2, 3, 4, 5] and rng.complete


async def test_the_consumer_is_deleted_however_the_reading_stops(js_client: NatsClient) -> None:
    await put_many(js_client, ["rng.c"] * 50)
    async with read_range(js_client, STREAM, "rng.c") as rng:
        assert len(await js_client.js.consumers_info(STREAM)) == 1
        async for _ in rng:
            break
    assert rng.end is None and rng.count == 1
    assert await js_client.js.consumers_info(STREAM) == []
    with pytest.raises(RuntimeError, match="boom"):
        async with read_range(js_client, STREAM, "rng.c", start=Last(10)) as rng:
            async for _ in rng:
                raise RuntimeError("boom")
    assert await js_client.js.consumers_info(STREAM) == []


async def test_a_range_longer_than_the_flow_control_window_is_read_whole(js_client: NatsClient) -> None:
    # Unanswered, flow control stops the server after about 10,000 such messages.
    total = 25_000
    await put_many(js_client, [f"rng.f.{i % 5}" for i in range(total)], size=100)
    count = 0
    async with read_range(js_client, STREAM, "rng.f.*") as rng:
        async for msg in rng:
            count += 1
            assert msg.seq == count
            if count % 500 == 0:
                await asyncio.sleep(0)  # a reader that does some work
    assert count == total and rng.complete
    assert await js_client.js.consumers_info(STREAM) == []


async def test_messages_dropped_by_a_slow_reader_are_read_again(
    js_client: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tiny limits make nats-py drop (a slow-consumer event); the reader resumes after
    # the last message it read, so the range has neither hole nor duplicate.
    monkeypatch.setattr(ranges, "PENDING_MSGS", 20)
    monkeypatch.setattr(ranges, "BUFFER", 1)
    monkeypatch.setattr(ranges, "IDLE_CHECK", 0.02)  # notice the loss of the last ones at once
    total = 1000
    await put_many(js_client, ["rng.s"] * total)
    before = js_client.slow_consumer_events
    msgs, rng = await read(js_client, "rng.s")
    assert seqs(msgs) == list(range(1, total + 1)) and rng.complete
    assert js_client.slow_consumer_events > before, "no drop happened: the test proves nothing"

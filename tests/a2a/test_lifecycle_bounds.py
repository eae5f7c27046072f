"""A task's stored lifecycle history stays bounded however many updates it gets
(issue 10, finding 2(c)): the last ``HISTORY_LIMIT`` changes plus the total count."""

from __future__ import annotations

import asyncio

import pytest

from liquidcrypto import A2ABus, TaskState, TaskStateChange
from liquidcrypto.errors import InvalidPayloadError
from liquidcrypto.nats import streams
from liquidcrypto.nats.client import NatsClient

PROGRESS = "step finished; " * 30  # a ~450-character progress message, as an agent might send


async def stored_size(client: NatsClient, task_id: str) -> int:
    kv = await client.js.key_value(streams.A2A_TASK_STATES)
    entry = await kv.get(task_id)
    return len(entry.value or b"")


@pytest.mark.slow
async def test_thousands_of_working_updates_then_completed(client: NatsClient, bus: A2ABus) -> None:
    await bus.update_task_state("long-task", "submitted")
    largest = 0
    for i in range(3000):
        await bus.update_task_state("long-task", "working", message=PROGRESS, data={"step": i})
        if i % 250 == 0:
            largest = max(largest, await stored_size(client, "long-task"))
    done = await bus.update_task_state("long-task", "completed", data={"ok": True})
    assert done.seq == 3002
    from liquidcrypto.a2a.lifecycle import HISTORY_LIMIT, MAX_RECORD_BYTES

    largest = max(largest, await stored_size(client, "long-task"))
    assert largest <= MAX_RECORD_BYTES
    record = await bus.get_task_state("long-task")
    assert record is not None and record.state is TaskState.COMPLETED
    assert record.count == record.seq == 3002
    assert len(record.changes) == HISTORY_LIMIT
    assert [c.seq for c in record.changes] == list(range(3002 - HISTORY_LIMIT + 1, 3003))
    health = await client.health()
    assert health["connected"] is True


async def test_watch_task_from_a_cursor_inside_the_kept_history(bus: A2ABus) -> None:
    from liquidcrypto.a2a.lifecycle import HISTORY_LIMIT

    await bus.update_task_state("w", "submitted")
    for i in range(HISTORY_LIMIT + 20):
        await bus.update_task_state("w", "working", data={"step": i})
    last = HISTORY_LIMIT + 21
    got: list[TaskStateChange] = []

    async def watch() -> None:
        async for change in bus.watch_task("w", since_seq=last - 5):
            got.append(change)

    watcher = asyncio.create_task(watch())
    await bus.update_task_state("w", "working", data={"step": "live"})
    await bus.update_task_state("w", "completed")
    await asyncio.wait_for(watcher, 10)
    assert [c.seq for c in got] == list(range(last - 4, last + 3))
    assert got[-1].state is TaskState.COMPLETED


async def test_a_change_too_large_to_store_is_refused_and_the_task_goes_on(bus: A2ABus) -> None:
    from liquidcrypto.a2a.lifecycle import MAX_CHANGE_BYTES

    await bus.update_task_state("big", "submitted")
    with pytest.raises(InvalidPayloadError, match=f"{MAX_CHANGE_BYTES:,}"):
        await bus.update_task_state("big", "working", data="x" * (MAX_CHANGE_BYTES + 1))
    change = await bus.update_task_state("big", "completed")
    assert change.seq == 2
    assert await bus.client.health() is not None and bus.client.is_connected

"""Task lifecycle and agent registry on a real nats-server."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from liquidcrypto import A2ABus, AgentCard, Envelope, TaskState, TaskStateChange
from liquidcrypto.a2a.lifecycle import TRANSITIONS, check_transition
from liquidcrypto.config import Settings
from liquidcrypto.errors import IllegalTransitionError
from tests.helpers import eventually

# -- task lifecycle -----------------------------------------------------------------


async def test_state_changes_get_a_per_task_sequence_and_a_system_event(bus: A2ABus) -> None:
    events: list[Envelope] = []
    await bus.subscribe_to_events("system.events.task_state_changed", events.append)
    await bus.client.flush()
    a1 = await bus.update_task_state("task-a", "submitted", agent_id="trading-agent")
    b1 = await bus.update_task_state("task-b", TaskState.SUBMITTED)
    a2 = await bus.update_task_state("task-a", TaskState.WORKING, message="fetching prices")
    a3 = await bus.update_task_state("task-a", "working", data={"progress": 0.5})
    a4 = await bus.update_task_state("task-a", "completed", data={"filled": True})
    assert [c.seq for c in (a1, a2, a3, a4)] == [1, 2, 3, 4] and b1.seq == 1
    assert a2.previous is TaskState.SUBMITTED and a4.state is TaskState.COMPLETED
    record = await bus.get_task_state("task-a")
    assert record is not None and record.state is TaskState.COMPLETED and record.seq == 4
    assert await bus.get_task_state("never-seen") is None
    await eventually(lambda: len(events) == 5, what="five task_state_changed events")
    mine = [e for e in events if e.task_id == "task-a"]
    assert [e.data["seq"] for e in mine] == [1, 2, 3, 4]
    assert [e.data["state"] for e in mine] == ["submitted", "working", "working", "completed"]
    assert all(e.type == "task_state_changed" and e.agent_id == "system" for e in mine)


async def test_illegal_transitions_are_refused(bus: A2ABus) -> None:
    with pytest.raises(IllegalTransitionError, match="first state"):
        await bus.update_task_state("t-x", "completed")
    await bus.update_task_state("t-x", "submitted")
    await bus.update_task_state("t-x", "canceled")
    for state in ("working", "completed", "submitted", "canceled"):
        with pytest.raises(IllegalTransitionError, match="terminal") as info:
            await bus.update_task_state("t-x", state)
        assert isinstance(info.value, ValueError) and "t-x" in str(info.value)
    with pytest.raises(ValueError):
        await bus.update_task_state("t-x", "done")
    with pytest.raises(ValueError, match="task_id"):
        await bus.update_task_state("bad.id", "submitted")
    record = await bus.get_task_state("t-x")
    assert record is not None and [c.state for c in record.changes] == ["submitted", "canceled"]


def test_transition_table_follows_a2a() -> None:
    for terminal in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELED, TaskState.REJECTED):
        assert terminal.terminal and terminal not in TRANSITIONS
        with pytest.raises(IllegalTransitionError):
            check_transition("t", terminal, TaskState.WORKING)
    check_transition("t", TaskState.INPUT_REQUIRED, TaskState.WORKING)
    check_transition("t", TaskState.AUTH_REQUIRED, TaskState.WORKING)
    with pytest.raises(IllegalTransitionError):
        check_transition("t", TaskState.INPUT_REQUIRED, TaskState.SUBMITTED)


async def test_watch_task_replays_from_a_cursor_then_follows_live(bus: A2ABus, make_client: Any) -> None:
    for state in ("submitted", "working", "input-required"):
        await bus.update_task_state("t-w", state)
    seen: list[TaskStateChange] = []
    watcher_bus = A2ABus(await make_client())

    async def watch() -> None:
        async for change in watcher_bus.watch_task("t-w", since_seq=1):
            seen.append(change)

    watching = asyncio.create_task(watch())
    try:
        await eventually(lambda: len(seen) == 2, what="replay after the cursor")
        await bus.update_task_state("t-w", "working")
        await bus.update_task_state("t-w", "failed", message="exchange down")
        await asyncio.wait_for(watching, 10)  # ends by itself after the terminal state
    finally:
        watching.cancel()
        await watcher_bus.close()
    assert [c.seq for c in seen] == [2, 3, 4, 5]
    assert [c.state.value for c in seen] == ["working", "input-required", "working", "failed"]
    resumed = [c.seq async for c in bus.watch_task("t-w", since_seq=4)]
    assert resumed == [5]


async def test_watch_waits_for_a_task_that_has_no_state_yet(bus: A2ABus) -> None:
    async def first_two() -> list[int]:
        out = []
        async for change in bus.watch_task("t-later"):
            out.append(change.seq)
            if len(out) == 2:
                break
        return out

    watching = asyncio.create_task(first_two())
    await asyncio.sleep(0.1)  # the watcher is waiting on a missing key; nothing to poll for
    assert not watching.done()
    await bus.update_task_state("t-later", "submitted")
    await bus.update_task_state("t-later", "working")
    assert await asyncio.wait_for(watching, 10) == [1, 2]


async def test_concurrent_writers_never_share_a_sequence(bus: A2ABus, make_client: Any) -> None:
    other = A2ABus(await make_client())
    await bus.update_task_state("t-c", "working")
    changes = await asyncio.gather(
        *(b.update_task_state("t-c", "working", message=str(i)) for i in range(10) for b in (bus, other))
    )
    assert sorted(c.seq for c in changes) == list(range(2, 22))
    record = await bus.get_task_state("t-c")
    assert record is not None and [c.seq for c in record.changes] == list(range(1, 22))
    await other.close()


# -- agent registry -----------------------------------------------------------------


async def test_registry_liveness_with_a_ttl(make_client: Any) -> None:
    settings = Settings(a2a_agent_ttl=1.0, a2a_heartbeat_interval=0.2)
    bus = A2ABus(await make_client(settings=settings))
    beats: list[str] = []
    await bus.subscribe_to_events("*.heartbeat", lambda e: beats.append(e.agent_id))
    card = await bus.register_agent(
        {"id": "trading-agent", "name": "Trader", "version": "1.0", "skills": ["execute", "cancel"]}
    )
    assert isinstance(card, AgentCard)
    await bus.register_agent(AgentCard(id="risk-agent", name="Risk"), heartbeat=False)
    live = await bus.list_agents()
    assert [a.id for a in live] == ["risk-agent", "trading-agent"]
    assert live[1].card.skills == ["execute", "cancel"] and live[1].online
    await eventually(lambda: beats.count("trading-agent") >= 3, what="periodic heartbeats")

    async def risk_offline() -> bool:
        return [a.id for a in await bus.list_agents()] == ["trading-agent"]

    await eventually(risk_offline, timeout=5, what="risk-agent offline after the TTL")
    everyone = {a.id: a for a in await bus.list_agents(include_offline=True)}
    assert not everyone["risk-agent"].online and everyone["trading-agent"].online
    assert everyone["risk-agent"].last_heartbeat < everyone["trading-agent"].last_heartbeat
    await bus.heartbeat("risk-agent", {"load": 0.1})  # it comes back
    back = {a.id: a for a in await bus.list_agents()}
    assert back["risk-agent"].status == {"load": 0.1}
    await bus.deregister_agent("trading-agent")
    assert [a.id for a in await bus.list_agents(include_offline=True)] == ["risk-agent"]
    with pytest.raises(KeyError):
        await bus.heartbeat("unknown-agent")
    with pytest.raises(ValueError):
        await bus.register_agent({"id": "bad id"})
    await bus.close()

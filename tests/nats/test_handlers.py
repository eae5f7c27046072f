"""Plain (non-async) handlers run in a thread, wherever a handler is called: the event
loop keeps running (pings, heartbeats, other subscriptions) while one blocks."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from typing import Any

from liquidcrypto import A2ABus, NatsWebSocketManager
from liquidcrypto.a2a.envelope import Envelope
from liquidcrypto.nats.client import NatsClient
from liquidcrypto.nats.subscription import call_handler
from tests.helpers import eventually

REQUEST = contextvars.ContextVar("REQUEST", default="none")


async def test_a_plain_handler_runs_in_a_thread_with_the_callers_context() -> None:
    seen: dict[str, Any] = {}

    def handler(x: int) -> int:
        seen["thread"] = threading.current_thread()
        seen["request"] = REQUEST.get()
        time.sleep(0.3)  # blocking work
        return x * 2

    async def async_handler(x: int) -> int:
        return x + 1

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    REQUEST.set("req-1")
    tick = asyncio.create_task(ticker())
    try:
        assert await call_handler(handler, 21) == 42
    finally:
        tick.cancel()
    assert seen["thread"] is not threading.main_thread() and seen["request"] == "req-1"
    assert ticks >= 10, f"the loop ran only {ticks} ticks while the handler blocked 0.3 s"
    assert await call_handler(async_handler, 1) == 2
    assert await call_handler(lambda: async_handler(2)) == 3  # a plain callable returning a coroutine


async def _loop_alive_while(blocked: threading.Event, client: NatsClient) -> None:
    """While a handler is blocked: round trips to the server still complete."""
    await eventually(blocked.is_set, what="handler blocking")
    started = time.perf_counter()
    await client.flush(2)
    assert time.perf_counter() - started < 1.0


async def test_client_subscription_with_a_blocking_handler_keeps_the_loop_running(client: NatsClient) -> None:
    blocked, release = threading.Event(), threading.Event()
    got: list[Any] = []

    def slow(data: Any) -> None:
        blocked.set()
        if release.wait(5):  # released by the test, which runs on the loop meanwhile
            got.append(data)

    other: list[Any] = []
    await client.subscribe("handlers.slow", slow)
    await client.subscribe("handlers.other", other.append)
    await client.publish("handlers.slow", {"n": 1})
    await _loop_alive_while(blocked, client)
    await client.publish("handlers.other", {"n": 2})
    await eventually(lambda: other == [{"n": 2}], what="another subscription served meanwhile")
    release.set()
    await eventually(lambda: got == [{"n": 1}], what="slow handler done")


async def test_bus_event_and_task_handlers_that_block_keep_the_loop_running(client: NatsClient, bus: A2ABus) -> None:
    blocked, release = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    released: list[bool] = []

    def on_event(event: Envelope) -> None:
        threads.append(threading.current_thread())
        blocked.set()
        released.append(release.wait(5))  # released by the test, which runs on the loop meanwhile

    def on_task(task: Envelope) -> dict[str, Any]:
        threads.append(threading.current_thread())
        time.sleep(0.2)  # blocking work
        return {"echo": task.data}

    await bus.subscribe_to_events("a.events.*", on_event)
    await bus.subscribe_to_tasks("b.tasks.*", on_task)
    await bus.publish_event("a", "tick", {"n": 1})
    await _loop_alive_while(blocked, client)
    assert await bus.request_agent("b", "echo", {"n": 2}, timeout=5.0) == {"echo": {"n": 2}}
    release.set()
    await eventually(lambda: released == [True], what="event handler released")
    assert len(threads) == 2 and threading.main_thread() not in threads


async def test_trade_handler_that_blocks_keeps_the_loop_running(client: NatsClient) -> None:
    manager = NatsWebSocketManager(client)
    await manager.init()
    blocked, release = threading.Event(), threading.Event()
    got: list[Any] = []

    def slow(trade: Any) -> None:
        blocked.set()
        if release.wait(5):  # released by the test, which runs on the loop meanwhile
            got.append(trade)

    try:
        unsubscribe = await manager.subscribe_to_trade_events("DOT", slow)
        await manager.publish_trade_event("DOT", {"i": 0})
        await manager.flush()
        await _loop_alive_while(blocked, client)
        release.set()
        await eventually(lambda: got == [{"i": 0}], what="trade handled")
        await unsubscribe()
    finally:
        await manager.close()

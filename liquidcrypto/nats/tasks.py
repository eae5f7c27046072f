"""``TaskSet``: the one owner of background tasks.

Every task a component starts in the background is spawned through a ``TaskSet``: it
keeps a reference (so the task is not garbage-collected mid-flight), logs an exception
the task ended with, and cancels and awaits all of them on ``cancel()``. No
fire-and-forget tasks anywhere else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """Background tasks owned by one object (a client, a backend, a session)."""

    def __init__(self, prefix: str = "") -> None:
        """
        Args:
            prefix: prepended to each task's name (``"{prefix}:{name}"``) in logs.
        """
        self.prefix = prefix
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Awaitable[T], name: str) -> asyncio.Task[T]:
        """Run ``coro`` as an owned task named ``name``; its exception, if any, is logged."""
        task: asyncio.Task[T] = asyncio.ensure_future(coro)
        task.set_name(f"{self.prefix}:{name}" if self.prefix else name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def cancel(self, *, rounds: int = 40, wait: float = 0.25) -> None:
        """Cancel every task and wait until all are done.

        Cancels again each round until done: on Python 3.11 ``asyncio.wait_for`` inside
        nats-py's connect loop can swallow a cancellation that races with a refused
        connection. Logs the names of tasks still running after ``rounds`` tries.
        """
        for _ in range(rounds):
            pending = [t for t in self._tasks if not t.done()]
            if not pending:
                return
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=wait)
        log.warning("background tasks still running after cancel: %s", [t.get_name() for t in self._tasks])

"""An asyncio event loop in a thread, and the capture of what counts as an unexpected error.

Hypothesis runs every example of a ``@given`` test in the calling thread and does not
mix with pytest-asyncio's function-scoped loop and fixtures. The fuzz suite therefore
runs the service under test on its own long-lived loop in a daemon thread (one per test
module) and hands each example's coroutine to it with ``LoopThread.run``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# The loggers whose ERROR records or tracebacks mean "an unexpected exception".
WATCHED_LOGGERS = ("liquidcrypto", "nats")


class LoopThread:
    """A private event loop running in a daemon thread; its unhandled exceptions are kept."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(self._on_exception)
        self._thread = threading.Thread(target=self._main, name="fuzz-service-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _on_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the loop and return its result (raise what it raised)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise AssertionError(f"the service loop did not finish {coro!r} within {timeout} s") from None

    def close(self) -> None:
        """Cancel what still runs, stop the loop and join the thread."""

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_all(), timeout=10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@dataclass(frozen=True)
class LogEntry:
    logger: str
    level: str
    message: str
    exc: str | None

    def __str__(self) -> str:
        return f"{self.level} {self.logger}: {self.message}" + (f" [{self.exc}]" if self.exc else "")


class LogCapture(logging.Handler):
    """Keeps the records of the watched loggers that mean an unexpected exception.

    What counts:
      - any record that carries a traceback (``log.exception``, ``exc_info=``), whatever
        its level: the code caught something it did not anticipate;
      - any ERROR or CRITICAL record: the service says it is in trouble.

    What does not: WARNING/INFO/DEBUG lines without a traceback. "Skipping a bad
    message", "terminating a bad message", "dead-lettered" are the documented way a
    long-running loop deals with bad input ("log and continue").
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.entries: list[LogEntry] = []
        self._lock_entries = threading.Lock()
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.ERROR and not record.exc_info:
            return
        exc = None
        if record.exc_info and record.exc_info[1] is not None:
            exc = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"[:300]
        try:
            message = record.getMessage()[:500]
        except Exception as err:  # noqa: BLE001 - a bad format string is itself worth reporting
            message = f"<unformattable {record.msg!r}: {err!r}>"
        with self._lock_entries:
            self.entries.append(LogEntry(record.name, record.levelname, message, exc))

    def install(self) -> None:
        for name in WATCHED_LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            if logger.getEffectiveLevel() > logging.WARNING:
                self._levels[name] = logger.level
                logger.setLevel(logging.WARNING)

    def uninstall(self) -> None:
        for name in WATCHED_LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            if name in self._levels:
                logger.setLevel(self._levels.pop(name))

    def since(self, mark: int) -> list[LogEntry]:
        with self._lock_entries:
            return self.entries[mark:]

    def mark(self) -> int:
        with self._lock_entries:
            return len(self.entries)

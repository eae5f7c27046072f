"""``subscribe_to_trade_events`` handlers: each behind its own bounded queue and task."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from liquidcrypto.fanout import metrics
from liquidcrypto.nats.subscription import call_handler, is_async_handler

log = logging.getLogger("liquidcrypto.fanout.manager")  # where these records always came from


@dataclass(frozen=True, kw_only=True)
class TradeEvent:
    """A trade as a ``subscribe_to_trade_events(..., with_meta=True)`` handler gets it."""

    symbol: str
    data: Any
    seq: int


class HandlerListener:
    """A ``subscribe_to_trade_events`` handler behind its own bounded queue and task."""

    def __init__(self, handler: Callable[[Any], Any], with_meta: bool, size: int) -> None:
        self.handler = handler
        self.with_meta = with_meta
        self.queue: asyncio.Queue[TradeEvent] = asyncio.Queue(size)
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self.on_drop: Callable[[], None] = lambda: None

    def offer_trade(self, symbol: str, seq: int, data: Any) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
            self.on_drop()
            metrics.HANDLER_DROPPED.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("trade handler %r lags: %d trades dropped", self.handler, self.dropped)
        self.queue.put_nowait(TradeEvent(symbol=symbol, data=data, seq=seq))

    async def run(self) -> None:
        if not is_async_handler(self.handler):
            await self._run_plain()
            return
        while True:
            event = await self.queue.get()
            try:
                await call_handler(self.handler, event if self.with_meta else event.data)
            except Exception:
                log.exception("trade handler %r failed on %s seq %d", self.handler, event.symbol, event.seq)

    async def _run_plain(self) -> None:
        """A plain (non-async) handler runs in a thread, so it never stops the event loop;
        it gets every trade queued at that moment in one thread hop (one hop per trade
        would make even a quick handler lag behind a burst)."""
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for event, pending in await call_handler(self._handle_batch, batch):
                try:
                    await pending
                except Exception:
                    log.exception("trade handler %r failed on %s seq %d", self.handler, event.symbol, event.seq)

    def _handle_batch(self, batch: list[TradeEvent]) -> list[tuple[TradeEvent, Awaitable[Any]]]:
        """In a thread: the handler for each trade; awaitables it returned, for the loop."""
        later: list[tuple[TradeEvent, Awaitable[Any]]] = []
        for event in batch:
            try:
                result = self.handler(event if self.with_meta else event.data)
            except Exception:
                log.exception("trade handler %r failed on %s seq %d", self.handler, event.symbol, event.seq)
                continue
            if inspect.isawaitable(result):
                later.append((event, result))
        return later

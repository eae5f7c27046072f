"""History replays to ``/ws`` clients, bounded per client and per instance.

A ``subscribe`` frame with ``since_seq`` or ``last`` asks for the stored trades of its
symbols before the live ones. One client must not be able to make an instance read more
history than its clients can take, so:

- **one replay per client and symbol**: a request for a symbol whose replay is still
  pending for that client is refused with an error frame (``"code": "replay_pending"``);
  the pending one goes on.
- **one client's replays run one after the other**, and the endpoint reads no further
  frame of that client until they are done (``ClientSession.wait_replays``): a client
  that floods ``subscribe`` frames waits; its frames stay in the socket.
- **paged, at the client's pace**: a replay reads at most ``page_size`` trades at a time
  (``WS_REPLAY_PAGE``), no more than the client's queue has room for. While the client
  keeps up, pages come from one consumer; once its queue stays full (``HOLD_FOR``) the
  replay deletes the consumer (and what it read ahead) and gives its slot back before it
  waits, then goes on with a new consumer right after the last trade sent. A client that stops reading
  holds no consumer, no slot and no page: its replay just waits.
- **a per-instance cap** of ``max_running`` replays reading at once (``WS_MAX_REPLAYS``),
  so at most that many consumers; a replay that needs a slot waits its turn, and one
  that holds a slot hands it over after its page when others wait. At most
  ``max_waiting`` replays wait (``WS_REPLAY_QUEUE``); a new replay past that gets an
  error frame (``"code": "busy"``, retry later) and the symbol goes live without history.

A replay leaves out what the client already has (up to the last sequence queued for
it), so asking again for the same history reads nothing. The live path is untouched:
trades of a symbol being replayed are held by the session (``SymbolState.held``) and
sent after the history, without duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from liquidcrypto.fanout import metrics, protocol
from liquidcrypto.fanout.session import ClientSession

log = logging.getLogger(__name__)

Page = list[tuple[int, bytes]]

HOLD_FOR = 0.1  # seconds a replay keeps its consumer and slot while its client's queue is full


class Cursor(Protocol):
    """A history read, page by page (``nats_history.HistoryCursor``)."""

    complete: bool
    done: bool

    async def next_page(self, size: int) -> Page: ...

    async def pause(self) -> None:
        """Let go of server resources and read-ahead; the next page picks up after the last."""

    async def close(self) -> None:
        """Stop reading; idempotent."""


class OpenHistory(Protocol):
    """Plans the history read of one symbol (``NatsBackend.open_history``)."""

    def __call__(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int, known_seq: int = 0
    ) -> Awaitable[Cursor]: ...


class ListCursor:
    """A ``Cursor`` over a history read at once (a backend that cannot page)."""

    def __init__(self, items: Page, complete: bool) -> None:
        self._items = items
        self.complete = complete
        self.done = not items

    async def next_page(self, size: int) -> Page:
        page, self._items = self._items[:size], self._items[size:]
        self.done = not self._items
        return page

    async def pause(self) -> None:
        """Nothing to let go of."""

    async def close(self) -> None:
        self._items, self.done = [], True


def list_history(history: Callable[..., Awaitable[tuple[Page, bool]]]) -> OpenHistory:
    """An ``OpenHistory`` from a backend's ``history(symbol, *, since_seq, last, limit)``."""

    async def open_history(
        symbol: str, *, since_seq: int | None, last: int | None, limit: int, known_seq: int = 0
    ) -> Cursor:
        items, complete = await history(symbol, since_seq=since_seq, last=last, limit=limit)
        return ListCursor([item for item in items if item[0] > known_seq], complete)

    return open_history


@dataclass(frozen=True, kw_only=True)
class ReplayLimits:
    """Bounds of history replays.

    Attributes:
        max_running: replays reading at once per instance (``WS_MAX_REPLAYS``).
        max_waiting: replays waiting for a read slot before new ones are refused
            (``WS_REPLAY_QUEUE``).
        page_size: trades read per page (``WS_REPLAY_PAGE``).
        history_max: most trades one replay sends (``WS_HISTORY_MAX``).
    """

    max_running: int = 8
    max_waiting: int = 64
    page_size: int = 256
    history_max: int = 10_000

    def __post_init__(self) -> None:
        for name in ("max_running", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("max_waiting", "history_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, not {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class ReplayRequest:
    """The history one client asked for one symbol."""

    symbol: str
    since_seq: int | None
    last: int | None
    prefix: str  # the symbol's trade frame head (protocol.trade_frame_head)


class Replays:
    """The replays of one instance (see the module docstring).

    Args:
        limits: the bounds.
        open_history: plans a history read.
    """

    def __init__(self, limits: ReplayLimits, open_history: OpenHistory) -> None:
        self.limits = limits
        self._open_history = open_history
        self._slots = asyncio.Semaphore(limits.max_running)
        self.running = 0  # replays holding a read slot
        self.waiting = 0  # replays waiting for one
        self.refused = 0  # replays refused: busy or already pending

    def start(self, session: ClientSession, requests: list[ReplayRequest]) -> None:
        """Start the replays of one ``subscribe`` frame, one after the other, in a task of ``session``.

        The symbols' live trades must already be held (``session.begin_replay``).
        A symbol whose replay is pending for this client is refused with an error frame.
        """
        accepted: list[ReplayRequest] = []
        for request in requests:
            if session.replay_pending(request.symbol) or any(r.symbol == request.symbol for r in accepted):
                self.refused += 1
                metrics.REPLAYS_REFUSED.labels("pending").inc()
                session.offer(
                    protocol.error_frame(
                        f"a history replay of {request.symbol} is already pending for this client",
                        code="replay_pending",
                        symbol=request.symbol,
                    )
                )
                continue
            accepted.append(request)
        if accepted:
            session.replays_started([r.symbol for r in accepted])
            session.spawn(self._run_all(session, accepted), "replay:" + ",".join(r.symbol for r in accepted))

    async def _run_all(self, session: ClientSession, requests: list[ReplayRequest]) -> None:
        left = [r.symbol for r in requests]
        try:
            for request in requests:
                await self._run(session, request)
                await session.end_replay(request.symbol)
                session.replay_finished(left.pop(0))
        finally:
            for symbol in left:  # cancelled: the client left
                session.replay_finished(symbol)

    async def _run(self, session: ClientSession, request: ReplayRequest) -> None:
        """Send the history of one symbol, then its ``history`` frame (or an error frame)."""
        symbol, limits = request.symbol, self.limits
        cursor: Cursor | None = None
        holding = False  # a read slot, and with it the cursor's consumer
        count, last_seq = 0, None
        try:
            while cursor is None or not cursor.done:
                room = session.room
                if holding and room <= 0 and not self.waiting:
                    # A client that keeps up drains a page in a few ms: keep the consumer for it.
                    with contextlib.suppress(TimeoutError):
                        room = await asyncio.wait_for(session.wait_room(limits.page_size // 2), HOLD_FOR)
                if room <= 0 or (holding and self.waiting):
                    # The client is behind, or others wait their turn: give the consumer and
                    # the slot back first. A client that does not read holds neither.
                    if holding:
                        holding = False
                        await self._pause(cursor)
                    room = await session.wait_room(max(1, limits.page_size // 2))
                if session.kicked.is_set() or symbol not in session.symbols:
                    return  # closed, or unsubscribed meanwhile
                if not holding:
                    if not await self._acquire(admit=cursor is None):
                        self._refuse_busy(session, symbol)
                        return
                    holding = True
                if cursor is None:
                    state = session.symbols.get(symbol)
                    cursor = await self._open_history(
                        symbol,
                        since_seq=request.since_seq,
                        last=request.last,
                        limit=limits.history_max,
                        known_seq=state.last_seq if state is not None else 0,
                    )
                page = await cursor.next_page(min(room, limits.page_size))
                for seq, payload in page:
                    await session.put_history(symbol, seq, protocol.trade_frame(request.prefix, payload.decode(), seq))
                if page:
                    count += len(page)
                    last_seq = page[-1][0]
                    metrics.HISTORY_FRAMES.inc(len(page))
            session.offer(
                protocol.frame("history", symbol=symbol, count=count, complete=cursor.complete, last_seq=last_seq)
            )
        except Exception as exc:  # noqa: BLE001 - the client is told, the service goes on
            log.warning("history of %s for %s failed after %d trades: %r", symbol, session.name, count, exc)
            session.offer(protocol.error_frame(f"history of {symbol} unavailable now", symbol=symbol))
        finally:
            try:
                if cursor is not None:
                    await cursor.close()  # deletes its consumer, if it has one
            finally:
                if holding:
                    self._release()

    async def _pause(self, cursor: Cursor | None) -> None:
        try:
            if cursor is not None:
                await cursor.pause()
        finally:
            self._release()

    def _refuse_busy(self, session: ClientSession, symbol: str) -> None:
        self.refused += 1
        metrics.REPLAYS_REFUSED.labels("busy").inc()
        log.warning("history of %s for %s refused: %d replays waiting", symbol, session.name, self.waiting)
        session.offer(
            protocol.error_frame(
                f"history of {symbol} refused: server busy ({self.waiting} replays waiting), retry later",
                code="busy",
                symbol=symbol,
            )
        )

    async def _acquire(self, *, admit: bool) -> bool:
        """Take a read slot, waiting in turn; ``False`` if ``admit`` (a new replay)
        and ``max_waiting`` replays wait already. A replay under way always waits."""
        if self._slots.locked():
            if admit and self.waiting >= self.limits.max_waiting:
                return False
            self.waiting += 1
            metrics.REPLAYS_WAITING.set(self.waiting)
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
                metrics.REPLAYS_WAITING.set(self.waiting)
        else:
            await self._slots.acquire()
        self.running += 1
        metrics.REPLAYS_RUNNING.set(self.running)
        return True

    def _release(self) -> None:
        self.running -= 1
        metrics.REPLAYS_RUNNING.set(self.running)
        self._slots.release()

    def stats(self) -> dict[str, int]:
        return {"running": self.running, "waiting": self.waiting, "refused": self.refused}

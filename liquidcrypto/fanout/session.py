"""One connected ``/ws`` client: a bounded send queue with graded back-pressure.

The fan-out calls ``offer_*`` without ever awaiting, so one slow client never delays
the others; the client's own writer task drains the queue. As the queue fills up:

1. **conflate** (queue length >= ``conflate_at``): a new trade replaces the queued,
   not yet sent trade of the same symbol (the client gets the latest price, not every
   tick), if the client's subscription allows it;
2. **drop oldest** (queue full at ``queue_size``): the oldest queued frame goes;
3. **disconnect** (``disconnect_after`` frames dropped or conflated since the writer last
   managed to send): the client is closed with 1013 and a reason.

Every trade the client does not get is counted, and its next frame carries
``"missed": N``. Trades whose sequence was already queued for the client are skipped,
which makes the history-to-live hand-over free of duplicates.

History replays (``fanout.replay``) never conflate nor drop: they wait for room
(``wait_room`` before reading a page, ``put_history`` per trade). The session also keeps
which of its symbols have a replay pending, so the endpoint stops reading the client's
frames until they are done (``wait_replays``).

A client that connected with ``?batch=1`` gets everything queued for it at the moment
its writer runs in one WebSocket message, the frames separated by newlines (JSON text
never contains a raw newline), as Centrifugo's JSON protocol does: one send and one
socket write for a backlog instead of one per frame, so a client that falls behind
catches up at a fraction of the cost. Nothing waits to fill a batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from liquidcrypto.fanout import metrics, protocol
from liquidcrypto.nats.tasks import TaskSet

log = logging.getLogger(__name__)

SendText = Callable[[str], Awaitable[None]]

CLOSE_TRY_AGAIN = 1013
CLOSE_POLICY = 1008

POLICY_LATEST = "latest"
POLICY_EVERY = "every"
POLICIES = (POLICY_LATEST, POLICY_EVERY)
GAP_CONFLATED = "conflated"
GAP_DROPPED = "dropped"

_ids = itertools.count(1)

BATCH_MAX_FRAMES = 512
BATCH_MAX_CHARS = 256 * 1024


@dataclass(eq=False, slots=True)
class _Entry:
    symbol: str | None
    seq: int
    frame: str
    # Trades of ``symbol`` conflated away just before this one: seqs gap_from..gap_to (0: none).
    gap_from: int = 0
    gap_to: int = 0


@dataclass(eq=False)
class SymbolState:
    """What a session knows of one subscribed symbol: its policy (``latest``: conflate, drop
    and announce; ``every``: never lose a trade, close the client instead), last sequence
    queued and sent, the trades dropped and not yet announced, and the live trades held
    while its history is replayed."""

    conflate: bool = True
    last_seq: int = 0
    sent_seq: int = 0  # last seq written to the socket (named in an "every" close reason)
    drop_from: int = 0
    drop_to: int = 0
    replaying: bool = False
    held: deque[tuple[int, str]] = field(default_factory=deque)

    @property
    def policy(self) -> str:
        return POLICY_LATEST if self.conflate else POLICY_EVERY

    def note_dropped(self, first: int, last: int) -> None:
        """Merge the lost seqs ``first..last`` into the pending ``dropped`` range (nothing of
        the symbol was sent in between: the writer announces and clears it before sending)."""
        self.drop_from = first if not self.drop_from else min(self.drop_from, first)
        self.drop_to = max(self.drop_to, last)


@dataclass(frozen=True, kw_only=True)
class QueuePolicy:
    """The graded back-pressure thresholds of a client queue.

    Attributes:
        queue_size: most frames queued per client (then drop oldest).
        conflate_at: queue length from which trades are conflated per symbol (0: never).
        disconnect_after: frames lost since the last successful send that close the
            client with 1013 (0: never).
        write_delay: seconds a batching client's writer waits after its queue went from
            empty to non-empty, to collect more frames into the message (0: none).
    """

    queue_size: int = 1024
    conflate_at: int = 256
    disconnect_after: int = 4096
    write_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {self.queue_size}")
        if not 0 <= self.write_delay <= 1:
            raise ValueError(f"write_delay must be between 0 and 1 s, not {self.write_delay}")


class ClientSession:
    """The server side of one ``/ws`` connection.

    Args:
        send: coroutine writing one text message to the socket.
        policy: back-pressure thresholds.
        name: for logs (the peer address).
        batch: send what is queued as newline-separated frames in one message.
    """

    def __init__(self, send: SendText, policy: QueuePolicy, name: str = "", *, batch: bool = False) -> None:
        self.id = next(_ids)
        self.name = name or f"ws-{self.id}"
        self.policy = policy
        self.batch = batch
        self.symbols: dict[str, SymbolState] = {}
        self._send = send
        self._queue: deque[_Entry] = deque()
        self._latest: dict[str, _Entry] = {}
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.kicked = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""
        self.sent = 0
        self.conflated = 0
        self.dropped = 0
        self.duplicates = 0
        self.missed = 0
        self._lost_since_progress = 0
        self.gaps = 0
        # Symbols with a dropped range not yet announced (SymbolState.drop_from/drop_to).
        self._gap_symbols: set[str] = set()
        # The last trade seq of each symbol in the message being sent (SymbolState.sent_seq once sent).
        self._taken: dict[SymbolState, int] = {}
        self.tasks = TaskSet(self.name)
        # History replays: the symbols with one pending, and the writer's signal that
        # the queue went down to _low_mark (-1: nobody waits for it).
        self.replays: set[str] = set()
        self._replays_idle = asyncio.Event()
        self._replays_idle.set()
        self._low = asyncio.Event()
        self._low_mark = -1

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def room(self) -> int:
        """Frames that fit in the queue below its soft limit now (0 once closed)."""
        return 0 if self.kicked.is_set() else max(0, self._soft_limit() - len(self._queue))

    # -- offers: never await ---------------------------------------------------

    def offer(self, frame: str) -> None:
        """Queue a control frame (error, broadcast, ack...)."""
        self._push(_Entry(None, 0, frame))

    def offer_trade(self, symbol: str, seq: int, frame: str) -> None:
        """Queue a live trade; held back while the symbol's history is replayed."""
        state = self.symbols.get(symbol)
        if state is None:
            return
        if state.replaying:
            state.held.append((seq, frame))
            if len(state.held) > self.policy.queue_size:
                if not state.conflate:
                    self._slow(symbol, state)
                    return
                lost, _ = state.held.popleft()
                state.note_dropped(lost, lost)
                self._gap_symbols.add(symbol)
                self.dropped += 1
                metrics.DROPPED.inc()
                self._lose()
            return
        self._offer_trade(symbol, state, seq, frame)

    def _offer_trade(self, symbol: str, state: SymbolState, seq: int, frame: str) -> None:
        if seq <= state.last_seq:
            self.duplicates += 1
            metrics.DUPLICATES.inc()
            return
        state.last_seq = seq
        if state.conflate and self.policy.conflate_at and len(self._queue) >= self.policy.conflate_at:
            entry = self._latest.get(symbol)
            if entry is not None:
                if not entry.gap_from:
                    entry.gap_from = entry.seq
                entry.gap_to = entry.seq
                entry.seq, entry.frame = seq, frame
                self.conflated += 1
                metrics.CONFLATED.inc()
                self._lose()
                return
        entry = _Entry(symbol, seq, frame)
        self._latest[symbol] = entry
        self._push(entry)

    def _push(self, entry: _Entry) -> None:
        if self.kicked.is_set():
            return
        if len(self._queue) >= self.policy.queue_size:
            if not self._may_drop(entry):
                return
            old = self._queue.popleft()
            if old.symbol is not None:
                if self._latest.get(old.symbol) is old:
                    del self._latest[old.symbol]
                state = self.symbols.get(old.symbol)
                if state is not None:
                    state.note_dropped(old.gap_from or old.seq, old.seq)
                    self._gap_symbols.add(old.symbol)
            self.dropped += 1
            metrics.DROPPED.inc()
            self._lose()
            if self.kicked.is_set():
                return
        self._queue.append(entry)
        if len(self._queue) >= self._soft_limit():
            self._room.clear()
        self._wake.set()

    def _may_drop(self, entry: _Entry) -> bool:
        """Whether the queue may drop its oldest frame to take ``entry``; if a subscription
        with the ``every`` policy would lose a trade, the client is closed instead."""
        for item in (self._queue[0], entry):
            if item.symbol is not None:
                state = self.symbols.get(item.symbol)
                if state is not None and not state.conflate:
                    self._slow(item.symbol, state)
                    return False
        return True

    def _slow(self, symbol: str, state: SymbolState) -> None:
        """Close the client: a subscription with the ``every`` policy would lose a trade."""
        metrics.EVERY_CLOSES.inc()
        self.kick(CLOSE_TRY_AGAIN, f"slow consumer; last_seq={state.sent_seq} ({symbol})")

    def _soft_limit(self) -> int:
        return self.policy.conflate_at or self.policy.queue_size

    def _lose(self) -> None:
        self.missed += 1
        self._lost_since_progress += 1
        limit = self.policy.disconnect_after
        if limit and self._lost_since_progress >= limit and not self.kicked.is_set():
            self.kick(
                CLOSE_TRY_AGAIN,
                f"client too slow: {self._lost_since_progress} messages lost since its last read",
            )

    def kick(self, code: int, reason: str) -> None:
        """Ask the endpoint to close this client with ``code`` and ``reason``."""
        if self.kicked.is_set():
            return
        self.close_code, self.close_reason = code, reason
        if code == CLOSE_TRY_AGAIN:
            metrics.SLOW_DISCONNECTS.inc()
        elif code == CLOSE_POLICY:
            metrics.POLICY_CLOSES.inc()
        log.warning("closing %s with %s: %s", self.name, code, reason)
        self._queue.clear()
        self._latest.clear()
        self.kicked.set()
        self._wake.set()
        self._room.set()
        self._low.set()
        self._replays_idle.set()

    # -- history hand-over -----------------------------------------------------

    def begin_replay(self, symbol: str) -> None:
        """Hold live trades of ``symbol`` until ``end_replay``."""
        self.symbols[symbol].replaying = True

    def replay_pending(self, symbol: str) -> bool:
        """Whether a history replay of ``symbol`` is pending (queued or running) for this client."""
        return symbol in self.replays

    def replays_started(self, symbols: list[str]) -> None:
        """Record replays of ``symbols`` as pending (``wait_replays`` waits for them)."""
        self.replays.update(symbols)
        if self.replays:
            self._replays_idle.clear()

    def replay_finished(self, symbol: str) -> None:
        """Record the replay of ``symbol`` as done (finished, failed or refused)."""
        self.replays.discard(symbol)
        if not self.replays:
            self._replays_idle.set()

    async def wait_replays(self) -> None:
        """Return once no replay is pending for this client, or it was closed."""
        await self._replays_idle.wait()

    async def wait_room(self, want: int) -> int:
        """Wait until at least ``want`` frames fit in the queue below its soft limit
        (``want`` is capped at that limit), or the client is closed.

        Returns:
            how many frames fit now (0 if the client was closed).
        """
        soft = self._soft_limit()
        want = max(1, min(want, soft))
        while not self.kicked.is_set() and soft - len(self._queue) < want:
            self._low_mark = soft - want
            self._low.clear()
            try:
                await self._low.wait()
            finally:
                self._low_mark = -1
        return 0 if self.kicked.is_set() else soft - len(self._queue)

    async def put_history(self, symbol: str, seq: int, frame: str) -> None:
        """Queue a replayed trade, waiting for room rather than conflating or dropping.

        Trades at or below the last sequence queued for the symbol are skipped.
        """
        while not self._room.is_set():
            await self._room.wait()
        state = self.symbols.get(symbol)
        if state is None or self.kicked.is_set():
            return
        if seq > state.last_seq:
            state.last_seq = seq
            self._push(_Entry(symbol, seq, frame))
        else:
            self.duplicates += 1
            metrics.DUPLICATES.inc()

    async def end_replay(self, symbol: str) -> None:
        """Send the live trades held during the replay (skipping what history sent), then go live.

        The held backlog goes out at the client's pace like history, not as one burst that
        would trip conflation; trades arriving meanwhile are held too, until none is left.
        """
        state = self.symbols.get(symbol)
        while state is not None and state.held:
            seq, frame = state.held.popleft()
            await self.put_history(symbol, seq, frame)
            state = self.symbols.get(symbol)
        if state is not None:
            state.replaying = False

    # -- writer ----------------------------------------------------------------

    async def run_writer(self) -> None:
        """Send queued frames until cancelled or kicked."""
        queue = self._queue
        soft_limit = self._soft_limit()
        delay = self.policy.write_delay if self.batch else 0.0
        unreported = 0  # frames sent but not yet added to the Prometheus counter
        try:
            while not self.kicked.is_set():
                if not queue and self._gap_symbols:
                    self._announce_drops()
                    continue
                if not queue:
                    if unreported:
                        metrics.FRAMES_SENT.inc(unreported)
                        unreported = 0
                    self._wake.clear()
                    await self._wake.wait()
                    if delay:
                        await asyncio.sleep(delay)
                    continue
                text = self._take()
                frames = 1
                if self.batch and queue:
                    parts = [text]
                    size = len(text)
                    while queue and len(parts) < BATCH_MAX_FRAMES and size < BATCH_MAX_CHARS:
                        parts.append(self._take())
                        size += len(parts[-1]) + 1
                    text = "\n".join(parts)
                    frames = len(parts)
                if len(queue) < soft_limit:
                    self._room.set()
                    if len(queue) <= self._low_mark:
                        self._low.set()
                await self._send(text)
                if self._taken:
                    for state, seq in self._taken.items():
                        state.sent_seq = seq
                    self._taken.clear()
                self.sent += frames
                self._lost_since_progress = 0
                unreported += frames
                if unreported >= 256:
                    metrics.FRAMES_SENT.inc(unreported)
                    unreported = 0
        finally:
            if unreported:
                metrics.FRAMES_SENT.inc(unreported)

    def _take(self) -> str:
        """The next queued frame, with the count of missed trades if any.

        A trade that follows lost trades of its symbol is preceded by a ``gap`` frame
        naming them (the trade goes back to the head of the queue for the next take).
        """
        entry = self._queue[0]
        symbol = entry.symbol
        if symbol is not None:
            state = self.symbols.get(symbol)
            if state is not None:
                if entry.gap_from or state.drop_to:
                    gap = self._gap_before(symbol, state, entry)
                    if gap is not None:
                        return self._missed(gap)
                self._taken[state] = entry.seq
            if self._latest.get(symbol) is entry:
                del self._latest[symbol]
        self._queue.popleft()
        return self._missed(entry.frame)

    def _gap_before(self, symbol: str, state: SymbolState, entry: _Entry) -> str | None:
        """The ``gap`` frame to send before ``entry`` (clearing what it announces), if any."""
        first, last, reason = entry.gap_from, entry.gap_to, GAP_CONFLATED
        if state.drop_to and state.drop_to < entry.seq:
            # Dropped trades precede whatever is still queued of the symbol.
            first, last, reason = state.drop_from, max(state.drop_to, last), GAP_DROPPED
            state.drop_from = state.drop_to = 0
            self._gap_symbols.discard(symbol)
        if not first:
            return None
        entry.gap_from = entry.gap_to = 0
        return self._gap_frame(symbol, first, last, reason)

    def _announce_drops(self) -> None:
        """Queue a ``gap`` frame for each dropped range no queued trade will announce."""
        for symbol in self._gap_symbols:
            state = self.symbols.get(symbol)
            if state is not None and state.drop_to:
                self._queue.append(
                    _Entry(None, 0, self._gap_frame(symbol, state.drop_from, state.drop_to, GAP_DROPPED))
                )
                state.drop_from = state.drop_to = 0
        self._gap_symbols.clear()

    def _gap_frame(self, symbol: str, first: int, last: int, reason: str) -> str:
        self.gaps += 1
        metrics.GAPS.labels(reason).inc()
        return protocol.frame("gap", symbol=symbol, from_seq=first, to_seq=last, reason=reason)

    def _missed(self, text: str) -> str:
        if self.missed:
            text = protocol.with_missed(text, self.missed)
            self.missed = 0
        return text

    def spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        """Run ``coro`` as a task owned by this session (cancelled by ``cancel_tasks``)."""
        return self.tasks.spawn(coro, name)

    async def cancel_tasks(self) -> None:
        await self.tasks.cancel()

    def stats(self) -> dict[str, int]:
        return {
            "queued": len(self._queue),
            "sent": self.sent,
            "conflated": self.conflated,
            "dropped": self.dropped,
            "duplicates": self.duplicates,
            "gaps": self.gaps,
        }

"""What the WebSocket manager needs from a message backend (NATS or Redis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# (symbol, sequence, the published JSON bytes); called synchronously for every trade.
OnTrade = Callable[[str, int, bytes], None]
# (the broadcast JSON bytes)
OnBroadcast = Callable[[bytes], None]


class Backend(Protocol):
    """A trade transport: publish, one feed per symbol, broadcast, and maybe history."""

    name: str
    supports_history: bool

    async def start(self, on_trade: OnTrade, on_broadcast: OnBroadcast) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, symbol: str, payload: bytes) -> None: ...

    async def flush(self, timeout: float) -> None: ...

    async def broadcast(self, payload: bytes) -> None: ...

    async def open_feed(self, symbol: str) -> None: ...

    async def close_feed(self, symbol: str) -> None: ...

    async def history(
        self, symbol: str, *, since_seq: int | None, last: int | None, limit: int
    ) -> tuple[list[tuple[int, bytes]], bool]: ...

    def stats(self) -> dict[str, int]: ...

"""What one ``/ws`` client may ask of an instance: which symbols, how fast, how many.

- ``SymbolFilter``: the optional allow-list ``WS_SYMBOLS``, comma-separated entries, each
  an exact symbol or a shell-style glob (``*``, ``?``, ``[...]``; case-sensitive), e.g.
  ``BTCUSDT,ETH*,*USDC``. Empty or unset: every valid symbol is allowed.
- ``TokenBucket``: the per-client subscribe rate limit: ``WS_SUBSCRIBE_RATE`` tokens per
  second up to ``WS_SUBSCRIBE_BURST``; a subscribe frame costs one token per symbol the
  client does not hold yet (at least one), since each may open a JetStream consumer.
- ``ErrorCode``: the ``code`` of the error frame a client gets when it hits a limit; the
  frame is answered and the session goes on.
"""

from __future__ import annotations

import fnmatch
import re
import time
from enum import StrEnum

from liquidcrypto.config import Settings
from liquidcrypto.fanout import protocol
from liquidcrypto.fanout.session import ClientSession


class ErrorCode(StrEnum):
    """``{"type": "error", "code": ...}`` of a refused (part of a) subscribe frame."""

    RATE_LIMITED = "rate_limited"  # WS_SUBSCRIBE_RATE/BURST: the whole frame is ignored
    SYMBOL_LIMIT = "symbol_limit"  # WS_MAX_SYMBOLS per client: the whole frame is ignored
    FEED_LIMIT = "feed_limit"  # WS_MAX_FEEDS per instance: the symbols that would open a feed
    SYMBOL_NOT_ALLOWED = "symbol_not_allowed"  # WS_SYMBOLS: the symbols outside the list
    UNAVAILABLE = "unavailable"  # the backend cannot open the feed now (retried in the background)


class SymbolFilter:
    """The ``WS_SYMBOLS`` allow-list.

    Args:
        spec: comma-separated exact symbols and globs; ``None`` or blank allows everything.

    Raises:
        ValueError: an entry is empty (``"BTCUSDT,,ETH*"``), naming the spec.
    """

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self._exact: frozenset[str] = frozenset()
        self._pattern: re.Pattern[str] | None = None
        if spec is None or not spec.strip():
            self.allow_all = True
            return
        self.allow_all = False
        entries = [e.strip() for e in spec.split(",")]
        if any(not e for e in entries):
            raise ValueError(f"WS_SYMBOLS={spec!r} has an empty entry; expected comma-separated symbols or globs")
        globs = [e for e in entries if any(c in e for c in "*?[")]
        self._exact = frozenset(e for e in entries if e not in globs)
        if globs:
            self._pattern = re.compile("|".join(fnmatch.translate(g) for g in globs))

    def allows(self, symbol: str) -> bool:
        if self.allow_all or symbol in self._exact:
            return True
        return self._pattern is not None and self._pattern.match(symbol) is not None


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take(n)`` spends ``n`` if there are that many.

    Raises:
        ValueError: ``rate`` is not positive or ``burst`` is below 1.
    """

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0:
            raise ValueError(f"subscribe rate must be positive, not {rate:g}")
        if burst < 1:
            raise ValueError(f"subscribe burst must be at least 1, not {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self, n: int = 1) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False


def error_frame(code: ErrorCode, message: str) -> str:
    """An error frame with a machine-readable ``code`` (see ``ErrorCode``)."""
    return protocol.frame("error", code=code.value, message=message)


class ClientLimits:
    """The per-client checks of a subscribe frame (the per-instance feed cap is the
    manager's, checked right where a feed is added)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.symbols = SymbolFilter(settings.ws_symbols)
        self._buckets: dict[ClientSession, TokenBucket] = {}

    def forget(self, session: ClientSession) -> None:
        self._buckets.pop(session, None)

    def admit(self, session: ClientSession, request: protocol.Subscribe) -> list[str] | None:
        """The symbols of ``request`` this client may subscribe to, or ``None`` when the
        whole frame is refused (symbols per client, rate limit); error frames are offered."""
        settings = self.settings
        symbols = [s for s in request.symbols if self.symbols.allows(s)]
        if len(symbols) < len(request.symbols):
            refused = [s for s in request.symbols if s not in symbols]
            session.offer(error_frame(ErrorCode.SYMBOL_NOT_ALLOWED, f"symbols not offered here: {', '.join(refused)}"))
        new = [s for s in symbols if s not in session.symbols]
        limit = settings.ws_max_symbols
        if len(session.symbols) + len(new) > limit:
            session.offer(
                error_frame(
                    ErrorCode.SYMBOL_LIMIT,
                    f"subscribing to {len(new)} more symbols would exceed the limit of {limit} per client",
                )
            )
            return None
        bucket = self._buckets.get(session)
        if bucket is None:
            bucket = self._buckets[session] = TokenBucket(settings.ws_subscribe_rate, settings.ws_subscribe_burst)
        if not bucket.take(max(1, len(new))):
            session.offer(
                error_frame(
                    ErrorCode.RATE_LIMITED,
                    f"subscribing to {len(new)} new symbols exceeds the rate of {settings.ws_subscribe_rate:g} "
                    f"symbols per second (bursts of {settings.ws_subscribe_burst}); frame ignored",
                )
            )
            return None
        return symbols

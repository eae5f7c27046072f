"""The ``/ws`` wire protocol: client frames in, server frames out, defined once.

Client frames (JSON text)::

    {"action": "subscribe", "symbols": ["BTCUSDT"], "since_seq": 1234}   # or "last": 50
        # and optionally "policy": "latest" (default) | "every"
    {"action": "unsubscribe", "symbols": ["BTCUSDT"]}
    {"action": "ping"}

Server frames (JSON text, each with a ``type``)::

    {"type": "welcome", "instance": "...", "backend": "nats", "history": true}
    {"type": "trade", "symbol": "BTCUSDT", "data": {...}, "seq": 1235}
    {"type": "history", "symbol": "BTCUSDT", "count": 12, "complete": true, "last_seq": 1240}
    {"type": "subscribed" | "unsubscribed", "symbols": [...]}
    {"type": "broadcast", "data": ...}
    {"type": "gap", "symbol": "BTCUSDT", "from_seq": 1236, "to_seq": 1250, "reason": "conflated"}
    {"type": "pong"}
    {"type": "error", "message": "..."}      # maybe with "code" and "symbol"

Any frame may carry ``"missed": N``: the number of trades this client did not get since
its previous frame (conflated or dropped because it read too slowly). Which ones: a
``gap`` frame names each lost range of a symbol (``reason`` ``conflated`` or
``dropped``), before the next trade of that symbol or once the writer has caught up;
resubscribing with ``since_seq`` = ``from_seq`` - 1 recovers them from the stream.

Trade frames are built once per message per instance as text and shared by every
client queue; the published JSON is embedded byte for byte, never re-encoded.

The client frames are wire models (``codec.Model``; ``Subscribe(...).encode()`` writes the
frame with its ``action``). They are parsed by hand rather than by a typed decode so that
a client's error frame names the field in plain words and a lone symbol string is accepted.
"""

from __future__ import annotations

from typing import Any

from liquidcrypto import codec
from liquidcrypto.errors import InvalidPayloadError
from liquidcrypto.nats import subjects

ACTIONS = ("subscribe", "unsubscribe", "ping")
POLICIES = ("latest", "every")


class Subscribe(codec.Model, frozen=True, kw_only=True, tag_field="action", tag="subscribe"):
    """``{"action": "subscribe"}``: symbols, and optionally where to start the history."""

    symbols: tuple[str, ...]
    since_seq: int | dict[str, int] | None = None
    last: int | None = None
    policy: str = "latest"

    @property
    def conflate(self) -> bool:
        """Whether the subscription may be conflated (the ``latest`` policy)."""
        return self.policy != "every"


class Unsubscribe(codec.Model, frozen=True, kw_only=True, tag_field="action", tag="unsubscribe"):
    """``{"action": "unsubscribe"}``."""

    symbols: tuple[str, ...]


class Ping(codec.Model, frozen=True, kw_only=True, tag_field="action", tag="ping"):
    """``{"action": "ping"}``: answered with ``{"type": "pong"}`` (browsers cannot send ping frames)."""


ClientFrame = Subscribe | Unsubscribe | Ping


def _symbols(frame: dict[str, Any], max_symbols: int) -> tuple[str, ...]:
    raw = frame.get("symbols")
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise InvalidPayloadError('"symbols" must be a non-empty list of strings')
    if len(raw) > max_symbols:
        raise InvalidPayloadError(f"{len(raw)} symbols in one frame exceeds the limit of {max_symbols}")
    # token() raises InvalidSubjectError (a ValueError) naming the symbol.
    return tuple(dict.fromkeys(subjects.token(s, "symbol") for s in raw))


def _non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidPayloadError(f'"{name}" must be a non-negative integer, not {value!r}')
    return value


def parse_client_frame(text: str | bytes, *, max_symbols: int) -> ClientFrame:
    """Parse one client frame.

    Args:
        text: the frame as received.
        max_symbols: most symbols one frame may name.

    Raises:
        InvalidPayloadError: not JSON, not an object, unknown action, bad field.
        InvalidSubjectError: a symbol that cannot be a subject token.
    """
    frame = codec.decode(text.encode() if isinstance(text, str) else text)
    if not isinstance(frame, dict):
        raise InvalidPayloadError('a frame must be a JSON object with an "action"')
    action = frame.get("action")
    if action == "ping":
        return Ping()
    if action not in ACTIONS:
        raise InvalidPayloadError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    symbols = _symbols(frame, max_symbols)
    if action == "unsubscribe":
        return Unsubscribe(symbols=symbols)
    since: int | dict[str, int] | None = None
    raw_since = frame.get("since_seq")
    if isinstance(raw_since, dict):
        since = {subjects.token(k, "symbol"): _non_negative_int(v, "since_seq") for k, v in raw_since.items()}
    elif raw_since is not None:
        since = _non_negative_int(raw_since, "since_seq")
    last = frame.get("last")
    if last is not None:
        last = _non_negative_int(last, "last")
    if since is not None and last is not None:
        raise InvalidPayloadError('give "since_seq" or "last", not both')
    return Subscribe(symbols=symbols, since_seq=since, last=last, policy=_policy(frame))


def _policy(frame: dict[str, Any]) -> str:
    """The subscription's delivery policy: ``"policy"``, or the older ``"conflate"`` flag
    (``false`` is ``every``, ``true`` is ``latest``); ``latest`` by default."""
    policy = frame.get("policy")
    conflate = frame.get("conflate")
    if conflate is not None and not isinstance(conflate, bool):
        raise InvalidPayloadError(f'"conflate" must be true or false, not {conflate!r}')
    if policy is None:
        return "every" if conflate is False else "latest"
    if policy not in POLICIES:
        raise InvalidPayloadError(f'"policy" must be one of {", ".join(POLICIES)}, not {policy!r}')
    if conflate is not None and conflate != (policy == "latest"):
        raise InvalidPayloadError(f'"conflate": {str(conflate).lower()} contradicts "policy": {policy!r}')
    return str(policy)


def trade_frame_head(symbol: str) -> str:
    """The constant start of every trade frame of ``symbol`` (JSON-escaped once)."""
    return '{"type":"trade","symbol":' + codec.encode(symbol).decode() + ',"data":'


def trade_frame(prefix: str, data_json: str, seq: int) -> str:
    """A trade frame from its symbol prefix, the published JSON text and the sequence."""
    return f'{prefix}{data_json},"seq":{seq}}}'


def with_missed(frame: str, missed: int) -> str:
    """``frame`` (a JSON object) with ``"missed": missed`` added."""
    return f'{frame[:-1]},"missed":{missed}}}'


def frame(type_: str, **fields: Any) -> str:
    """A server frame of ``type_`` with ``fields``."""
    return codec.encode({"type": type_, **fields}).decode()


def error_frame(message: str, **fields: Any) -> str:
    """An ``error`` frame: ``message`` for people, and ``fields`` such as a ``code`` for programs."""
    return frame("error", message=message, **fields)

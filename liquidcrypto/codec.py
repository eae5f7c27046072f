"""The JSON codec, in one place (orjson)."""

from __future__ import annotations

from typing import Any

import orjson

from liquidcrypto.errors import InvalidPayloadError

_OPTS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def encode(data: Any) -> bytes:
    """Encode a JSON-able value to bytes.

    Raises:
        InvalidPayloadError: the value cannot be represented as JSON.
    """
    try:
        return orjson.dumps(data, option=_OPTS)
    except TypeError as exc:
        raise InvalidPayloadError(f"cannot encode {type(data).__name__} as JSON: {exc}") from exc


def decode(raw: bytes) -> Any:
    """Decode JSON bytes.

    Raises:
        InvalidPayloadError: ``raw`` is not valid JSON (the first bytes are named).
    """
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidPayloadError(f"payload is not valid JSON ({exc}): {bytes(raw[:80])!r}") from exc

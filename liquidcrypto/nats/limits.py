"""The size of a message as the server counts it, checked before anything is sent.

nats-py checks a publish's body against the server's ``max_payload`` but not body +
headers. When the sum is over, the server answers ``-ERR 'Maximum Payload Violation'``
and closes the connection. ``check_size`` refuses such a message first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from liquidcrypto.errors import PayloadTooLargeError

_STATUS_LINE = len(b"NATS/1.0\r\n")
_CRLF = 2
_SEPARATOR = len(b": ")
_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


def headers_size(headers: Mapping[str, Any] | None) -> int:
    """Bytes of ``headers`` as nats-py encodes them: ``NATS/1.0\\r\\n``, then
    ``Key: Value\\r\\n`` for each (key and value stripped, newlines in values turned into
    spaces, empty keys skipped), then ``\\r\\n``; 0 without headers."""
    if headers is None:
        return 0
    size = _STATUS_LINE + _CRLF
    for key, value in headers.items():
        k = key.strip()
        if not k:
            continue
        v = str(value).strip().translate(_NEWLINES)
        size += len(k.encode()) + _SEPARATOR + len(v.encode()) + _CRLF
    return size


def check_size(subject: str, payload: bytes, headers: Mapping[str, Any] | None, limit: int) -> None:
    """Refuse a message the server would reject (and close the connection for).

    Raises:
        PayloadTooLargeError: body + encoded headers exceed ``limit`` (the server's
            ``max_payload``).
    """
    body = len(payload)
    if body > limit:  # no need to size the headers
        raise PayloadTooLargeError(subject, body, headers_size(headers), limit)
    if headers is None:
        return
    head = headers_size(headers)
    if body + head > limit:
        raise PayloadTooLargeError(subject, body, head, limit)

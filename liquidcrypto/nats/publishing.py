"""Sending through nats-py: what is checked before a message goes, and what a failure means.

- **Size.** nats-py checks a publish's body against the server's ``max_payload`` but not
  body + headers. When the sum is over, the server answers ``-ERR 'Maximum Payload
  Violation'`` and closes the connection. ``check_size`` refuses such a message first.
- **No phantom writes.** A message that expects an answer (a JetStream publish, a
  request) is not handed to nats-py while it is not connected (``sendable``): nats-py
  would keep it in its reconnect buffer and send it after the caller was told it failed.
- **Failures say what is known**: ``NatsUnavailableError`` (``sent=False``) when nothing
  was or will be stored, ``PublishOutcomeUnknownError`` (``sent=True``) when a JetStream
  publish was sent and its acknowledgement did not come.

``NatsClient``'s publish methods are these functions on its current connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsConnection
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import NoStreamResponseError, TooManyStalledMsgsError

from liquidcrypto.errors import (
    NatsUnavailableError,
    PayloadTooLargeError,
    PublishOutcomeUnknownError,
    RequestTimeoutError,
)
from liquidcrypto.nats import headers as hdr

Headers = Mapping[str, str] | None

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


def sendable(nc: NatsConnection | None, subject: str, payload: bytes, headers: Headers, where: str) -> NatsConnection:
    """``nc``, if a message that expects an answer can go out on it now.

    Args:
        where: the server and client state, for the error message.

    Raises:
        NatsUnavailableError: not connected (reconnecting, degraded, closed); not sent.
        PayloadTooLargeError: body + headers exceed the server's ``max_payload``.
    """
    if nc is None or not nc.is_connected:
        raise NatsUnavailableError(f"NATS {where} is not connected; message to {subject!r} not sent")
    check_size(subject, payload, headers, nc.max_payload)
    return nc


async def core_publish(nc: NatsConnection, subject: str, payload: bytes, headers: Headers) -> None:
    """A core publish; while nats-py reconnects it waits in its reconnect buffer.

    Raises:
        PayloadTooLargeError: body + headers exceed the server's ``max_payload``.
        NatsUnavailableError: the reconnect buffer is full, or the connection is closed.
    """
    check_size(subject, payload, headers, nc.max_payload)
    try:
        await nc.publish(subject, payload, headers=dict(headers) if headers else None)
    except nats.errors.OutboundBufferLimitError as exc:
        raise NatsUnavailableError(
            f"NATS reconnect buffer full while publishing to {subject!r}; message not sent"
        ) from exc
    except nats.errors.ConnectionClosedError as exc:
        raise NatsUnavailableError(f"NATS connection closed; message to {subject!r} not sent") from exc


async def js_publish(js: JetStreamContext, subject: str, payload: bytes, headers: Headers, timeout: float) -> PubAck:
    """A JetStream publish on a connection ``sendable`` approved; waits for the ack.

    Raises:
        PublishOutcomeUnknownError: sent, no acknowledgement within ``timeout``.
        NatsUnavailableError: not sent, or no stream captures the subject (not stored).
    """
    try:
        ack: PubAck = await js.publish(subject, payload, timeout=timeout, headers=dict(headers) if headers else None)
    except NoStreamResponseError as exc:
        raise NatsUnavailableError(f"no JetStream stream stores {subject!r}; not stored") from exc
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        msg_id = headers.get(hdr.MSG_ID) if headers else None
        raise PublishOutcomeUnknownError(subject, msg_id, timeout) from exc
    except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
        raise NatsUnavailableError(f"NATS unavailable; message to {subject!r} not sent") from exc
    return ack


async def js_publish_async(
    js: JetStreamContext, subject: str, payload: bytes, headers: Headers, stall: float | None
) -> asyncio.Future[PubAck]:
    """Start a JetStream publish on a connection ``sendable`` approved.

    Raises:
        NatsUnavailableError: no acknowledgement slot within ``stall``, or the connection
            went; not sent.
    """
    try:
        future: asyncio.Future[PubAck] = await js.publish_async(
            subject, payload, wait_stall=stall, headers=dict(headers) if headers else None
        )
    except TooManyStalledMsgsError as exc:
        raise NatsUnavailableError(
            f"{subject!r}: no JetStream acknowledgement slot within {stall:g} s; not sent"
        ) from exc
    except (nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
        raise NatsUnavailableError(f"NATS unavailable; message to {subject!r} not sent") from exc
    return future


async def request(nc: NatsConnection, subject: str, payload: bytes, timeout: float) -> Msg:
    """A core request on a connection ``sendable`` approved.

    Raises:
        RequestTimeoutError: no reply within ``timeout`` seconds, or no responder.
        NatsUnavailableError: the connection closed; not sent.
    """
    try:
        msg: Msg = await nc.request(subject, payload, timeout=timeout)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError) as exc:
        raise RequestTimeoutError(subject, timeout) from exc
    except nats.errors.ConnectionClosedError as exc:
        raise NatsUnavailableError(f"NATS connection closed; request to {subject!r} not sent") from exc
    return msg

"""Key-value buckets of the bus (declared in ``liquidcrypto.nats.streams``): binding and key validation."""

from __future__ import annotations

import re

from nats.js.kv import KeyValue

from liquidcrypto.errors import InvalidSubjectError
from liquidcrypto.nats import streams, subjects
from liquidcrypto.nats.client import NatsClient

# nats-py's rule for keys, minus '.', so one id is one key token.
_KEY = re.compile(r"^[-/_=a-zA-Z0-9]+$")


def kv_key(value: object, what: str) -> str:
    """Return ``value`` if it is a valid subject token and key-value key.

    Raises:
        InvalidSubjectError: (a ``ValueError``) naming ``what`` and the value.
    """
    key = subjects.token(value, what)
    if not _KEY.match(key):
        raise InvalidSubjectError(what, value, "may only contain letters, digits, '-', '_', '=' and '/'")
    return key


async def open_bucket(client: NatsClient, bucket: str) -> KeyValue:
    """Bind one of the bus's buckets.

    The bus's resources (``streams.A2A_RESOURCES``) are ensured first, and again by the
    client after every reconnection.

    Raises:
        NatsUnavailableError: NATS is not available.
    """
    await client.require(streams.A2A_RESOURCES)
    return await client.js.key_value(bucket)

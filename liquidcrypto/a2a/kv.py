"""Key-value buckets of the bus: idempotent creation and key validation."""

from __future__ import annotations

import logging
import re

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from liquidcrypto.errors import InvalidSubjectError
from liquidcrypto.nats import subjects

log = logging.getLogger(__name__)

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


async def ensure_bucket(
    js: JetStreamContext, bucket: str, *, ttl: float | None, replicas: int, description: str
) -> KeyValue:
    """Bind the bucket, creating it if missing (concurrent creators are fine)."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(
        bucket=bucket, description=description, history=1, ttl=ttl, replicas=replicas,
        storage=StorageType.FILE,
    )
    try:
        kv = await js.create_key_value(config)
        log.info("created key-value bucket %s", bucket)
        return kv
    except nats.js.errors.APIError:
        # Another process created it first with the same config: bind to it.
        return await js.key_value(bucket)

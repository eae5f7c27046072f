"""Optional authentication of ``/ws`` clients (off by default).

- ``WS_TOKEN``: a shared secret; the client sends it as ``?token=...`` or
  ``Authorization: Bearer ...``.
- ``WS_JWT_SECRET``: the client sends a JWT signed with HS256 and this secret, in the same
  places; its signature, ``exp`` and ``nbf`` are checked (``alg`` must be ``HS256``:
  ``none`` and other algorithms are refused).

With either or both set, a client is admitted if one of them matches. Tokens are
compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Any

import orjson


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_valid(token: str, secret: str, *, now: float | None = None, leeway: float = 30.0) -> bool:
    """Whether ``token`` is an HS256 JWT signed with ``secret`` and valid at ``now``."""
    try:
        header_b64, payload_b64, signature_b64 = token.split(".")
        header: Any = orjson.loads(_b64decode(header_b64))
        claims: Any = orjson.loads(_b64decode(payload_b64))
        signature = _b64decode(signature_b64)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        return False
    if not isinstance(header, dict) or header.get("alg") != "HS256" or not isinstance(claims, dict):
        return False
    expected = hmac.new(secret.encode(), f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        return False
    t = time.time() if now is None else now
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if exp is not None and (not isinstance(exp, int | float) or t > exp + leeway):
        return False
    return not (nbf is not None and (not isinstance(nbf, int | float) or t < nbf - leeway))


def presented_token(query: Mapping[str, str], headers: Mapping[str, str]) -> str:
    """The token a client sent: ``Authorization: Bearer`` first, then ``?token=``."""
    header = headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return query.get("token") or ""


def authorised(given: str, *, token: str | None, jwt_secret: str | None) -> bool:
    """Whether ``given`` admits the client; always true when no auth is configured."""
    if not token and not jwt_secret:
        return True
    if token and hmac.compare_digest(given.encode(), token.encode()):
        return True
    return bool(jwt_secret) and jwt_valid(given, jwt_secret or "")

"""Optional authentication of ``/ws`` clients and of the ops endpoints (off by default).

- ``WS_TOKEN``: a shared secret.
- ``WS_JWT_SECRET``: the key of HS256 JWTs, verified with PyJWT: signature, ``alg``
  (only ``HS256``; ``none`` and every other algorithm are refused), ``exp`` (required),
  ``nbf`` and ``iat`` with ``WS_JWT_LEEWAY`` seconds of leeway, ``aud`` when
  ``WS_JWT_AUDIENCE`` is set and ``iss`` when ``WS_JWT_ISSUER`` is set. A session admitted
  by a JWT is closed with 4001 when the JWT expires (``Credential.expires_at``).

With either or both set, a client is admitted if one of them matches. A client presents
its token in one of three places, looked at in this order:

1. ``Authorization: Bearer <token>`` (servers, CLIs);
2. the WebSocket subprotocol list ``["liquidcrypto", "bearer.<token>"]`` (browsers,
   which cannot set headers: ``new WebSocket(url, ["liquidcrypto", "bearer." + token])``);
   the server selects ``liquidcrypto`` and never echoes the token. Kubernetes carries
   bearer tokens the same way (``base64url.bearer.authorization.k8s.io.<token>``);
3. ``?token=<token>`` (kept for old clients; the query string is redacted from logs).

Tokens are compared in constant time and never logged, counted or sent back.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt

SUBPROTOCOL = "liquidcrypto"
BEARER_PREFIX = "bearer."


@dataclass(frozen=True)
class Credential:
    """What admitted a client: ``kind`` is ``none``, ``token`` or ``jwt``.

    ``expires_at`` (Unix time, leeway included) is set for a JWT: the session ends then.
    """

    kind: str
    expires_at: float | None = None


def jwt_claims(
    token: str,
    secret: str,
    *,
    leeway: float = 30.0,
    audience: str | None = None,
    issuer: str | None = None,
) -> dict[str, Any] | None:
    """The claims of ``token`` when it is a valid HS256 JWT signed with ``secret``, else ``None``.

    ``exp`` is required; ``aud`` and ``iss`` are checked when ``audience``/``issuer`` are given.
    """
    if not token or token.count(".") != 2:
        return None
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            leeway=leeway,
            audience=audience,
            issuer=issuer,
            options={"require": ["exp"], "verify_aud": audience is not None, "verify_iss": issuer is not None},
        )
    except jwt.PyJWTError:
        return None
    return claims


def token_matches(given: str, expected: str | None) -> bool:
    """Constant-time comparison; never true for an empty ``expected``."""
    return bool(expected) and hmac.compare_digest(given.encode(), (expected or "").encode())


def bearer_header(headers: Mapping[str, str]) -> str:
    """The token of an ``Authorization: Bearer`` header, or ``""``."""
    header = headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def presented_token(query: Mapping[str, str], headers: Mapping[str, str], subprotocols: Sequence[str] = ()) -> str:
    """The token a client sent: the Bearer header, then a ``bearer.`` subprotocol, then ``?token=``."""
    if token := bearer_header(headers):
        return token
    for proto in subprotocols:
        if proto[: len(BEARER_PREFIX)].lower() == BEARER_PREFIX:
            return proto[len(BEARER_PREFIX) :]
    return query.get("token") or ""


def selected_subprotocol(subprotocols: Sequence[str]) -> str | None:
    """The subprotocol the server answers with: ``liquidcrypto`` when offered (never a token)."""
    return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None


def authenticate(
    given: str,
    *,
    token: str | None,
    jwt_secret: str | None,
    leeway: float = 30.0,
    audience: str | None = None,
    issuer: str | None = None,
) -> Credential | None:
    """The credential ``given`` proves, or ``None`` when the client must be refused.

    Always ``Credential("none")`` when no authentication is configured.
    """
    if not token and not jwt_secret:
        return Credential("none")
    if token_matches(given, token):
        return Credential("token")
    if jwt_secret:
        claims = jwt_claims(given, jwt_secret, leeway=leeway, audience=audience, issuer=issuer)
        if claims is not None:
            return Credential("jwt", expires_at=float(claims["exp"]) + leeway)
    return None


def seconds_left(credential: Credential, now: float | None = None) -> float | None:
    """Seconds until ``credential`` expires (``None``: never)."""
    if credential.expires_at is None:
        return None
    return credential.expires_at - (time.time() if now is None else now)

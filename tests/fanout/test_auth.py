"""``/ws`` authentication: shared token, HS256 JWTs (PyJWT), where a token is looked for,
log redaction and the settings that drive them."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time

import jwt as pyjwt
import orjson
import pytest

from liquidcrypto.config import Settings
from liquidcrypto.fanout.auth import (
    Credential,
    authenticate,
    jwt_claims,
    presented_token,
    seconds_left,
    selected_subprotocol,
)
from liquidcrypto.redact import RedactSecrets, redact

KEY = "k" * 32


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt(claims: dict[str, object], secret: str, alg: str = "HS256") -> str:
    """A JWT signed by hand (HMAC-SHA256 whatever ``alg`` claims), to forge bad headers."""
    head = b64(orjson.dumps({"alg": alg, "typ": "JWT"}))
    body = b64(orjson.dumps(claims))
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_jwt_signature_expiry_and_algorithm_are_checked() -> None:
    now = time.time()
    assert jwt_claims(make_jwt({"sub": "u1", "exp": now + 60}, KEY), KEY) is not None
    assert jwt_claims(make_jwt({"sub": "u1", "exp": now + 60}, "other" * 8), KEY) is None
    assert jwt_claims(make_jwt({"exp": now - 3600}, KEY), KEY) is None
    assert jwt_claims(make_jwt({"exp": now + 60, "nbf": now + 3600}, KEY), KEY) is None
    assert jwt_claims(make_jwt({"exp": now + 60}, KEY, alg="none"), KEY) is None
    long_key = KEY * 2  # HS512 wants 64 bytes
    assert jwt_claims(pyjwt.encode({"exp": now + 60}, long_key, algorithm="HS512"), long_key) is None
    token = make_jwt({"sub": "u1", "exp": now + 60}, KEY)
    head, body, sig = token.split(".")
    assert jwt_claims(f"{head}.{body}.", KEY) is None
    assert jwt_claims(f"{head}.{b64(orjson.dumps({'sub': 'admin', 'exp': now + 60}))}.{sig}", KEY) is None
    for junk in ["", "a.b", "a.b.c", "!!.??.##", "a.b.c.d"]:
        assert jwt_claims(junk, KEY) is None


def test_jwt_without_exp_is_refused() -> None:
    assert jwt_claims(make_jwt({"sub": "u1"}, KEY), KEY) is None
    assert jwt_claims(make_jwt({"sub": "u1", "exp": "tomorrow"}, KEY), KEY) is None


def test_jwt_leeway_is_configurable() -> None:
    expired_10s_ago = make_jwt({"exp": time.time() - 10}, KEY)
    assert jwt_claims(expired_10s_ago, KEY, leeway=30) is not None
    assert jwt_claims(expired_10s_ago, KEY, leeway=0) is None


def test_jwt_audience_and_issuer_are_checked_when_configured() -> None:
    exp = time.time() + 60
    good = make_jwt({"exp": exp, "aud": "trades", "iss": "auth.example"}, KEY)
    assert jwt_claims(good, KEY, audience="trades", issuer="auth.example") is not None
    assert jwt_claims(good, KEY) is not None  # not configured: not checked
    assert (
        jwt_claims(make_jwt({"exp": exp, "aud": "admin", "iss": "auth.example"}, KEY), KEY, audience="trades") is None
    )
    assert jwt_claims(make_jwt({"exp": exp, "iss": "auth.example"}, KEY), KEY, audience="trades") is None
    assert jwt_claims(make_jwt({"exp": exp, "aud": "trades", "iss": "evil"}, KEY), KEY, issuer="auth.example") is None
    assert jwt_claims(make_jwt({"exp": exp, "aud": "trades"}, KEY), KEY, issuer="auth.example") is None


def test_authenticate_admits_either_configured_credential() -> None:
    assert authenticate("", token=None, jwt_secret=None) == Credential("none")  # off by default
    assert authenticate("s3cret", token="s3cret", jwt_secret=None) == Credential("token")
    assert authenticate("wrong", token="s3cret", jwt_secret=None) is None
    exp = int(time.time()) + 60
    cred = authenticate(make_jwt({"sub": "u", "exp": exp}, KEY), token="s3cret", jwt_secret=KEY, leeway=5)
    assert cred == Credential("jwt", expires_at=exp + 5)
    left = seconds_left(cred)
    assert left is not None and 60 < left <= 65
    assert seconds_left(Credential("token")) is None
    assert authenticate(make_jwt({"sub": "u", "exp": exp}, KEY), token="s3cret", jwt_secret=None) is None
    assert authenticate("", token=None, jwt_secret=KEY) is None


def test_token_is_taken_from_bearer_header_then_subprotocol_then_query() -> None:
    assert presented_token({"token": "q"}, {"authorization": "Bearer h"}, ["liquidcrypto", "bearer.p"]) == "h"
    assert presented_token({"token": "q"}, {"authorization": "Basic x"}, ["liquidcrypto", "bearer.p"]) == "p"
    assert presented_token({"token": "q"}, {}, ["liquidcrypto"]) == "q"
    assert presented_token({}, {}) == ""


def test_the_selected_subprotocol_never_carries_the_token() -> None:
    assert selected_subprotocol(["liquidcrypto", "bearer.s3cret"]) == "liquidcrypto"
    assert selected_subprotocol(["bearer.s3cret"]) is None
    assert selected_subprotocol([]) is None


def test_redact_removes_query_values_bearer_tokens_and_auth_headers() -> None:
    line = '127.0.0.1:5 - "WebSocket /ws?token=s3cret&batch=1" [accepted]'
    assert redact(line) == '127.0.0.1:5 - "WebSocket /ws?token=[redacted]&batch=1" [accepted]'
    assert "s3cret" not in redact("GET /metrics?x=1&token=s3cret HTTP/1.1")
    assert "s3cret" not in redact("< Authorization: Bearer s3cret")
    assert "s3cret" not in redact("< Sec-WebSocket-Protocol: liquidcrypto, bearer.s3cret")
    assert "s3cret" not in redact("subprotocols ['liquidcrypto', 'bearer.s3cret']")
    assert redact("nothing secret here: 42") == "nothing secret here: 42"


def test_redaction_filter_rewrites_formatted_records() -> None:
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s"', ("peer", "/ws?token=x1"), None
    )
    assert RedactSecrets().filter(record)
    assert record.getMessage() == 'peer - "WebSocket /ws?token=[redacted]"'


def test_edge_settings_are_read_and_checked() -> None:
    s = Settings.from_env(
        {
            "WS_PING_INTERVAL": "5",
            "WS_PING_TIMEOUT": "7.5",
            "WS_JWT_LEEWAY": "0",
            "WS_JWT_AUDIENCE": "trades",
            "WS_JWT_ISSUER": "auth.example",
            "WS_ALLOWED_ORIGINS": "https://App.example/, http://127.0.0.1:3000",
            "METRICS_TOKEN": "m",
            "DASHBOARD_TOKEN_ORIGINS": "https://b.example",
        }
    )
    assert (s.ws_ping_interval, s.ws_ping_timeout, s.ws_jwt_leeway) == (5.0, 7.5, 0.0)
    assert (s.ws_jwt_audience, s.ws_jwt_issuer, s.metrics_token) == ("trades", "auth.example", "m")
    assert s.ws_allowed_origins == ("https://app.example", "http://127.0.0.1:3000")
    assert s.dashboard_token_origins == ("https://b.example",)
    d = Settings.from_env({})
    assert (d.ws_ping_interval, d.ws_ping_timeout, d.ws_jwt_leeway) == (20.0, 20.0, 30.0)
    assert d.ws_allowed_origins == () and d.metrics_token is None
    with pytest.raises(ValueError, match=r"WS_ALLOWED_ORIGINS: 'app\.example'"):
        Settings.from_env({"WS_ALLOWED_ORIGINS": "app.example"})
    with pytest.raises(ValueError, match="WS_PING_INTERVAL=0"):
        Settings.from_env({"WS_PING_INTERVAL": "0"})
    with pytest.raises(ValueError, match="WS_JWT_LEEWAY=-1"):
        Settings.from_env({"WS_JWT_LEEWAY": "-1"})

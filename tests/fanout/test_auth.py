"""``/ws`` authentication: shared token and HS256 JWT checks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import orjson

from liquidcrypto.fanout.auth import authorised, jwt_valid, presented_token


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def make_jwt(claims: dict[str, object], secret: str, alg: str = "HS256") -> str:
    head = b64(orjson.dumps({"alg": alg, "typ": "JWT"}))
    body = b64(orjson.dumps(claims))
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_jwt_signature_expiry_and_algorithm_are_checked() -> None:
    now = time.time()
    assert jwt_valid(make_jwt({"sub": "u1", "exp": now + 60}, "k"), "k")
    assert jwt_valid(make_jwt({"sub": "u1"}, "k"), "k")
    assert not jwt_valid(make_jwt({"sub": "u1", "exp": now + 60}, "other"), "k")
    assert not jwt_valid(make_jwt({"exp": now - 3600}, "k"), "k")
    assert not jwt_valid(make_jwt({"nbf": now + 3600}, "k"), "k")
    assert not jwt_valid(make_jwt({"sub": "u1"}, "k", alg="none"), "k")
    token = make_jwt({"sub": "u1"}, "k")
    head, body, _ = token.split(".")
    assert not jwt_valid(f"{head}.{body}.", "k")
    assert not jwt_valid(f"{head}.{b64(orjson.dumps({'sub': 'admin'}))}.{token.split('.')[2]}", "k")
    for junk in ["", "a.b", "a.b.c", "!!.??.##"]:
        assert not jwt_valid(junk, "k")


def test_authorised_admits_either_configured_credential() -> None:
    assert authorised("", token=None, jwt_secret=None)  # off by default
    assert authorised("s3cret", token="s3cret", jwt_secret=None)
    assert not authorised("wrong", token="s3cret", jwt_secret=None)
    jwt = make_jwt({"sub": "u"}, "jk")
    assert authorised(jwt, token="s3cret", jwt_secret="jk")
    assert not authorised(jwt, token="s3cret", jwt_secret=None)
    assert not authorised("", token=None, jwt_secret="jk")


def test_token_is_taken_from_bearer_header_then_query() -> None:
    assert presented_token({"token": "q"}, {"authorization": "Bearer h"}) == "h"
    assert presented_token({"token": "q"}, {}) == "q"
    assert presented_token({}, {}) == ""

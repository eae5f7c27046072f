"""Minimal NATS JWT v2 issuing for tests of ``NATS_CREDS`` (operator mode), with nkeys."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import nkeys
import orjson


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def new_keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def issue(issuer: nkeys.KeyPair, subject: str, name: str, nats: dict[str, object]) -> str:
    header = _b64(orjson.dumps({"typ": "JWT", "alg": "ed25519-nkey"}))
    claims = {
        "jti": base64.b32encode(os.urandom(20)).decode().rstrip("="),
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    body = _b64(orjson.dumps(claims))
    signature = _b64(issuer.sign(f"{header}.{body}".encode()))
    return f"{header}.{body}.{signature}"


def operator_setup(d: Path) -> tuple[str, Path]:
    """Server config text (operator, memory resolver, a JetStream account) and a user creds file."""
    op = new_keypair(nkeys.PREFIX_BYTE_OPERATOR)
    acc = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    sys_acc = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    op_pub, acc_pub, sys_pub = (k.public_key.decode() for k in (op, acc, sys_acc))
    op_jwt = issue(op, op_pub, "op", {"type": "operator", "system_account": sys_pub})
    unlimited = {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
    }
    js = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    acc_jwt = issue(op, acc_pub, "app", {"type": "account", "limits": {**unlimited, **js}})
    sys_jwt = issue(op, sys_pub, "SYS", {"type": "account", "limits": unlimited})
    user_jwt = issue(
        acc,
        user.public_key.decode(),
        "agent",
        {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
    )
    creds = d / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        f"{user_jwt}\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n"
    )
    config = (
        f"operator: {op_jwt}\n"
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {acc_pub}: {acc_jwt}\n  {sys_pub}: {sys_jwt}\n}}\n"
    )
    return config, creds

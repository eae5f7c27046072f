"""How a ``NatsClient`` connects: nats-py options from ``Settings`` (auth, TLS, reconnect
policy) and the small helpers around them. No I/O here."""

from __future__ import annotations

import random
import ssl
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nats.aio.client import Server as NatsServerInfo

from liquidcrypto.config import Settings


def connect_options(s: Settings) -> dict[str, Any]:
    """nats-py ``connect`` keyword arguments for ``s``, without the callbacks.

    Reconnects never stop (``max_reconnect_attempts=-1``) and wait a jittered, capped
    exponential delay. A stalled or silent server is noticed within seconds: a PING every
    ``NATS_PING_INTERVAL`` (2 s), and when more than ``NATS_MAX_OUTSTANDING_PINGS`` (2) are
    unanswered nats-py reconnects — between 4 and 6 s after the server went quiet with
    the defaults (a frozen server process, a VM pause, a path that drops packets). An
    event loop blocked that long in this process (a sync handler) also counts as silence.
    """
    opts: dict[str, Any] = {
        "servers": s.nats_servers(),
        "name": s.nats_name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": s.nats_ping_interval,
        "max_outstanding_pings": s.nats_max_outstanding_pings,
        "reconnect_to_server_handler": pick_server,
    }
    if s.nats_user:
        opts["user"] = s.nats_user
        opts["password"] = s.nats_password or ""
    if s.nats_token:
        opts["token"] = s.nats_token
    if s.nats_creds:
        opts["user_credentials"] = s.nats_creds
    if s.nats_nkey_seed:
        seed = s.nats_nkey_seed.strip()
        if seed.startswith("SU"):
            opts["nkeys_seed_str"] = seed
        else:
            opts["nkeys_seed"] = seed
    tls = tls_context(s)
    if tls is not None:
        opts["tls"] = tls
    return opts


def redact_url(url: str) -> str:
    """``url`` with any user, password or token replaced by ``***``."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


def jittered_delay(attempt: int, base: float = 0.2, cap: float = 2.0) -> float:
    """Exponential back-off with full jitter, capped so recovery stays within seconds."""
    return random.uniform(base / 2, min(cap, base * 2**attempt))


def pick_server(servers: list[NatsServerInfo], info: dict[str, Any]) -> tuple[NatsServerInfo | None, float]:
    """nats-py reconnect hook: least-tried server first, jittered exponential delay."""
    best = min(servers, key=lambda s: s.reconnects)
    return best, jittered_delay(best.reconnects)


def tls_context(s: Settings) -> ssl.SSLContext | None:
    if not (s.nats_tls_ca or s.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=s.nats_tls_ca)
    if s.nats_tls_cert:
        ctx.load_cert_chain(s.nats_tls_cert, s.nats_tls_key)
    return ctx


def describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text

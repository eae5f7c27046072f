"""Settings read from the environment, in one place.

Every variable is documented in docs/configuration.md. ``Settings.from_env``
is the only function that reads ``os.environ`` for the package.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

DEFAULT_NATS_URL = "nats://localhost:4222"


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None


def _positive(env: Mapping[str, str], name: str, default: float, *, allow_zero: bool = False) -> float:
    value = _float(env, name, default)
    if value < 0 or (value == 0 and not allow_zero):
        bound = "0 or more" if allow_zero else "more than 0"
        raise ValueError(f"environment variable {name}={value:g} must be {bound} seconds")
    return value


def _origins(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """A comma-separated list of origins (``scheme://host[:port]``), normalised."""
    out = []
    for raw in (env.get(name) or "").split(","):
        origin = raw.strip().rstrip("/").lower()
        if not origin:
            continue
        if "://" not in origin or origin.count("/") != 2:
            raise ValueError(f"environment variable {name}: {raw.strip()!r} is not an origin like https://host:port")
        out.append(origin)
    return tuple(out)


_N = TypeVar("_N", int, float)


def _above_zero(value: _N, name: str) -> _N:
    if value <= 0:
        raise ValueError(f"environment variable {name}={value:g} must be positive")
    return value


def _str(env: Mapping[str, str], name: str) -> str | None:
    raw = env.get(name)
    return raw if raw else None


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything configurable, with its default."""

    nats_url: str = DEFAULT_NATS_URL
    js_replicas: int = 1
    nats_user: str | None = None
    nats_password: str | None = None
    nats_token: str | None = None
    nats_creds: str | None = None
    nats_nkey_seed: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    nats_name: str = "liquidcrypto"
    nats_ping_interval: float = 2.0
    nats_max_outstanding_pings: int = 2
    ws_backend: str = "nats"
    redis_url: str = "redis://localhost:6379"
    host: str = "127.0.0.1"
    port: int = 3000
    state_dir: Path = field(default_factory=lambda: Path(".liquidcrypto"))
    dedupe_window: float = 3600.0
    ws_token: str | None = None
    ws_jwt_secret: str | None = None
    ws_max_clients: int = 10_000
    ws_max_symbols: int = 100
    ws_max_frame_bytes: int = 64 * 1024
    ws_queue_size: int = 1024
    ws_conflate_at: int = 256
    ws_disconnect_after: int = 4096
    ws_write_delay: float = 0.0
    ws_publish_window: int = 1024
    ws_history_max: int = 10_000
    ws_max_replays: int = 8
    ws_replay_queue: int = 64
    ws_replay_page: int = 256
    ws_max_bad_frames: int = 10
    ws_ping_interval: float = 20.0
    ws_ping_timeout: float = 20.0
    ws_handshake_timeout: float = 10.0
    ws_jwt_leeway: float = 30.0
    ws_jwt_audience: str | None = None
    ws_jwt_issuer: str | None = None
    ws_allowed_origins: tuple[str, ...] = ()
    metrics_token: str | None = None
    dashboard_token_origins: tuple[str, ...] = ()
    ws_max_feeds: int = 1000
    ws_subscribe_rate: float = 20.0
    ws_subscribe_burst: int = 100
    ws_symbols: str | None = None
    a2a_agent_ttl: float = 30.0
    a2a_heartbeat_interval: float = 10.0
    gc_gen0_threshold: int = 50_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``env`` (default ``os.environ``).

        Raises:
            ValueError: a variable has a value of the wrong type, naming it.
        """
        e = os.environ if env is None else env
        backend = (e.get("WS_BACKEND") or "nats").strip().lower()
        if backend not in ("nats", "redis"):
            raise ValueError(f"environment variable WS_BACKEND={backend!r} must be 'nats' or 'redis'")
        replicas = _int(e, "NATS_JS_REPLICAS", 1)
        if not 1 <= replicas <= 5:
            raise ValueError(f"environment variable NATS_JS_REPLICAS={replicas} must be between 1 and 5")
        max_pings = _int(e, "NATS_MAX_OUTSTANDING_PINGS", 2)
        if max_pings < 1:
            raise ValueError(f"environment variable NATS_MAX_OUTSTANDING_PINGS={max_pings} must be 1 or more")
        write_delay = _float(e, "WS_WRITE_DELAY", 0.0)
        if not 0 <= write_delay <= 1:
            raise ValueError(f"environment variable WS_WRITE_DELAY={write_delay:g} must be 0 to 1 seconds")
        for name, least in (("WS_MAX_REPLAYS", 1), ("WS_REPLAY_PAGE", 1), ("WS_REPLAY_QUEUE", 0)):
            if _int(e, name, least) < least:
                raise ValueError(f"environment variable {name}={_int(e, name, least)} must be at least {least}")
        return cls(
            nats_url=e.get("NATS_URL") or DEFAULT_NATS_URL,
            js_replicas=replicas,
            nats_user=_str(e, "NATS_USER"),
            nats_password=_str(e, "NATS_PASSWORD"),
            nats_token=_str(e, "NATS_TOKEN"),
            nats_creds=_str(e, "NATS_CREDS"),
            nats_nkey_seed=_str(e, "NATS_NKEY_SEED"),
            nats_tls_ca=_str(e, "NATS_TLS_CA"),
            nats_tls_cert=_str(e, "NATS_TLS_CERT"),
            nats_tls_key=_str(e, "NATS_TLS_KEY"),
            nats_name=e.get("NATS_CLIENT_NAME") or "liquidcrypto",
            nats_ping_interval=_positive(e, "NATS_PING_INTERVAL", 2.0),
            nats_max_outstanding_pings=max_pings,
            ws_backend=backend,
            redis_url=e.get("REDIS_URL") or "redis://localhost:6379",
            host=e.get("HOST") or "127.0.0.1",
            port=_int(e, "PORT", 3000),
            state_dir=Path(e.get("LIQUIDCRYPTO_STATE_DIR") or ".liquidcrypto"),
            dedupe_window=_float(e, "NATS_DEDUPE_WINDOW", 3600.0),
            ws_token=_str(e, "WS_TOKEN"),
            ws_jwt_secret=_str(e, "WS_JWT_SECRET"),
            ws_max_clients=_int(e, "WS_MAX_CLIENTS", 10_000),
            ws_max_symbols=_int(e, "WS_MAX_SYMBOLS", 100),
            ws_max_frame_bytes=_int(e, "WS_MAX_FRAME_BYTES", 64 * 1024),
            ws_queue_size=_int(e, "WS_QUEUE_SIZE", 1024),
            ws_conflate_at=_int(e, "WS_CONFLATE_AT", 256),
            ws_disconnect_after=_int(e, "WS_DISCONNECT_AFTER", 4096),
            ws_write_delay=write_delay,
            ws_publish_window=_int(e, "WS_PUBLISH_WINDOW", 1024),
            ws_history_max=_int(e, "WS_HISTORY_MAX", 10_000),
            ws_max_replays=_int(e, "WS_MAX_REPLAYS", 8),
            ws_replay_queue=_int(e, "WS_REPLAY_QUEUE", 64),
            ws_replay_page=_int(e, "WS_REPLAY_PAGE", 256),
            ws_max_bad_frames=_int(e, "WS_MAX_BAD_FRAMES", 10),
            ws_ping_interval=_positive(e, "WS_PING_INTERVAL", 20.0),
            ws_ping_timeout=_positive(e, "WS_PING_TIMEOUT", 20.0),
            ws_handshake_timeout=_positive(e, "WS_HANDSHAKE_TIMEOUT", 10.0),
            ws_jwt_leeway=_positive(e, "WS_JWT_LEEWAY", 30.0, allow_zero=True),
            ws_jwt_audience=_str(e, "WS_JWT_AUDIENCE"),
            ws_jwt_issuer=_str(e, "WS_JWT_ISSUER"),
            ws_allowed_origins=_origins(e, "WS_ALLOWED_ORIGINS"),
            metrics_token=_str(e, "METRICS_TOKEN"),
            dashboard_token_origins=_origins(e, "DASHBOARD_TOKEN_ORIGINS"),
            ws_max_feeds=_above_zero(_int(e, "WS_MAX_FEEDS", 1000), "WS_MAX_FEEDS"),
            ws_subscribe_rate=_above_zero(_float(e, "WS_SUBSCRIBE_RATE", 20.0), "WS_SUBSCRIBE_RATE"),
            ws_subscribe_burst=_above_zero(_int(e, "WS_SUBSCRIBE_BURST", 100), "WS_SUBSCRIBE_BURST"),
            ws_symbols=_str(e, "WS_SYMBOLS"),
            a2a_agent_ttl=_float(e, "A2A_AGENT_TTL", 30.0),
            a2a_heartbeat_interval=_float(e, "A2A_HEARTBEAT_INTERVAL", 10.0),
            gc_gen0_threshold=_int(e, "GC_GEN0_THRESHOLD", 50_000),
        )

    def nats_servers(self) -> list[str]:
        """The server URLs of ``nats_url`` (comma-separated for a cluster)."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

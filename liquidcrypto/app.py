"""The HTTP service: health, metrics and the WebSocket endpoint (Starlette on uvicorn).

``create_app()`` builds the ASGI app; its lifespan connects NATS with ``init_nats`` (so
the service starts and serves in degraded mode when NATS is down) and closes it on exit.
``uvicorn_options()`` are the uvicorn settings the app relies on (frame size, keep-alive,
no compression); ``liquidcrypto serve``/``dev`` pass them. When you run uvicorn yourself
(``uvicorn liquidcrypto.app:create_app --factory``), pass the same values:
``--ws-max-size`` = ``WS_MAX_FRAME_BYTES``, ``--ws-ping-interval`` = ``WS_PING_INTERVAL``,
``--ws-ping-timeout`` = ``WS_PING_TIMEOUT``, ``--ws-per-message-deflate false``.

``/metrics`` and ``/api/v1/ws/stats`` require ``METRICS_TOKEN`` (``Authorization: Bearer``
or ``?token=``) when it is set; ``/api/v1/nats/health`` is always public (load balancers).
Credentials in query strings and headers are redacted from every log line (``redact``).
"""

from __future__ import annotations

import gc
import html
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from liquidcrypto import serving
from liquidcrypto.config import Settings
from liquidcrypto.fanout import auth
from liquidcrypto.fanout.endpoint import websocket_endpoint
from liquidcrypto.fanout.manager import NatsWebSocketManager
from liquidcrypto.nats.client import NatsClient, close_nats, init_nats
from liquidcrypto.nats.health import is_healthy
from liquidcrypto.redact import install_log_redaction

STATIC_DIR = Path(__file__).parent / "static"

log = logging.getLogger(__name__)

TOKEN_ORIGINS_META = '<meta name="token-origins" content="[]">'
PAGE_HEADERS = {"Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn ``Config`` options the WebSocket edge relies on.

    ``ws_max_size`` makes the protocol layer refuse a frame larger than
    ``WS_MAX_FRAME_BYTES`` from its header (close 1009) instead of buffering it first;
    the protocols of ``serving`` close a connection whose request headers have not arrived
    within ``WS_HANDSHAKE_TIMEOUT`` and stop reading from a client that does not read.
    """
    return {
        **serving.protocols(settings.ws_handshake_timeout),
        "ws_max_size": settings.ws_max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        # Compressing every frame for every client separately costs more CPU than the
        # small trade frames save in bytes; fan-out servers (Centrifugo too) leave it off.
        "ws_per_message_deflate": False,
    }


def ops_allowed(request: Request) -> bool:
    """Whether ``request`` may read an ops endpoint: always when ``METRICS_TOKEN`` is unset."""
    expected: str | None = request.app.state.settings.metrics_token
    if not expected:
        return True
    given = auth.bearer_header(request.headers) or request.query_params.get("token") or ""
    return auth.token_matches(given, expected)


UNAUTHORISED = PlainTextResponse(
    "unauthorised: send METRICS_TOKEN as Authorization: Bearer\n",
    status_code=401,
    headers={"WWW-Authenticate": "Bearer"},
)


def tune_gc(gen0_threshold: int) -> None:
    """Latency tuning of the garbage collector for a long-running service.

    The objects made at start-up (modules, app, connections) are moved out of the
    collector's sight (``gc.freeze``), and generation 0 is collected every
    ``gen0_threshold`` net allocations instead of 700. Frames queued for clients count
    as allocations, so with Python's default a busy fan-out runs the collector hundreds
    of times a second and a full pass over every live object now and then: pauses
    measured at up to 100 ms on a loaded machine (p99 latency). 0 leaves Python's default.
    """
    if gen0_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)


async def nats_health(request: Request) -> JSONResponse:
    """``GET /api/v1/nats/health``: the spec's health dict, probed now (about 2 s at most).

    200 only when NATS answered a PING and JetStream answered (``is_healthy``); otherwise
    503 with the same body, saying which is down (``connected`` false: NATS;
    ``jetstream.enabled`` false: JetStream, or the client is still provisioning).
    """
    client: NatsClient = request.app.state.nats
    health = await client.health()
    return JSONResponse(health, status_code=200 if is_healthy(health) else 503)


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus exposition of every liquidcrypto metric."""
    if not ops_allowed(request):
        return UNAUTHORISED
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def index(request: Request) -> HTMLResponse:
    """``GET /``: the live trade dashboard (a page using ``/ws``)."""
    return HTMLResponse(request.app.state.index_html, headers=PAGE_HEADERS)


def dashboard_html(settings: Settings) -> str:
    """The dashboard page with the origins it may send its token to (``DASHBOARD_TOKEN_ORIGINS``)."""
    page = (STATIC_DIR / "index.html").read_text()
    origins = html.escape(orjson.dumps(list(settings.dashboard_token_origins)).decode(), quote=True)
    return page.replace(TOKEN_ORIGINS_META, f'<meta name="token-origins" content="{origins}">')


async def ws_stats(request: Request) -> Response:
    """``GET /api/v1/ws/stats``: this instance's WebSocket counters."""
    if not ops_allowed(request):
        return UNAUTHORISED
    manager: NatsWebSocketManager = request.app.state.ws_manager
    return JSONResponse(manager.stats())


def create_app(settings: Settings | None = None) -> Starlette:
    """The ASGI app.

    Args:
        settings: configuration (default ``Settings.from_env()``).
    """
    settings = settings or Settings.from_env()
    install_log_redaction()
    page = dashboard_html(settings)
    if (settings.ws_token or settings.ws_jwt_secret) and not settings.metrics_token:
        log.warning("/ws requires a token but /metrics and /api/v1/ws/stats are open: set METRICS_TOKEN")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.nats = await init_nats(settings=settings)
        ws_manager = NatsWebSocketManager(app.state.nats, settings=settings)
        try:
            await ws_manager.init()
            app.state.ws_manager = ws_manager
            tune_gc(settings.gc_gen0_threshold)
            yield
        finally:
            await ws_manager.close()
            await close_nats()

    routes = [
        Route("/api/v1/nats/health", nats_health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Route("/api/v1/ws/stats", ws_stats, methods=["GET"]),
        WebSocketRoute("/ws", websocket_endpoint),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.settings = settings
    app.state.index_html = page
    return app

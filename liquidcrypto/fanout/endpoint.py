"""The ``/ws`` endpoint: origin check, authentication, limits, reading client frames, closing.

Before accepting, the ``Origin`` header is checked against ``WS_ALLOWED_ORIGINS`` (when
set; a request without ``Origin`` is not from a browser and passes) and the token against
``WS_TOKEN``/``WS_JWT_SECRET`` (see ``auth``); either failing refuses the handshake (HTTP
403). A session admitted by a JWT is closed with 4001 when the JWT expires.

Per connection: one reader (this coroutine), one writer task draining the session's
queue, and the replays of its latest subscribe frame (``fanout.replay``: the reader
reads no further frame until they are done); all are owned by the session and
cancelled when the client leaves or is closed. Bad frames get an ``error`` frame; after
``WS_MAX_BAD_FRAMES`` of them the client is closed with 1008. A client that left is
logged at debug level, not as an error. ``/ws?batch=1`` asks for newline-batched
messages (see ``session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect

from liquidcrypto.fanout import auth, metrics, protocol
from liquidcrypto.fanout.manager import NatsWebSocketManager
from liquidcrypto.fanout.session import CLOSE_POLICY, CLOSE_TRY_AGAIN, ClientSession

log = logging.getLogger(__name__)

CLOSE_TIMEOUT = 2.0
CLOSE_TOKEN_EXPIRED = 4001
BATCH_ON = frozenset({"1", "true", "yes", "on"})


async def websocket_endpoint(websocket: WebSocket) -> None:
    """``GET /ws``: serve one client until it leaves or is closed."""
    manager: NatsWebSocketManager = websocket.app.state.ws_manager
    settings = manager.settings
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "ws-client"
    origin = websocket.headers.get("origin")
    if settings.ws_allowed_origins and origin is not None and not origin_allowed(origin, settings.ws_allowed_origins):
        metrics.POLICY_CLOSES.inc()
        log.warning("rejecting /ws client %s: origin %r not allowed", peer, origin[:200])
        await websocket.close(code=CLOSE_POLICY, reason="origin not allowed")
        return
    subprotocols: list[str] = list(websocket.scope.get("subprotocols") or [])
    given = auth.presented_token(websocket.query_params, websocket.headers, subprotocols)
    credential = auth.authenticate(
        given,
        token=settings.ws_token,
        jwt_secret=settings.ws_jwt_secret,
        leeway=settings.ws_jwt_leeway,
        audience=settings.ws_jwt_audience,
        issuer=settings.ws_jwt_issuer,
    )
    if credential is None:
        metrics.POLICY_CLOSES.inc()
        log.warning("rejecting /ws client %s: missing, wrong or expired token", peer)
        await websocket.close(code=CLOSE_POLICY, reason="unauthorised")
        return
    await websocket.accept(subprotocol=auth.selected_subprotocol(subprotocols))
    if manager.client_count >= settings.ws_max_clients:
        log.warning("rejecting /ws client %s: %d clients connected", peer, manager.client_count)
        await websocket.close(code=CLOSE_TRY_AGAIN, reason=f"server full ({settings.ws_max_clients} clients)")
        return
    batch = websocket.query_params.get("batch", "").lower() in BATCH_ON
    session = ClientSession(websocket.send_text, manager.queue_policy, name=peer, batch=batch)
    manager.register(session)
    session.offer(
        protocol.frame(
            "welcome",
            instance=manager.instance_id,
            backend=manager.backend_name,
            history=manager.backend.supports_history,
            batch=batch,
        )
    )
    if credential.expires_at is not None:
        session.spawn(_expire(session, credential), "token-expiry")
    writer = session.spawn(_write(session), "writer")
    reader = session.spawn(_read(websocket, manager, session), "reader")
    kicked = asyncio.ensure_future(session.kicked.wait())
    try:
        await asyncio.wait({writer, reader, kicked}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        kicked.cancel()
        await manager.unregister(session)
        await session.cancel_tasks()
    if session.kicked.is_set():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                websocket.close(code=session.close_code, reason=session.close_reason[:120]), CLOSE_TIMEOUT
            )
    log.debug("/ws client %s done: %s", peer, session.stats())


def origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """Whether the ``Origin`` header value is one of ``allowed`` (normalised origins)."""
    return origin.strip().rstrip("/").lower() in allowed


async def _expire(session: ClientSession, credential: auth.Credential) -> None:
    """Close the session with 4001 when its JWT expires (``exp`` + ``WS_JWT_LEEWAY``)."""
    while (left := auth.seconds_left(credential)) is not None and left > 0:
        await asyncio.sleep(min(left, 3600.0))  # re-read the wall clock at least hourly
    session.kick(CLOSE_TOKEN_EXPIRED, "token expired")


async def _write(session: ClientSession) -> None:
    try:
        await session.run_writer()
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        log.debug("/ws client %s left while sending: %r", session.name, exc)
    except Exception as exc:  # the server ws library's own "connection closed" error
        if "closed" not in type(exc).__name__.lower():
            raise
        log.debug("/ws client %s left while sending: %r", session.name, exc)


async def _read(websocket: WebSocket, manager: NatsWebSocketManager, session: ClientSession) -> None:
    settings = manager.settings
    bad = 0
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw: str | bytes | None = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        size = len(raw.encode()) if isinstance(raw, str) else len(raw)
        try:
            if size > settings.ws_max_frame_bytes:
                raise ValueError(f"frame of {size:,} bytes exceeds the limit of {settings.ws_max_frame_bytes:,}")
            request = protocol.parse_client_frame(raw, max_symbols=settings.ws_max_symbols)
        except ValueError as exc:
            bad += 1
            metrics.BAD_FRAMES.inc()
            session.offer(protocol.error_frame(str(exc)))
            if bad >= settings.ws_max_bad_frames:
                session.kick(CLOSE_POLICY, f"{bad} invalid frames")
                return
            continue
        if isinstance(request, protocol.Ping):
            session.offer(protocol.frame("pong"))
        elif isinstance(request, protocol.Subscribe):
            await manager.client_subscribe(session, request)
        else:
            await manager.client_unsubscribe(session, request.symbols)

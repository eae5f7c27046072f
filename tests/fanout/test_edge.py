"""The ``/ws`` edge against a real ``liquidcrypto serve`` process and a real nats-server:
frame size refused by the protocol layer, secrets kept out of logs and replies, JWT
expiry mid-session, the ops token, generic error frames and the ``Origin`` check."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from liquidcrypto.nats.embedded import NatsServer, free_port
from tests.fanout.support import ROOT, WsClient
from tests.helpers import CliProcess, cli, wait_http

MiB = 1024 * 1024


class Service:
    """A running ``liquidcrypto serve`` and its addresses."""

    def __init__(self, proc: CliProcess, port: int) -> None:
        self.proc = proc
        self.port = port
        self.http = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}/ws"

    def rss(self) -> int:
        """Resident memory of the service process in bytes."""
        for line in Path(f"/proc/{self.proc.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


@asynccontextmanager
async def serve(nats: NatsServer, tmp_path: Path, env: dict[str, str], *args: str) -> AsyncIterator[Service]:
    port = free_port()
    with cli(["serve", *args], {"NATS_URL": nats.url, "PORT": str(port), **env}, tmp_path) as proc:
        status, _ = await wait_http(f"http://127.0.0.1:{port}/api/v1/nats/health", proc)
        assert status == 200, proc.output
        yield Service(proc, port)


async def close_code(conn: Any, timeout: float = 10.0) -> int:
    """Read until the server closes the connection; the close code it sent."""
    try:
        while True:
            await asyncio.wait_for(conn.recv(), timeout)
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, f"no close frame received: {exc!r}"
        return exc.rcvd.code


# -- item 3: frame size -------------------------------------------------------------


async def test_oversized_frame_is_refused_by_the_protocol_layer_with_1009(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    async with serve(module_nats, tmp_path, {}) as svc:
        honest = await WsClient.connect(svc.ws)
        await honest.subscribe(["BTCUSDT"])
        before = svc.rss()
        conn = await websockets.connect(svc.ws, max_size=None, write_limit=64 * MiB)
        assert orjson.loads(await conn.recv())["type"] == "welcome"
        with pytest.raises(ConnectionClosed) as closed:
            await conn.send("x" * (16 * MiB))
            await conn.recv()  # the server never answers with a frame: it closes
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009, closed.value
        growth = svc.rss() - before
        assert growth < 20 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
        # The honest client is unaffected.
        await honest.send({"action": "ping"})
        assert (await honest.recv_type("pong"))["type"] == "pong"
        await honest.close()


async def test_serve_passes_keepalive_settings_to_uvicorn(module_nats: NatsServer, tmp_path: Path) -> None:
    """A client that never answers pings is closed after WS_PING_INTERVAL + WS_PING_TIMEOUT."""
    async with serve(module_nats, tmp_path, {"WS_PING_INTERVAL": "0.5", "WS_PING_TIMEOUT": "0.5"}) as svc:
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await writer.drain()
        started = time.monotonic()
        # Never answer: read until the server drops the connection.
        while await asyncio.wait_for(reader.read(65536), 15):
            pass
        assert time.monotonic() - started < 10
        writer.close()


# -- item 4: the token never reaches logs, metrics, stats or error frames -------------


async def test_token_is_accepted_three_ways_and_never_logged(module_nats: NatsServer, tmp_path: Path) -> None:
    token = "tok-" + secrets.token_urlsafe(24)
    near_miss = token + "x"
    ops = "ops-" + secrets.token_urlsafe(24)
    env = {"WS_TOKEN": token, "METRICS_TOKEN": ops}
    async with serve(module_nats, tmp_path, env, "--log-level", "debug") as svc:
        frames: list[str] = []
        # 1. ?token= (what browsers used to do)
        q = await websockets.connect(f"{svc.ws}?token={token}&batch=0")
        frames.append(str(await q.recv()))
        await q.send("{not json")
        frames.append(str(await q.recv()))
        await q.close()
        # 2. Authorization: Bearer
        h = await websockets.connect(svc.ws, additional_headers={"Authorization": f"Bearer {token}"})
        frames.append(str(await h.recv()))
        await h.close()
        # 3. the subprotocol pair a browser can send; the server selects the plain one
        p = await websockets.connect(svc.ws, subprotocols=["liquidcrypto", f"bearer.{token}"])  # type: ignore[list-item]
        assert p.subprotocol == "liquidcrypto"
        frames.append(str(await p.recv()))
        await p.close()
        # Refused: a wrong token in each place.
        for kwargs in (
            {"uri": f"{svc.ws}?token={near_miss}"},
            {"uri": svc.ws, "additional_headers": {"Authorization": f"Bearer {near_miss}"}},
            {"uri": svc.ws, "subprotocols": ["liquidcrypto", f"bearer.{near_miss}"]},
        ):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(**kwargs)  # type: ignore[arg-type]
            assert refused.value.response.status_code == 403
        async with httpx.AsyncClient() as http:
            page = await http.get(f"{svc.http}/?token={token}")
            assert page.status_code == 200
            replies = [
                (await http.get(f"{svc.http}{path}?token={ops}")).text for path in ("/metrics", "/api/v1/ws/stats")
            ]
            bearer = {"Authorization": f"Bearer {ops}"}
            for path in ("/metrics", "/api/v1/ws/stats"):
                replies.append((await http.get(f"{svc.http}{path}", headers=bearer)).text)
        assert "liquidcrypto_ws_clients" in replies[0] and '"clients"' in replies[1]
        output = svc.proc.output
        assert "WebSocket /ws" in output  # the access log is on...
        assert "/metrics" in output
        for secret in (token, ops):
            assert secret not in output, "a token was written to the log"
            for reply in replies + frames:
                assert secret not in reply
        assert near_miss not in output


# -- item 5: JWT expiry mid-session, required exp, aud/iss ----------------------------


async def test_jwt_session_is_closed_with_4001_when_the_token_expires(module_nats: NatsServer, tmp_path: Path) -> None:
    key = secrets.token_hex(32)
    env = {"WS_JWT_SECRET": key, "WS_JWT_LEEWAY": "0", "WS_JWT_AUDIENCE": "trades", "WS_JWT_ISSUER": "auth.example"}
    async with serve(module_nats, tmp_path, env) as svc:

        def token(**claims: Any) -> str:
            base = {"sub": "u1", "aud": "trades", "iss": "auth.example", "exp": int(time.time()) + 3600}
            return jwt.encode({**base, **claims}, key, algorithm="HS256")

        no_exp = jwt.encode({"sub": "u1", "aud": "trades", "iss": "auth.example"}, key, algorithm="HS256")
        for bad in (no_exp, token(aud="other"), token(iss="evil"), token(exp=int(time.time()) - 5)):
            with pytest.raises(InvalidStatus) as refused:
                await websockets.connect(svc.ws, additional_headers={"Authorization": f"Bearer {bad}"})
            assert refused.value.response.status_code == 403

        long_lived = await WsClient.connect(svc.ws, additional_headers={"Authorization": f"Bearer {token()}"})
        short = token(exp=int(time.time()) + 2)
        client = await WsClient.connect(svc.ws, additional_headers={"Authorization": f"Bearer {short}"})
        await client.subscribe(["BTCUSDT"])
        started = time.monotonic()
        assert await close_code(client.conn, timeout=10) == 4001
        assert time.monotonic() - started < 5
        # Others stay connected.
        await long_lived.send({"action": "ping"})
        assert (await long_lived.recv_type("pong"))["type"] == "pong"
        await long_lived.close()


# -- item 6: ops endpoints and generic error frames ----------------------------------


async def test_ops_endpoints_need_the_metrics_token_and_health_stays_public(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    ops = secrets.token_urlsafe(16)
    env = {"METRICS_TOKEN": ops, "WS_TOKEN": "other"}
    async with serve(module_nats, tmp_path, env) as svc, httpx.AsyncClient(base_url=svc.http) as http:
        for path in ("/metrics", "/api/v1/ws/stats"):
            assert (await http.get(path)).status_code == 401
            assert (await http.get(path, params={"token": "other"})).status_code == 401
            assert (await http.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401
            assert (await http.get(path, params={"token": ops})).status_code == 200
            assert (await http.get(path, headers={"Authorization": f"Bearer {ops}"})).status_code == 200
        health = await http.get("/api/v1/nats/health")
        assert health.status_code == 200 and health.json()["connected"] is True
        assert (await http.get("/")).status_code == 200


async def test_error_frames_carry_no_internal_exception_text(tmp_path: Path) -> None:
    """NATS down (degraded mode): a subscribe is answered with a generic error."""
    nats_port = free_port()
    port = free_port()
    env = {"NATS_URL": f"nats://127.0.0.1:{nats_port}", "PORT": str(port)}
    with cli(["serve"], env, tmp_path) as proc:
        status, _ = await wait_http(f"http://127.0.0.1:{port}/api/v1/nats/health", proc)
        assert status == 503
        client = await WsClient.connect(f"ws://127.0.0.1:{port}/ws")
        await client.send({"action": "subscribe", "symbols": ["BTCUSDT"]})
        error = await client.recv_type("error")
        assert error["message"] == "trades of BTCUSDT are unavailable now; try again later", error
        await client.close()


# -- item 8: Origin -------------------------------------------------------------------


async def test_origin_is_checked_against_the_allowed_list(module_nats: NatsServer, tmp_path: Path) -> None:
    env = {"WS_ALLOWED_ORIGINS": "https://app.example, http://127.0.0.1:8080"}
    async with serve(module_nats, tmp_path, env) as svc:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(svc.ws, origin="https://evil.example")  # type: ignore[arg-type]
        assert refused.value.response.status_code == 403
        for origin in ("https://app.example", "http://127.0.0.1:8080", None):
            ok = await WsClient.connect(svc.ws, origin=origin)
            await ok.close()
        assert "origin 'https://evil.example' not allowed" in svc.proc.output


async def test_token_is_redacted_under_plain_uvicorn_too(module_nats: NatsServer, tmp_path: Path) -> None:
    """``uvicorn liquidcrypto.app:create_app --factory`` configures its own log handlers."""
    token = "tok-" + secrets.token_urlsafe(24)
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    env = {**os.environ, "NATS_URL": module_nats.url, "WS_TOKEN": token}
    command = [sys.executable, "-m", "uvicorn", "liquidcrypto.app:create_app", "--factory", "--port", str(port)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([*command, "--log-level", "info"], env=env, cwd=ROOT, stdout=out, stderr=out)
    try:
        status, _ = await wait_http(f"http://127.0.0.1:{port}/api/v1/nats/health")
        assert status == 200
        client = await WsClient.connect(f"ws://127.0.0.1:{port}/ws?token={token}")
        await client.close()
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://127.0.0.1:{port}/?token={token}")).status_code == 200
    finally:
        proc.terminate()
        proc.wait(15)
    log = log_path.read_text()
    assert '"WebSocket /ws?token=[redacted]" [accepted]' in log
    assert "GET /?token=[redacted]" in log
    assert token not in log

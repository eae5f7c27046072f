"""Shared helpers of the WebSocket tests: app instances as real uvicorn processes, a client."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

from liquidcrypto.nats.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


class AppInstance:
    """One ``uvicorn liquidcrypto.app:create_app --factory`` process on a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self, timeout: float = 30.0) -> None:
        env = {**os.environ, **self.env, "PORT": str(self.port)}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "liquidcrypto.app:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.http + "/api/v1/ws/stats", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"app on port {self.port} did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None) is not None:
            self._log.close()

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.http + "/api/v1/ws/stats", timeout=5).json()
        return data

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def app_instances(n: int, env: dict[str, str], tmp: Path) -> Iterator[list[AppInstance]]:
    """``n`` running instances with ``env`` (stopped at the end)."""
    apps = [AppInstance(env, tmp / f"app{i}.log") for i in range(n)]
    try:
        for a in apps:
            a.start()
        yield apps
    finally:
        for a in apps:
            a.stop()


class WsClient:
    """A ``websockets`` client that decodes frames and collects trades.

    With ``batch=1`` in the URL, a message may hold several newline-separated frames;
    otherwise a message with a newline fails the test.
    """

    def __init__(self, conn: Any, batch: bool) -> None:
        self.conn = conn
        self.batch = batch
        self.frames: list[dict[str, Any]] = []
        self.messages = 0
        self._pending: deque[dict[str, Any]] = deque()

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> WsClient:
        conn = await websockets.connect(url, **kwargs)
        client = cls(conn, "batch=1" in url)
        welcome = await client.recv()
        assert welcome["type"] == "welcome" and welcome["batch"] is client.batch, welcome
        return client

    async def send(self, frame: Any) -> None:
        await self.conn.send(frame if isinstance(frame, str | bytes) else orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        if not self._pending:
            raw = await asyncio.wait_for(self.conn.recv(), timeout)
            text = raw if isinstance(raw, str) else raw.decode()
            assert self.batch or "\n" not in text, "a batched message on a connection that did not ask for it"
            self.messages += 1
            self._pending.extend(orjson.loads(line) for line in text.split("\n"))
        frame = self._pending.popleft()
        self.frames.append(frame)
        return frame

    async def recv_type(self, type_: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == type_:
                return frame

    async def subscribe(self, symbols: list[str], **extra: Any) -> dict[str, Any]:
        await self.send({"action": "subscribe", "symbols": symbols, **extra})
        return await self.recv_type("subscribed")

    async def trades(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if frame["type"] == "trade":
                out.append(frame)
        return out

    async def close(self) -> None:
        await self.conn.close()

"""Headless Chromium (Debian's package) driven over the DevTools protocol, for page tests.

No browser download and no extra Python dependency: the ``websockets`` client speaks CDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
]


def chromium_binary() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Page:
    """One browser tab: navigate and evaluate JavaScript."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self._ws.send(orjson.dumps({"id": msg_id, "method": method, "params": params or {}}).decode())
        while True:
            reply = orjson.loads(await self._ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"CDP {method} failed: {reply['error']}")
                return dict(reply.get("result", {}))

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", {"url": url})

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Any]:
    """Start headless Chromium; yield ``new_page()``, an async factory of ``Page``."""
    binary = chromium_binary()
    if binary is None:
        raise RuntimeError("chromium not found: apt-get install -y chromium")
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sockets: list[Any] = []
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 30
        port = None
        while port is None:
            line = await asyncio.to_thread(proc.stderr.readline)
            match = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
            elif (not line and proc.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start (exit {proc.poll()})")

        async def new_page() -> Page:
            async with httpx.AsyncClient() as http:
                target = (await http.put(f"http://127.0.0.1:{port}/json/new?about:blank")).json()
            ws = await websockets.connect(target["webSocketDebuggerUrl"], max_size=None)
            sockets.append(ws)
            return Page(ws)

        yield new_page
    finally:
        for ws in sockets:
            await ws.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

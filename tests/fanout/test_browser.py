"""The dashboard in a real headless Chromium: panes on two instances show the same live
trades. Chromium is driven through its DevTools protocol with the ``websockets`` client
(no Selenium). Needs ``chromium`` on PATH (Debian: ``apt-get install chromium``)."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
import websockets

from liquidcrypto.nats.embedded import NatsServer, free_port
from tests.fanout.support import AppInstance, app_instances
from tests.fanout.test_e2e import publisher, two_apps  # noqa: F401 - fixtures
from tests.helpers import eventually

READ_PANES = """JSON.stringify([...document.querySelectorAll('.pane')].map(p => ({
  name: p.querySelector('.name').textContent,
  status: p.querySelector('.status').textContent,
  seqs: [...p.querySelectorAll('tbody tr')].map(r => Number(r.cells[3].textContent)),
  symbols: [...p.querySelectorAll('tbody tr')].map(r => r.cells[0].textContent),
})))"""


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.ids = itertools.count(1)

    async def evaluate(self, expression: str) -> Any:
        msg_id = next(self.ids)
        await self.conn.send(
            orjson.dumps(
                {
                    "id": msg_id,
                    "method": "Runtime.evaluate",
                    "params": {"expression": expression, "returnByValue": True},
                }
            ).decode()
        )
        while True:
            reply = orjson.loads(await asyncio.wait_for(self.conn.recv(), 10))
            if reply.get("id") == msg_id:
                return reply["result"]["result"].get("value")


@asynccontextmanager
async def chromium_page(url: str, tmp_path: Path) -> AsyncIterator[Page]:
    """A headless Chromium showing ``url``, driven over DevTools; stopped at the end."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.fail("chromium is not on PATH; install it (Debian: apt-get install chromium)")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--remote-debugging-port={port}",
            f"--user-data-dir={tmp_path / 'chrome'}",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        ws_url = None
        while ws_url is None:
            try:
                targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=1).json()
                ws_url = next((t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"), None)
            except httpx.HTTPError:
                pass
            if ws_url is None:
                assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
                await asyncio.sleep(0.1)
        async with websockets.connect(ws_url, max_size=None) as conn:
            yield Page(conn)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
async def browser_page(two_apps: list[AppInstance], tmp_path: Path) -> AsyncIterator[Page]:  # noqa: F811
    a, b = two_apps
    async with chromium_page(f"{a.http}/?instances=ws://127.0.0.1:{b.port}/ws", tmp_path) as page:
        yield page


async def read_panes(page: Page) -> list[dict[str, Any]]:
    value = await page.evaluate(READ_PANES)
    return list(orjson.loads(value)) if value else []


async def test_dashboard_panes_on_two_instances_show_the_same_live_trades(
    module_nats: NatsServer,
    browser_page: Page,
) -> None:
    async def panes() -> list[dict[str, Any]]:
        value = await browser_page.evaluate(READ_PANES)
        return list(orjson.loads(value)) if value else []

    async def both_live() -> bool:
        p = await panes()
        return len(p) == 2 and all(x["status"] == "live" for x in p)

    await eventually(both_live, timeout=30, what="two live panes")
    client, manager = await publisher(module_nats.url)
    try:
        for i in range(30):
            await manager.publish_trade_event("BTCUSDT", {"price": 95000 + i, "volume": 1.5})
        await manager.flush()

        async def all_shown() -> bool:
            p = await panes()
            return all(len(x["seqs"]) >= 25 for x in p)

        await eventually(all_shown, timeout=20, what="trades shown in both panes")
    finally:
        await manager.close()
        await client.close()
    first, second = await panes()
    assert first["name"] != second["name"]  # two instances...
    assert first["seqs"] == second["seqs"]  # ...showing the same trades, newest first
    assert first["seqs"] == sorted(first["seqs"], reverse=True) and len(set(first["seqs"])) == 25
    assert set(first["symbols"]) == {"BTCUSDT"}


XSS = '<img src=x onerror="window.__xss = 1">'


async def test_instances_parameter_is_shown_as_text_never_run_as_html(
    module_nats: NatsServer,
    two_apps: list[AppInstance],  # noqa: F811
    tmp_path: Path,
) -> None:
    a, _ = two_apps
    async with chromium_page(f"{a.http}/?instances={quote(XSS)}", tmp_path) as page:

        async def attacker_pane_done() -> list[dict[str, Any]] | None:
            p = await read_panes(page)
            return p if len(p) == 2 and p[1]["status"] != "connecting" else None

        panes = await eventually(attacker_pane_done, timeout=30, what="the second pane tried its URL")
        assert panes[1]["name"] == XSS  # shown literally...
        assert await page.evaluate("document.querySelectorAll('img').length") == 0  # ...not parsed
        assert await page.evaluate("typeof window.__xss") == "undefined"


async def test_dashboard_sends_its_token_only_to_its_own_origin(
    module_nats: NatsServer,
    tmp_path: Path,
) -> None:
    token = "dash-" + secrets.token_urlsafe(16)
    seen: list[str] = []

    def record(connection: Any, request: Any) -> None:
        seen.append(request.path + "\n" + "\n".join(f"{k}: {v}" for k, v in request.headers.raw_items()))

    async def hold(connection: Any) -> None:
        await connection.wait_closed()

    env = {"NATS_URL": module_nats.url, "WS_BACKEND": "nats", "WS_TOKEN": token}
    with app_instances(1, env, tmp_path) as (own,):
        async with websockets.serve(hold, "127.0.0.1", 0, process_request=record) as foreign:
            foreign_port = foreign.sockets[0].getsockname()[1]
            url = f"{own.http}/?token={token}&instances=ws://127.0.0.1:{foreign_port}/ws"
            async with chromium_page(url, tmp_path) as page:

                async def own_live() -> bool:
                    p = await read_panes(page)
                    return len(p) == 2 and p[0]["status"] == "live"

                await eventually(own_live, timeout=30, what="own pane live with the token")
                await eventually(lambda: seen, timeout=30, what="the foreign instance was asked")
                assert token not in await page.evaluate("location.href")
        assert all(token not in request for request in seen), seen
        assert token not in own.log_text()

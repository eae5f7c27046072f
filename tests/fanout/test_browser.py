"""The dashboard in a real headless Chromium: panes on two instances show the same live
trades. Chromium is driven through its DevTools protocol with the ``websockets`` client
(no Selenium). Needs ``chromium`` on PATH (Debian: ``apt-get install chromium``)."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import websockets

from liquidcrypto.nats.embedded import NatsServer, free_port
from tests.fanout.support import AppInstance
from tests.fanout.test_e2e import module_nats, publisher, two_apps  # noqa: F401 - fixtures
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


@pytest.fixture
async def browser_page(two_apps: list[AppInstance], tmp_path: Path) -> AsyncIterator[Page]:  # noqa: F811
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if binary is None:
        pytest.fail("chromium is not on PATH; install it (Debian: apt-get install chromium)")
    a, b = two_apps
    port = free_port()
    url = f"{a.http}/?instances=ws://127.0.0.1:{b.port}/ws"
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


async def test_dashboard_panes_on_two_instances_show_the_same_live_trades(
    module_nats: NatsServer,  # noqa: F811
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

"""Client worker of the WebSocket fan-out benchmark (a separate process).

It imports only ``websockets`` and ``orjson`` so that it starts fast and measures the
clients, not the library under test.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson

SYMBOL = "BENCH"


def worker_main() -> None:
    """A client worker process: ``argv[1]`` is JSON ``{"urls": [...], "count": n}``.

    Prints ``ready`` once its clients are subscribed, reads until a line arrives on
    stdin, then prints its report as one JSON line.
    """
    spec = orjson.loads(sys.argv[1])
    asyncio.run(_clients(spec["urls"], spec["count"]))


async def _clients(urls: list[str], count: int) -> None:
    import websockets

    received = 0
    missed = 0
    last = 0.0
    latencies: list[float] = []
    sockets = []
    for i in range(count):
        ws = await websockets.connect(urls[i % len(urls)], compression=None, max_size=None, open_timeout=30)
        await ws.send(orjson.dumps({"action": "subscribe", "symbols": [SYMBOL]}).decode())
        while orjson.loads(await ws.recv())["type"] != "subscribed":
            pass
        sockets.append(ws)

    async def read(ws: Any) -> None:
        nonlocal received, missed, last
        async for raw in ws:
            frame = orjson.loads(raw)
            if frame["type"] == "trade":
                received += 1
                last = time.time()
                latencies.append(last - frame["data"]["t"])
            missed += frame.get("missed", 0)

    readers = [asyncio.ensure_future(read(ws)) for ws in sockets]
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for r in readers:
        r.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    step = max(1, len(latencies) // 10000)
    report = {"received": received, "missed": missed, "last": last, "latencies": latencies[::step]}
    print(orjson.dumps(report).decode(), flush=True)
    for ws in sockets:
        ws.transport.abort()

"""Client worker of the WebSocket fan-out benchmark (a separate process).

Each client is the ``websockets`` sans-I/O protocol on a bare asyncio ``Protocol`` (no
task, no queue per frame), so that a worker can read many more frames per second than
with the full asyncio client and the benchmark measures the servers, not its clients.
It imports only ``websockets``, ``orjson`` and (when installed) ``uvloop``.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

SYMBOL = "BENCH"
T = TypeVar("T")


class FastClient(asyncio.Protocol):
    """One WebSocket client calling ``on_text(bytes)`` for every text frame."""

    def __init__(self, url: str, on_text: Callable[[bytes], None]) -> None:
        self.ws = ClientProtocol(parse_uri(url), max_size=None)
        self.on_text = on_text
        self.opened = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.ws.send_request(self.ws.connect())
        self._flush()

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.TEXT:
                    self.on_text(bytes(event.data))
            elif isinstance(event, Response):
                self.opened.set()
        self._flush()  # pongs and close frames the protocol produced

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def send_text(self, text: str) -> None:
        self.ws.send_text(text.encode())
        self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def worker_main() -> None:
    """A client worker process: ``argv[1]`` is JSON ``{"urls": [...], "count": n, "batch": b}``.

    Prints ``ready`` once its clients are subscribed, reads until a line arrives on
    stdin, then prints its report as one JSON line.
    """
    spec = orjson.loads(sys.argv[1])
    # A measuring client: no collector pauses in the latencies it records (it makes no cycles).
    gc.freeze()
    gc.disable()
    run_loop(_clients(spec["urls"], spec["count"], spec.get("batch", False)))


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when installed (it comes with uvicorn[standard] and is what
    uvicorn runs the apps on), else on asyncio; for the benchmark's own processes."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - plain asyncio works too
        return asyncio.run(main)
    return uvloop.run(main)


async def _clients(urls: list[str], count: int, batch: bool) -> None:
    received = 0
    missed = 0
    last = 0.0
    latencies: list[float] = []
    subscribed = 0
    all_subscribed = asyncio.Event()

    def on_message(raw: bytes) -> None:
        if batch:  # newline-separated frames (``/ws?batch=1``)
            for line in raw.split(b"\n"):
                on_text(line)
        else:
            on_text(raw)

    def on_text(raw: bytes) -> None:
        nonlocal received, missed, last, subscribed
        frame = orjson.loads(raw)
        kind = frame["type"]
        if kind == "trade":
            received += 1
            last = time.time()
            latencies.append(last - frame["data"]["t"])
        elif kind == "subscribed":
            subscribed += 1
            if subscribed == count:
                all_subscribed.set()
        missed += frame.get("missed", 0)

    loop = asyncio.get_running_loop()
    clients: list[FastClient] = []
    subscribe = orjson.dumps({"action": "subscribe", "symbols": [SYMBOL]}).decode()
    for i in range(count):
        url = urls[i % len(urls)] + ("?batch=1" if batch else "")
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        _, client = await loop.create_connection(functools.partial(FastClient, url, on_message), host, port)
        await asyncio.wait_for(client.opened.wait(), 30)
        client.send_text(subscribe)
        clients.append(client)
    if count:
        await asyncio.wait_for(all_subscribed.wait(), 60)
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    step = max(1, len(latencies) // 10000)
    report = {"received": received, "missed": missed, "last": last, "latencies": latencies[::step]}
    print(orjson.dumps(report).decode(), flush=True)
    for c in clients:
        c.abort()
